// Input validation shared by the CPU and CUDA kernels of the dcs ops.
//
// The Python wrapper (symfast/_ops.py) checks the same things before calling
// an op, with Python exceptions; these checks guard direct calls of
// torch.ops.symfast.* so that bad input is an error, never a crash.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/Optional.h>

namespace symfast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `w` is the tensor that fixes dtype, device and shape for the others.
inline void check_operand(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& w) {
  TORCH_CHECK(t.scalar_type() == w.scalar_type(), op, ": ", name,
              " must have the dtype of w (", w.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == w.device(), op, ": ", name, " must be on w's device (",
              w.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == w.sizes(), op, ": ", name, " must have w's shape ", w.sizes(),
              ", got ", t.sizes());
}

inline void check_primal(const char* op, const at::Tensor& w) {
  TORCH_CHECK(is_supported_float(w.scalar_type()), op,
              ": w must be float32, float64, float16 or bfloat16, got ", w.scalar_type());
}

// Returns the mask as a bool tensor (a view of the input when it already is
// one). A floating mask must hold only 0 and 1: it is checked here, which
// costs one extra pass (and a device sync on CUDA), so bool masks are the fast
// path.
inline c10::optional<at::Tensor> prepare_mask(const char* op,
                                              const c10::optional<at::Tensor>& mask,
                                              const at::Tensor& w) {
  if (!mask.has_value()) return c10::nullopt;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
              ": mask must be a bool or floating 0/1 tensor, got ", m.scalar_type());
  TORCH_CHECK(m.device() == w.device(), op, ": mask must be on w's device (", w.device(),
              "), got ", m.device());
  TORCH_CHECK(at::is_expandable_to(m.sizes(), w.sizes()), op,
              ": mask must broadcast to w's shape ", w.sizes(), ", got ", m.sizes());
  if (m.scalar_type() == at::kBool) return m;
  const bool binary = at::logical_or(m.eq(0), m.eq(1)).all().item<bool>();
  TORCH_CHECK(binary, op, ": a floating mask must hold only 0 and 1, got other values");
  return m.ne(0);
}

}  // namespace symfast

namespace symfast {

// The full argument checks of each op, shared by the CPU and CUDA kernels so
// they cannot drift apart. Each returns the mask prepared by prepare_mask.
inline c10::optional<at::Tensor> check_dcs_args(const at::Tensor& w, const at::Tensor& u,
                                                const c10::optional<at::Tensor>& v,
                                                const c10::optional<at::Tensor>& mask) {
  constexpr const char* op = "symfast.dcs";
  check_primal(op, w);
  check_operand(op, "u", u, w);
  if (v.has_value()) check_operand(op, "v", *v, w);
  TORCH_CHECK(!v.has_value() || mask.has_value(), op,
              ": v was given without a mask; with mask=None, theta = w * u and v would have no "
              "effect");
  return prepare_mask(op, mask, w);
}

inline c10::optional<at::Tensor> check_dcs_backward_args(const at::Tensor& grad,
                                                         const at::Tensor& w, const at::Tensor& u,
                                                         const c10::optional<at::Tensor>& mask,
                                                         bool v_needed) {
  constexpr const char* op = "symfast.dcs_backward";
  check_primal(op, w);
  check_operand(op, "u", u, w);
  check_operand(op, "grad", grad, w);
  TORCH_CHECK(!v_needed || mask.has_value(), op,
              ": v_needed=True requires a mask (without one, dcs has no v input)");
  return prepare_mask(op, mask, w);
}

// The flags of dcs_backward (w, u, v gradients) and dcs_jvp (w, u, v tangents)
// that can reach a kernel: at least one is set (the ops return early
// otherwise), and the third only with a mask (the checks above and below
// reject it without one: v exists only with a mask). Kernels are compiled for
// these combinations only.
constexpr bool dcs_flags_occur(bool a, bool b, bool c, bool has_mask) {
  return (a || b || c) && (has_mask || !c);
}

inline c10::optional<at::Tensor> check_dcs_jvp_args(const at::Tensor& w, const at::Tensor& u,
                                                    const c10::optional<at::Tensor>& mask,
                                                    const c10::optional<at::Tensor>& w_dot,
                                                    const c10::optional<at::Tensor>& u_dot,
                                                    const c10::optional<at::Tensor>& v_dot) {
  constexpr const char* op = "symfast.dcs_jvp";
  check_primal(op, w);
  check_operand(op, "u", u, w);
  if (w_dot.has_value()) check_operand(op, "w_dot", *w_dot, w);
  if (u_dot.has_value()) check_operand(op, "u_dot", *u_dot, w);
  if (v_dot.has_value()) check_operand(op, "v_dot", *v_dot, w);
  TORCH_CHECK(!v_dot.has_value() || mask.has_value(), op,
              ": v_dot was given without a mask; with mask=None dcs has no v input");
  return prepare_mask(op, mask, w);
}

}  // namespace symfast

