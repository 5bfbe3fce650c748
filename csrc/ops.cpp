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

  // ---- jet ops, pointwise family (csrc/{cpu,cuda}/jet_pointwise.*) ----
  // Second-order jets along K directions: (x, x1, x2) with x1, x2 of shape
  // [K, *x.shape] (a missing tangent counts as zero; at least one is given, so
  // that K is known) map to (y, y1, y2) with
  //   y1 = f'(x) x1,   y2 = f'(x) x2 + f''(x)[x1, x1],
  // in one pass. kind: gelu (erf), gelu_tanh, silu, tanh, sigmoid, relu,
  // softplus; beta and threshold are softplus's (linear where beta*x > threshold).
  // Every jet op takes `second` last: with second=false it computes the
  // first-order jet only (Taylor mode for directional derivatives) and y2 comes
  // back as an empty (0,) tensor, so no memory traffic is spent on it (as the
  // flags of dcs_backward).
  m.def(
      "jet_activation(Tensor x, Tensor? x1, Tensor? x2, str kind, float beta=1.0, "
      "float threshold=20.0, bool second=True) -> (Tensor, Tensor, Tensor)");
  // Jet of dcs: theta = m ? w*u : v,
  //   y1 = m ? w1 u + w u1 : v1,   y2 = m ? w2 u + 2 w1 u1 + w u2 : v2.
  m.def(
      "jet_dcs(Tensor w, Tensor u, Tensor? v, Tensor? mask, Tensor? w1, Tensor? u1, "
      "Tensor? v1, Tensor? w2, Tensor? u2, Tensor? v2, bool second=True) -> (Tensor, Tensor, Tensor)");
  // Jet of dcs_group: theta = w * s (s broadcast along dim), s1, s2 of shape [K, G],
  //   y1 = w1 s + w s1,   y2 = w2 s + 2 w1 s1 + w s2.
  m.def(
      "jet_dcs_group(Tensor w, Tensor s, int dim, Tensor? w1, Tensor? s1, Tensor? w2, "
      "Tensor? s2, bool second=True) -> (Tensor, Tensor, Tensor)");
  // ---- end of the jet ops, pointwise family ----

  // ---- jet ops, row family (csrc/{cpu,cuda}/jet_rows.*) ----
  // Jets as above; a row is the normalized dims or the softmax dim.
  //
  // F.layer_norm; weight and bias may carry their own jets, (K, *normalized_shape).
  m.def(
      "jet_layer_norm(Tensor x, Tensor? x1, Tensor? x2, int[] normalized_shape, Tensor? weight, "
      "Tensor? bias, Tensor? weight1, Tensor? bias1, Tensor? weight2, Tensor? bias2, float eps, "
      "bool second=True) -> (Tensor, Tensor, Tensor)");
  // y = x * rsqrt(mean(x^2, normalized dims) + eps) * weight (F.rms_norm).
  m.def(
      "jet_rms_norm(Tensor x, Tensor? x1, Tensor? x2, int[] normalized_shape, Tensor? weight, "
      "Tensor? weight1, Tensor? weight2, float eps, bool second=True) -> (Tensor, Tensor, Tensor)");
  // softmax (log=False) or log_softmax (log=True) along dim.
  m.def(
      "jet_softmax(Tensor x, Tensor? x1, Tensor? x2, int dim, bool log, bool second=True) "
      "-> (Tensor, Tensor, Tensor)");
  // Per-sample cross-entropy of logits z (N, C) and class indices target (N,)
  // (reduction='none'): loss (N,), l1 and l2 (K, N); rows whose target is
  // ignore_index give 0.
  m.def(
      "jet_cross_entropy(Tensor z, Tensor? z1, Tensor? z2, Tensor target, int ignore_index=-100, "
      "bool second=True) -> (Tensor, Tensor, Tensor)");
  // ---- end of the jet ops, row family ----
}
