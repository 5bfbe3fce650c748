// Input validation of the pointwise jet ops, shared by their CPU and CUDA
// kernels. The Python side (symfast/ops/jet_pointwise.py) checks the same
// things with the same messages before calling an op, and so do the fake
// kernels; these checks guard direct calls of torch.ops.symfast.jet_*.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "dcs_checks.h"
#include "jet_activation_math.h"

namespace symfast {

// "(K, 3, 4)": the shape of a tangent of a primal of the given sizes.
inline std::string jet_shape_str(at::IntArrayRef sizes) {
  std::string out = "(K";
  for (const int64_t s : sizes) out += ", " + std::to_string(s);
  return out + (sizes.empty() ? ",)" : ")");
}

// A dtype as Python prints it, "torch.float32", so that these messages equal
// the Python checks' (at::ScalarType prints as "Float").
inline std::string dtype_str(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline void check_jet_primal(const char* op, const char* name, const at::Tensor& p) {
  TORCH_CHECK(is_supported_float(p.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dtype_str(p.scalar_type()));
}

// The tangents of one primal, [K, *primal.shape], with the primal's dtype and
// device. `k` and `k_from` carry the number of directions and the tangent that
// fixed it across calls (k < 0 while none was seen).
inline void check_jet_tangents(const char* op, const char* pname, const at::Tensor& p,
                               std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>> tangents,
                               int64_t& k, const char*& k_from) {
  for (const auto& [name, opt] : tangents) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = **opt;
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", name, " must have the dtype of ",
                pname, " (", dtype_str(p.scalar_type()), "), got ", dtype_str(t.scalar_type()));
    TORCH_CHECK(t.device() == p.device(), op, ": ", name, " must be on ", pname, "'s device (",
                p.device(), "), got ", t.device());
    TORCH_CHECK(t.dim() == p.dim() + 1 && t.sizes().slice(1) == p.sizes(), op, ": ", name,
                " must have shape (K, *", pname, ".shape) = ", jet_shape_str(p.sizes()), ", got ",
                tuple_str(t.sizes()));
    if (k < 0) {
      k = t.size(0);
      k_from = name;
    } else {
      TORCH_CHECK(t.size(0) == k, op, ": ", name, " must have K = ", k, " directions like ",
                  k_from, ", got shape ", tuple_str(t.sizes()));
    }
  }
}

// Tangents of a per-group gate s: [K, G].
inline void check_jet_gate_tangents(const char* op, const at::Tensor& w, int64_t dim,
                                    std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>> tangents,
                                    int64_t& k, const char*& k_from) {
  for (const auto& [name, opt] : tangents) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = **opt;
    TORCH_CHECK(t.scalar_type() == w.scalar_type(), op, ": ", name,
                " must have the dtype of w (", dtype_str(w.scalar_type()), "), got ",
                dtype_str(t.scalar_type()));
    TORCH_CHECK(t.device() == w.device(), op, ": ", name, " must be on w's device (", w.device(),
                "), got ", t.device());
    TORCH_CHECK(t.dim() == 2 && t.size(1) == w.size(dim), op, ": ", name,
                " must have shape (K, G) = (K, w.shape[dim]) = (K, ", w.size(dim), "), got ",
                tuple_str(t.sizes()));
    if (k < 0) {
      k = t.size(0);
      k_from = name;
    } else {
      TORCH_CHECK(t.size(0) == k, op, ": ", name, " must have K = ", k, " directions like ",
                  k_from, ", got shape ", tuple_str(t.sizes()));
    }
  }
}

// Like check_operand of dcs_checks.h, with shapes printed as Python tuples,
// as the Python checks print them.
inline void check_jet_operand(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& w) {
  TORCH_CHECK(t.scalar_type() == w.scalar_type(), op, ": ", name,
              " must have the dtype of w (", dtype_str(w.scalar_type()), "), got ",
                dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == w.device(), op, ": ", name, " must be on w's device (",
              w.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == w.sizes(), op, ": ", name, " must have w's shape ",
              tuple_str(w.sizes()), ", got ", tuple_str(t.sizes()));
}

inline void check_some_tangent(const char* op, int64_t k, const char* names) {
  TORCH_CHECK(k >= 0, op, ": at least one of ", names,
              " must be given (a tangent fixes the number of directions K)");
}

