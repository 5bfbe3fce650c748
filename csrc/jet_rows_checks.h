// Input validation shared by the CPU and CUDA kernels of the jet row ops
// (jet_layer_norm, jet_rms_norm, jet_softmax, jet_cross_entropy).
//
// symfast/ops/jet_rows.py makes the same checks, with the same messages, in
// the public wrappers and the fake kernels; these guard direct calls of
// torch.ops.symfast.*. Exception types follow Python's: TypeError for a
// dtype, ValueError for a shape or value, IndexError for a dim or a class
// index out of range.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "dcs_checks.h"  // is_supported_float, tuple_str

namespace symfast {

// "(K, 3, 4)" while K is unknown, "(2, 3, 4)" once a tangent has fixed it.
inline std::string shape_with_k(int64_t k, at::IntArrayRef base) {
  std::string out = k < 0 ? "(K" : "(" + std::to_string(k);
  for (int64_t s : base) out += ", " + std::to_string(s);
  return out + (base.empty() ? ",)" : ")");
}

// K, the number of directions, and the tangent it was read from.
struct JetDirections {
  int64_t k = -1;
  const char* from = nullptr;
};

inline void check_row_primal(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// t must have the dtype and device of x (named xname in the message).
inline void check_jet_like(const char* op, const char* name, const at::Tensor& t,
                           const at::Tensor& x, const char* xname) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of ",
                   xname, " (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", xname, "'s device (",
              x.device(), "), got ", t.device());
}

// A tangent of shape (K, *base); the first one given fixes K for the others.
inline void check_jet_tangent(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                              const at::Tensor& x, const char* xname, at::IntArrayRef base,
                              const char* base_name, JetDirections& dirs) {
  if (!t.has_value()) return;
  check_jet_like(op, name, *t, x, xname);
  const bool rank_ok = t->dim() == static_cast<int64_t>(base.size()) + 1;
  const bool ok = rank_ok && t->sizes().slice(1) == base && (dirs.k < 0 || t->size(0) == dirs.k);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape (K, *", base_name, ") = ",
                    shape_with_k(dirs.k, base),
                    dirs.k < 0 ? std::string() : std::string(" (K from ") + dirs.from + ")",
                    ", got ", tuple_str(t->sizes()));
  if (dirs.k < 0) {
    dirs.k = t->size(0);
    dirs.from = name;
  }
}

inline void check_jet_has_directions(const char* op, const JetDirections& dirs, const char* names) {
  TORCH_CHECK_VALUE(dirs.k >= 0, op, ": at least one of ", names,
                    " must be given (K, the number of directions, is read from them), got none");
}

// ------------------------------------------------------------- normalization
// normalized_shape must be the trailing dims of x; returns their product, the row length.
inline void check_normalized_shape(const char* op, const at::Tensor& x, at::IntArrayRef ns) {
  const int64_t nd = static_cast<int64_t>(ns.size());
  const bool ok = nd >= 1 && nd <= x.dim() && x.sizes().slice(x.dim() - nd) == ns;
  TORCH_CHECK_VALUE(ok, op, ": normalized_shape must be non-empty and equal the trailing dims of x ",
                    tuple_str(x.sizes()), ", got ", tuple_str(ns));
}

inline void check_jet_param(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                            const at::Tensor& x, at::IntArrayRef ns) {
  if (!t.has_value()) return;
  check_jet_like(op, name, *t, x, "x");
  TORCH_CHECK_VALUE(t->sizes() == ns, op, ": ", name, " must have shape normalized_shape = ",
                    tuple_str(ns), ", got ", tuple_str(t->sizes()));
}

// A jet of a parameter needs the parameter: without a weight the scale is the constant 1.
inline void check_jet_param_given(const char* op, const char* name,
                                  const c10::optional<at::Tensor>& jet, const char* param,
                                  const c10::optional<at::Tensor>& p) {
  TORCH_CHECK_VALUE(!jet.has_value() || p.has_value(), op, ": ", name, " was given without ", param,
                    " (without ", param, " there is nothing for its jet to move)");
}

// Returns K.
inline int64_t check_jet_layer_norm_args(
    const at::Tensor& x, const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& x2,
    at::IntArrayRef ns, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight1,
    const c10::optional<at::Tensor>& bias1, const c10::optional<at::Tensor>& weight2,
    const c10::optional<at::Tensor>& bias2) {
  constexpr const char* op = "symfast.jet_layer_norm";
  check_row_primal(op, "x", x);
  check_normalized_shape(op, x, ns);
  check_jet_param(op, "weight", weight, x, ns);
  check_jet_param(op, "bias", bias, x, ns);
  JetDirections dirs;
  check_jet_tangent(op, "x1", x1, x, "x", x.sizes(), "x.shape", dirs);
  check_jet_tangent(op, "x2", x2, x, "x", x.sizes(), "x.shape", dirs);
  check_jet_tangent(op, "weight1", weight1, x, "x", ns, "normalized_shape", dirs);
  check_jet_tangent(op, "bias1", bias1, x, "x", ns, "normalized_shape", dirs);
  check_jet_tangent(op, "weight2", weight2, x, "x", ns, "normalized_shape", dirs);
  check_jet_tangent(op, "bias2", bias2, x, "x", ns, "normalized_shape", dirs);
  check_jet_param_given(op, "weight1", weight1, "weight", weight);
  check_jet_param_given(op, "weight2", weight2, "weight", weight);
  check_jet_param_given(op, "bias1", bias1, "bias", bias);
  check_jet_param_given(op, "bias2", bias2, "bias", bias);
  check_jet_has_directions(op, dirs, "x1, x2, weight1, bias1, weight2, bias2");
  return dirs.k;
}

