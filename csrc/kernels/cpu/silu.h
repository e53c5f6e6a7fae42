// Fused SiLU for CPU tensors (silu.cpp has the maths).
#pragma once

#include <torch/extension.h>

namespace lime::cpu {

// x (any shape, contiguous) -> y = x * sigmoid(x), same shape and dtype.
torch::Tensor silu_fwd(const torch::Tensor& x);
void silu_fwd_out(const torch::Tensor& x, torch::Tensor& y);

// dy, x (same shape) -> dx = dy * s * (1 + x * (1 - s)) with s = sigmoid(x).
torch::Tensor silu_bwd(const torch::Tensor& dy, const torch::Tensor& x);
void silu_bwd_out(const torch::Tensor& dy, const torch::Tensor& x, torch::Tensor& dx);

}  // namespace lime::cpu
