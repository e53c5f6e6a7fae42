// Fused RMSNorm for CPU tensors (rms_norm.cpp has the maths).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace lime::cpu {

// x (..., n) contiguous, weight (n,) -> y (..., n) in x's dtype, rstd (...) in fp32 (fp64 for fp64 x).
std::tuple<torch::Tensor, torch::Tensor> rms_norm_fwd(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// residual, delta (..., n), weight (n,) -> (residual + delta, rms_norm(residual + delta), rstd).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> add_rms_norm_fwd(const torch::Tensor& residual,
                                                                         const torch::Tensor& delta,
                                                                         const torch::Tensor& weight, double eps);

// dy, x (..., n), weight (n,), rstd (...) from the forward -> dx (..., n) in x's dtype, dw (n,) in weight's dtype
// (an empty (0,) tensor when weight_grad is false: no weight gradient is computed). With residual_grad
// (add_rms_norm's backward, x being the sum it returned), dx includes it.
std::tuple<torch::Tensor, torch::Tensor> rms_norm_bwd(const torch::Tensor& dy, const torch::Tensor& x,
                                                      const torch::Tensor& weight, const torch::Tensor& rstd,
                                                      bool weight_grad,
                                                      const std::optional<torch::Tensor>& residual_grad);

}  // namespace lime::cpu
