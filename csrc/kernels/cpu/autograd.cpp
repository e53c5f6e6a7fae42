// Autograd for the lime:: operators, in C++ and registered at the dispatcher's Autograd key (for
// every device: the CUDA kernels get it too). It lives in _kernels_cpu because that module defines
// the operators (bindings.cpp).
//
// Why C++: autograd registered from Python (torch.library.register_autograd) runs a Python
// autograd.Function on every call, about 25 us of host time on a CPU, more than the kernels of a
// small layer take; here a call goes Python -> dispatcher -> this -> the kernel, as PyTorch's own
// ops do. torch.compile traces through it as through torchvision's C++ autograd: the forward and
// backward call the operators through the dispatcher (never the kernels directly), so tracing sees
// lime::rms_norm_fwd / lime::rms_norm_bwd and their fake implementations (registered in Python).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lime {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The operators, looked up once (a typed handle: no schema parsing per call).
const auto& rms_norm_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lime::rms_norm_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

const auto& add_rms_norm_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lime::add_rms_norm_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, double)>();
  return op;
}

const auto& rms_norm_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lime::rms_norm_bwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, bool,
                                                                       const std::optional<at::Tensor>&)>();
  return op;
}

const auto& silu_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lime::silu_fwd", "").typed<at::Tensor(const at::Tensor&)>();
  return op;
}

const auto& silu_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lime::silu_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}

// y, rstd = rms_norm_fwd(x, weight, eps); saves x, weight and rstd (one fp32 per row).
class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, rstd] = rms_norm_fwd_op().call(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    ctx->mark_non_differentiable({rstd});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool weight_grad = ctx->needs_input_grad(1);  // a frozen weight: no reduction over rows
    auto [dx, dw] = rms_norm_bwd_op().call(grads[0].contiguous(), saved[0], saved[1], saved[2], weight_grad,
                                           std::nullopt);
    return {dx, weight_grad ? dw : at::Tensor(), at::Tensor()};
  }
};

// h, y, rstd = add_rms_norm_fwd(residual, delta, weight, eps); saves h (the norm's input), weight, rstd.
class AddRMSNormFunction : public torch::autograd::Function<AddRMSNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& residual, const at::Tensor& delta,
                               const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h, y, rstd] = add_rms_norm_fwd_op().call(residual, delta, weight, eps);
    ctx->save_for_backward({h, weight, rstd});
    ctx->mark_non_differentiable({rstd});
    return {h, y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool weight_grad = ctx->needs_input_grad(2);
    // residual and delta both get what reaches h directly plus the norm's gradient: one kernel adds them.
    auto [dx, dw] = rms_norm_bwd_op().call(grads[1].contiguous(), saved[0], saved[1], saved[2], weight_grad,
                                           grads[0].contiguous());
    return {dx, dx, weight_grad ? dw : at::Tensor(), at::Tensor()};
  }
};

// y = silu_fwd(x); saves x.
class SiLUFunction : public torch::autograd::Function<SiLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x});
    return silu_fwd_op().call(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {silu_bwd_op().call(grads[0].contiguous(), ctx->get_saved_variables()[0])};
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto outputs = RMSNormFunction::apply(x, weight, eps);
  return {outputs[0], outputs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_autograd(const at::Tensor& residual,
                                                                         const at::Tensor& delta,
                                                                         const at::Tensor& weight, double eps) {
  auto outputs = AddRMSNormFunction::apply(residual, delta, weight, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

at::Tensor silu_fwd_autograd(const at::Tensor& x) { return SiLUFunction::apply(x); }

}  // namespace
}  // namespace lime

TORCH_LIBRARY_IMPL(lime, Autograd, m) {
  m.impl("rms_norm_fwd", &lime::rms_norm_fwd_autograd);
  m.impl("add_rms_norm_fwd", &lime::add_rms_norm_fwd_autograd);
  m.impl("silu_fwd", &lime::silu_fwd_autograd);
}
