// C++ autograd for the first-order training path: symfast::_dcs_autograd and
// symfast::_dcs_group_autograd.
//
// symfast.dcs / symfast.dcs_group have two eager paths (symfast/_ops.py):
//
// * a torch.autograd.Function with backward, jvp and vmap. It is needed under
//   torch.func transforms and forward-mode AD, which a C++ custom Function
//   does not support;
// * these two ops, used whenever neither is active (ordinary training). Their
//   graph node is a C++ torch::autograd::Function, so the forward and the
//   backward of a training step never enter Python: for a small MLP the Python
//   round trip of an autograd.Function would be a large share of the cost of
//   the parametrization (docs/perf.md).
//
// The backward calls symfast::dcs_backward / dcs_group_backward. Under
// create_graph (grad mode on in backward) it goes through the dispatcher, so
// the registered autograd of those ops makes it differentiable again (double
// backward, gradgradcheck). Otherwise nothing can record it, and it runs
// below autograd, straight to the device kernel.
//
// Both ops are CompositeImplicitAutograd: the kernel is the same on every
// device, and the arguments are checked by symfast::dcs itself.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace symfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

at::Tensor call_dcs(const at::Tensor& w, const at::Tensor& u, const OptTensor& v, const OptTensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("symfast::dcs", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&)>();
  return op.call(w, u, v, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_dcs_backward(const at::Tensor& grad, const at::Tensor& w,
                                                                 const at::Tensor& u, const OptTensor& mask,
                                                                 bool w_needed, bool u_needed, bool v_needed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("symfast::dcs_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, bool, bool,
                           bool)>();
  return op.call(grad, w, u, mask, w_needed, u_needed, v_needed);
}

at::Tensor call_dcs_group(const at::Tensor& w, const at::Tensor& s, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("symfast::dcs_group", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(w, s, dim);
}

std::tuple<at::Tensor, at::Tensor> call_dcs_group_backward(const at::Tensor& grad, const at::Tensor& w,
                                                           const at::Tensor& s, int64_t dim, bool w_needed,
                                                           bool s_needed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("symfast::dcs_group_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t, bool, bool)>();
  return op.call(grad, w, s, dim, w_needed, s_needed);
}

}  // namespace

// Graph nodes show as torch::autograd::CppNode<symfast::DCSFunction> (.name()).
class DCSFunction : public torch::autograd::Function<DCSFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& w, const at::Tensor& u, const OptTensor& v,
                            const OptTensor& mask) {
    // Only the factors and the (constant) mask are saved: theta is not.
    ctx->save_for_backward({w, u, mask.has_value() ? *mask : at::Tensor()});
    ctx->saved_data["has_v"] = v.has_value() && v->defined();
    // Below autograd: this node is the autograd of the call, and stopping at
    // the raw op's registered (Python) autograd kernel on the way would cost a
    // Python call per forward.
    at::AutoDispatchBelowADInplaceOrView below;
    return call_dcs(w, u, v, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const OptTensor mask = saved[2].defined() ? OptTensor(saved[2]) : c10::nullopt;
    const bool w_needed = ctx->needs_input_grad(0);
    const bool u_needed = ctx->needs_input_grad(1);
    // needs_input_grad counts graph edges, one per tensor given: v is edge 2
    // when it was given (a missing optional has none).
    const bool v_needed = ctx->saved_data["has_v"].toBool() && mask.has_value() && ctx->needs_input_grad(2);
    if (!grad.defined() || !(w_needed || u_needed || v_needed)) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
    if (at::GradMode::is_enabled()) {  // create_graph: stay differentiable
      out = call_dcs_backward(grad, saved[0], saved[1], mask, w_needed, u_needed, v_needed);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      out = call_dcs_backward(grad, saved[0], saved[1], mask, w_needed, u_needed, v_needed);
    }
    return {w_needed ? std::get<0>(out) : at::Tensor(), u_needed ? std::get<1>(out) : at::Tensor(),
            v_needed ? std::get<2>(out) : at::Tensor(), at::Tensor()};
  }
};

class DCSGroupFunction : public torch::autograd::Function<DCSGroupFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& w, const at::Tensor& s, int64_t dim) {
    ctx->save_for_backward({w, s});
    ctx->saved_data["dim"] = dim;
    at::AutoDispatchBelowADInplaceOrView below;  // as in DCSFunction::forward
    return call_dcs_group(w, s, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const bool w_needed = ctx->needs_input_grad(0);
    const bool s_needed = ctx->needs_input_grad(1);
    if (!grad.defined() || !(w_needed || s_needed)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    std::tuple<at::Tensor, at::Tensor> out;
    if (at::GradMode::is_enabled()) {
      out = call_dcs_group_backward(grad, saved[0], saved[1], dim, w_needed, s_needed);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      out = call_dcs_group_backward(grad, saved[0], saved[1], dim, w_needed, s_needed);
    }
    return {w_needed ? std::get<0>(out) : at::Tensor(), s_needed ? std::get<1>(out) : at::Tensor(), at::Tensor()};
  }
};

namespace {

at::Tensor dcs_autograd(const at::Tensor& w, const at::Tensor& u, const OptTensor& v, const OptTensor& mask) {
  return DCSFunction::apply(w, u, v, mask);
}

at::Tensor dcs_group_autograd(const at::Tensor& w, const at::Tensor& s, int64_t dim) {
  return DCSGroupFunction::apply(w, s, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CompositeImplicitAutograd, m) {
  m.impl("_dcs_autograd", &dcs_autograd);
  m.impl("_dcs_group_autograd", &dcs_group_autograd);
}

}  // namespace symfast
