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
}