inline int64_t check_jet_rms_norm_args(const at::Tensor& x, const c10::optional<at::Tensor>& x1,
                                       const c10::optional<at::Tensor>& x2, at::IntArrayRef ns,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& weight1,
                                       const c10::optional<at::Tensor>& weight2) {
  constexpr const char* op = "symfast.jet_rms_norm";
  check_row_primal(op, "x", x);
  check_normalized_shape(op, x, ns);
  check_jet_param(op, "weight", weight, x, ns);
  JetDirections dirs;
  check_jet_tangent(op, "x1", x1, x, "x", x.sizes(), "x.shape", dirs);
  check_jet_tangent(op, "x2", x2, x, "x", x.sizes(), "x.shape", dirs);
  check_jet_tangent(op, "weight1", weight1, x, "x", ns, "normalized_shape", dirs);
  check_jet_tangent(op, "weight2", weight2, x, "x", ns, "normalized_shape", dirs);
  check_jet_param_given(op, "weight1", weight1, "weight", weight);
  check_jet_param_given(op, "weight2", weight2, "weight", weight);
  check_jet_has_directions(op, dirs, "x1, x2, weight1, weight2");
  return dirs.k;
}

// ------------------------------------------------------------------ softmax
// Returns dim in [0, max(x.dim(), 1)): torch treats a 0-d tensor as one row of one element.
inline int64_t check_jet_softmax_args(const at::Tensor& x, const c10::optional<at::Tensor>& x1,
                                      const c10::optional<at::Tensor>& x2, int64_t dim) {
  constexpr const char* op = "symfast.jet_softmax";
  check_row_primal(op, "x", x);
  const int64_t nd = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK_INDEX(dim >= -nd && dim < nd, op, ": dim must be in the range [", -nd, ", ", nd - 1,
                    "] for x with ", x.dim(), " dimension", x.dim() == 1 ? "" : "s", ", got ", dim);
  JetDirections dirs;
  check_jet_tangent(op, "x1", x1, x, "x", x.sizes(), "x.shape", dirs);
  check_jet_tangent(op, "x2", x2, x, "x", x.sizes(), "x.shape", dirs);
  check_jet_has_directions(op, dirs, "x1, x2");
  return dim < 0 ? dim + nd : dim;
}

// ------------------------------------------------------------ cross entropy
inline int64_t check_jet_cross_entropy_args(const at::Tensor& z, const c10::optional<at::Tensor>& z1,
                                            const c10::optional<at::Tensor>& z2,
                                            const at::Tensor& target) {
  constexpr const char* op = "symfast.jet_cross_entropy";
  check_row_primal(op, "z", z);
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must have shape (N, C), got ", tuple_str(z.sizes()));
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                   ": target must hold int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.device() == z.device(), op, ": target must be on z's device (", z.device(),
              "), got ", target.device());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == z.size(0), op,
                    ": target must have shape (N,) = (", z.size(0), ",), got ",
                    tuple_str(target.sizes()));
  JetDirections dirs;
  check_jet_tangent(op, "z1", z1, z, "z", z.sizes(), "z.shape", dirs);
  check_jet_tangent(op, "z2", z2, z, "z", z.sizes(), "z.shape", dirs);
  check_jet_has_directions(op, dirs, "z1, z2");
  return dirs.k;
}

// Every target is a class index in [0, C) or ignore_index. This reads the
// values: a few passes over the N indices with torch ops (cheap next to the
// N x C x K work of the op), and on CUDA one device sync, as a floating dcs
// mask costs; F.cross_entropy asserts on the device instead, which kills the
// CUDA context.
inline void check_cross_entropy_targets(const at::Tensor& target, int64_t classes,
                                        int64_t ignore_index) {
  if (target.numel() == 0) return;
  const at::Tensor bad = at::logical_and(at::logical_or(target.lt(0), target.ge(classes)),
                                         target.ne(ignore_index));
  if (!bad.any().item<bool>()) return;
  const int64_t value = target.masked_select(bad)[0].item<int64_t>();
  TORCH_CHECK_INDEX(false, "symfast.jet_cross_entropy: target must hold class indices in [0, C) = [0, ",
                    classes, ") or ignore_index (", ignore_index, "), got ", value);
}

}  // namespace symfast
