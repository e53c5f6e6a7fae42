// The CUDA fused kernels' host entry points (rms_norm.cu, silu.cu), bound in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lime::cuda {

// x (..., n) contiguous, weight (n,) -> y (..., n) in x's dtype, rstd (...) fp32 (fp64 for fp64 x).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps);
// residual, delta (..., n), weight (n,) -> (residual + delta, rms_norm(residual + delta), rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& residual, const at::Tensor& delta,
                                                                const at::Tensor& weight, double eps);
// dy, x (..., n), weight (n,), rstd (...) -> dx (..., n) in x's dtype, dw (n,) in weight's dtype
// (an empty (0,) tensor when weight_grad is false: no weight gradient is computed). With
// residual_grad (x's shape), dx includes it: add_rms_norm's backward, x being the sum it returned.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd, bool weight_grad,
                                                const std::optional<at::Tensor>& residual_grad);
// x -> x * sigmoid(x); dy, x -> dy * s * (1 + x * (1 - s)).
at::Tensor silu_fwd(const at::Tensor& x);
at::Tensor silu_bwd(const at::Tensor& dy, const at::Tensor& x);

}  // namespace lime::cuda