// Returns the number of directions K and the activation.
inline std::pair<int64_t, Activation> check_jet_activation_args(
    const at::Tensor& x, const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& x2,
    c10::string_view kind, double beta) {
  constexpr const char* op = "symfast.jet_activation";
  int act = -1;
  for (int a = 0; a < kNumActivations; ++a) {
    if (kind == kActivationNames[a]) act = a;
  }
  if (act < 0) {
    std::string names;
    for (int a = 0; a < kNumActivations; ++a) names += (a ? ", " : "") + std::string(kActivationNames[a]);
    TORCH_CHECK(false, op, ": kind must be one of ", names, ", got '", std::string(kind), "'");
  }
  TORCH_CHECK(static_cast<Activation>(act) != Activation::kSoftplus || beta != 0, op,
              ": beta must be nonzero for softplus (it divides), got ", beta);
  check_jet_primal(op, "x", x);
  int64_t k = -1;
  const char* from = nullptr;
  check_jet_tangents(op, "x", x, {{"x1", &x1}, {"x2", &x2}}, k, from);
  check_some_tangent(op, k, "x1, x2");
  return {k, static_cast<Activation>(act)};
}

// Returns K and the mask prepared by prepare_mask (bool, broadcastable to w).
inline std::pair<int64_t, c10::optional<at::Tensor>> check_jet_dcs_args(
    const at::Tensor& w, const at::Tensor& u, const c10::optional<at::Tensor>& v,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& w1,
    const c10::optional<at::Tensor>& u1, const c10::optional<at::Tensor>& v1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& u2,
    const c10::optional<at::Tensor>& v2) {
  constexpr const char* op = "symfast.jet_dcs";
  check_jet_primal(op, "w", w);
  check_jet_operand(op, "u", u, w);
  if (v.has_value()) check_jet_operand(op, "v", *v, w);
  TORCH_CHECK(!v.has_value() || mask.has_value(), op,
              ": v was given without a mask; with mask=None, theta = w * u and v would have no "
              "effect");
  int64_t k = -1;
  const char* from = nullptr;
  check_jet_tangents(op, "w", w,
                     {{"w1", &w1}, {"u1", &u1}, {"v1", &v1}, {"w2", &w2}, {"u2", &u2}, {"v2", &v2}},
                     k, from);
  check_some_tangent(op, k, "w1, u1, v1, w2, u2, v2");
  TORCH_CHECK(!(v1.has_value() || v2.has_value()) || mask.has_value(), op,
              ": v1/v2 were given without a mask; with mask=None dcs has no v input");
  if (mask.has_value()) {
    // prepare_mask's checks in its order, with the shapes printed as in Python.
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": mask must be a bool or floating 0/1 tensor, got ", dtype_str(m.scalar_type()));
    TORCH_CHECK(m.device() == w.device(), op, ": mask must be on w's device (", w.device(),
                "), got ", m.device());
    TORCH_CHECK(at::is_expandable_to(m.sizes(), w.sizes()), op,
                ": mask must broadcast to w's shape ", tuple_str(w.sizes()), ", got ",
                tuple_str(m.sizes()));
  }
  return {k, prepare_mask(op, mask, w)};
}

// Returns K and dim normalized to [0, w.dim()).
inline std::pair<int64_t, int64_t> check_jet_dcs_group_args(
    const at::Tensor& w, const at::Tensor& s, int64_t dim, const c10::optional<at::Tensor>& w1,
    const c10::optional<at::Tensor>& s1, const c10::optional<at::Tensor>& w2,
    const c10::optional<at::Tensor>& s2) {
  constexpr const char* op = "symfast.jet_dcs_group";
  check_jet_primal(op, "w", w);
  dim = check_group_dim(op, w, dim);
  TORCH_CHECK(s.scalar_type() == w.scalar_type(), op, ": s must have the dtype of w (",
              dtype_str(w.scalar_type()), "), got ", dtype_str(s.scalar_type()));
  check_group_gate(op, "s", s, w, dim);
  int64_t k = -1;
  const char* from = nullptr;
  check_jet_tangents(op, "w", w, {{"w1", &w1}, {"w2", &w2}}, k, from);
  check_jet_gate_tangents(op, w, dim, {{"s1", &s1}, {"s2", &s2}}, k, from);
  check_some_tangent(op, k, "w1, s1, w2, s2");
  return {k, dim};
}

}  // namespace symfast
