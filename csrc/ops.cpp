// The single list of symfast operators.
//
// Every op is declared here once, with TORCH_LIBRARY, so that the dispatcher,
// torch.compile, torch.func and torch.library.opcheck all see the same schema.
// Device kernels live in csrc/cpu/*.cpp and csrc/cuda/*.cu and register with
// TORCH_LIBRARY_IMPL; fake kernels and autograd live in symfast/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/output_cache.h"

extern "C" {
// `import symfast._C` loads this shared library, which runs the static
// registrations below. The module itself exposes nothing: the ops are reached
// through torch.ops.symfast.*, which torch.compile can see (pybind11 bindings
// would be opaque to it).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "symfast operator registrations", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(symfast, m) {
  // theta = (1 - m) * v + m * w * u   (paper eq. 10 with P = diag(m)).
  // mask=None means m = 1 (theta = w * u); v=None means v = 0.
  m.def("dcs(Tensor w, Tensor u, Tensor? v=None, Tensor? mask=None) -> Tensor");
  // Vector-Jacobian product of dcs, all three input gradients in one pass:
  //   grad_w = m * u * grad,  grad_u = m * w * grad,  grad_v = (1 - m) * grad.
  // A gradient whose flag is false is not computed and comes back as an empty
  // tensor, so no memory traffic is spent on it.
  m.def(
      "dcs_backward(Tensor grad, Tensor w, Tensor u, Tensor? mask, "
      "bool w_needed, bool u_needed, bool v_needed) -> (Tensor, Tensor, Tensor)");
  // Jacobian-vector product of dcs (forward mode), one pass:
  //   theta_dot = (1 - m) * v_dot + m * (w_dot * u + w * u_dot).
  // A missing tangent counts as zero.
  m.def(
      "dcs_jvp(Tensor w, Tensor u, Tensor? mask, Tensor? w_dot, Tensor? u_dot, "
      "Tensor? v_dot) -> Tensor");

  // Group gate (group lasso): theta = w * s broadcast along dim, i.e.
  // theta[..., g, ...] = s[g] * w[..., g, ...] with s of shape (w.shape[dim],).
  // dim may be negative. Penalty alpha*(|s|^2 + |w|^2) = 2*alpha*sum_g |theta_g|_2.
  m.def("dcs_group(Tensor w, Tensor s, int dim) -> Tensor");
  // Vector-Jacobian product of dcs_group, both gradients in one pass:
  //   grad_w = grad * s (broadcast),  grad_s[g] = sum over the other dims of grad * w.
  // A gradient whose flag is false is not computed and comes back as a fresh
  // empty (0,) tensor.
  m.def(
      "dcs_group_backward(Tensor grad, Tensor w, Tensor s, int dim, bool w_needed, "
      "bool s_needed) -> (Tensor, Tensor)");
  // Jacobian-vector product of dcs_group: theta_dot = w_dot * s + w * s_dot.
  // A missing tangent counts as zero.
  m.def("dcs_group_jvp(Tensor w, Tensor s, int dim, Tensor? w_dot, Tensor? s_dot) -> Tensor");

  // dcs / dcs_group with a C++ autograd node (csrc/autograd.cpp): the
  // first-order training path of symfast.dcs / symfast.dcs_group, taken when
  // no torch.func transform or forward-mode AD is active. Same values and
  // gradients as the public ops; internal (the leading underscore).
  m.def("_dcs_autograd(Tensor w, Tensor u, Tensor? v=None, Tensor? mask=None) -> Tensor");
  m.def("_dcs_group_autograd(Tensor w, Tensor s, int dim) -> Tensor");

  // The cache of CPU output blocks (csrc/cpu/output_cache.h), exposed as
  // symfast.cpu_cache_info / set_cpu_cache_limit / empty_cpu_cache.
  m.def("cpu_cache_info() -> int[]", &symfast::cpu_cache_info);
  m.def("cpu_cache_set_limit(int bytes) -> ()", &symfast::cpu_cache_set_limit);
  m.def("cpu_cache_empty() -> ()", &symfast::cpu_cache_empty);

  // ---- jet row ops (csrc/cpu/jet_rows.cpp, csrc/cuda/jet_rows.cu; twins in symfast/reference.py)
  // A second-order jet of x along K directions is (x, x1, x2), x1 and x2 the
  // first and second t-derivatives of x(theta + t n_k) stacked with a leading
  // K: shape (K, *x.shape). Each op reads (x, x1, x2) and writes (y, y1, y2) in
  // one pass, y1 = f'(x) x1 and y2 = f'(x) x2 + f''(x)[x1, x1]; y1 and y2 are
  // (K, *y.shape). A missing tangent counts as zero; at least one must be given
  // (K is read from it). Rows are the normalized dims or the softmax dim.
  //
  // F.layer_norm; weight and bias may carry their own jets, (K, *normalized_shape).
  m.def(
      "jet_layer_norm(Tensor x, Tensor? x1, Tensor? x2, int[] normalized_shape, Tensor? weight, "
      "Tensor? bias, Tensor? weight1, Tensor? bias1, Tensor? weight2, Tensor? bias2, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // y = x * rsqrt(mean(x^2, normalized dims) + eps) * weight (F.rms_norm).
  m.def(
      "jet_rms_norm(Tensor x, Tensor? x1, Tensor? x2, int[] normalized_shape, Tensor? weight, "
      "Tensor? weight1, Tensor? weight2, float eps) -> (Tensor, Tensor, Tensor)");
  // softmax (log=False) or log_softmax (log=True) along dim.
  m.def("jet_softmax(Tensor x, Tensor? x1, Tensor? x2, int dim, bool log) -> (Tensor, Tensor, Tensor)");
  // Per-sample cross-entropy of logits z (N, C) and class indices target (N,)
  // (reduction='none'): loss (N,), l1 and l2 (K, N); rows whose target is
  // ignore_index give 0.
  m.def(
      "jet_cross_entropy(Tensor z, Tensor? z1, Tensor? z2, Tensor target, int ignore_index=-100) "
      "-> (Tensor, Tensor, Tensor)");
}