// ------------------------------------------------------------------ dcs_group
// theta = w * s broadcast along `dim`: w is seen as [outer, G, inner] (G =
// w.shape[dim]), and s, the gate, has shape (G,).
namespace symfast {

// Sizes as a Python tuple, "(5,)" or "(3, 4)", so that the C++ messages read
// like the Python ones (symfast/_ops_group.py) and like the shapes users type.
inline std::string tuple_str(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t k = 0; k < sizes.size(); ++k) {
    if (k > 0) out += ", ";
    out += std::to_string(sizes[k]);
  }
  return out + (sizes.size() == 1 ? ",)" : ")");
}

// w must have a dimension to group along; returns dim in [0, w.dim()).
// An out-of-range dim is an IndexError, as in torch.
inline int64_t check_group_dim(const char* op, const at::Tensor& w, int64_t dim) {
  const int64_t nd = w.dim();
  TORCH_CHECK(nd >= 1, op, ": w must have at least one dimension (groups run along dim), got a 0-d tensor");
  TORCH_CHECK_INDEX(dim >= -nd && dim < nd, op, ": dim must be in the range [", -nd, ", ", nd - 1,
                    "] for w with ", nd, " dimension", nd == 1 ? "" : "s", ", got ", dim);
  return dim < 0 ? dim + nd : dim;
}

// A per-group operand (s, s_dot): w's dtype and device, shape (w.shape[dim],).
inline void check_group_gate(const char* op, const char* name, const at::Tensor& s,
                             const at::Tensor& w, int64_t dim) {
  TORCH_CHECK(s.scalar_type() == w.scalar_type(), op, ": ", name,
              " must have the dtype of w (", w.scalar_type(), "), got ", s.scalar_type());
  TORCH_CHECK(s.device() == w.device(), op, ": ", name, " must be on w's device (", w.device(),
              "), got ", s.device());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == w.size(dim), op, ": ", name,
              " must have shape (G,) = (w.shape[dim],) = (", w.size(dim), ",), got ",
              tuple_str(s.sizes()));
}

// The full argument checks of the dcs_group ops, shared by the CPU and CUDA
// kernels. Each returns dim normalized to [0, w.dim()).
inline int64_t check_dcs_group_args(const at::Tensor& w, const at::Tensor& s, int64_t dim) {
  constexpr const char* op = "symfast.dcs_group";
  check_primal(op, w);
  dim = check_group_dim(op, w, dim);
  check_group_gate(op, "s", s, w, dim);
  return dim;
}

inline int64_t check_dcs_group_backward_args(const at::Tensor& grad, const at::Tensor& w,
                                             const at::Tensor& s, int64_t dim) {
  constexpr const char* op = "symfast.dcs_group_backward";
  check_primal(op, w);
  dim = check_group_dim(op, w, dim);
  check_group_gate(op, "s", s, w, dim);
  check_operand(op, "grad", grad, w);
  return dim;
}

inline int64_t check_dcs_group_jvp_args(const at::Tensor& w, const at::Tensor& s, int64_t dim,
                                        const c10::optional<at::Tensor>& w_dot,
                                        const c10::optional<at::Tensor>& s_dot) {
  constexpr const char* op = "symfast.dcs_group_jvp";
  check_primal(op, w);
  dim = check_group_dim(op, w, dim);
  check_group_gate(op, "s", s, w, dim);
  if (w_dot.has_value()) check_operand(op, "w_dot", *w_dot, w);
  if (s_dot.has_value()) check_group_gate(op, "s_dot", *s_dot, w, dim);
  return dim;
}

}  // namespace symfast
