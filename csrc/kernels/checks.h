// Input checks shared by the CPU and CUDA bindings of the fused kernels.
//
// Every check names the op and the argument, and says what was expected and what came in,
// so a wrong call fails with a message a user can act on instead of a segfault.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace lime {

inline void check_device(const at::Tensor& t, const char* op, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first), got shape ",
              t.sizes(), " with strides ", t.strides());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
              ": ", name, " must be float32, bfloat16, float16 or float64, got ", dtype);
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                             const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                             const char* name_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", name_a, " and ", name_b, " must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
}

// x (..., n) with weight (n,): the last dimension is normalised.
inline void check_rms_norm_shapes(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape (",
              x.size(-1), ",) to match the last dimension of x ", x.sizes(), ", got ", weight.sizes());
  TORCH_CHECK(x.size(-1) > 0, op, ": the normalised dimension of x must not be empty, got shape ", x.sizes());
}

// rstd holds one value per row of x: shape x.shape[:-1], float32 (float64 for float64 inputs).
inline void check_rstd(const at::Tensor& rstd, const at::Tensor& x, const char* op) {
  const auto expected = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.scalar_type() == expected, op, ": rstd must be ", expected, " for x of dtype ",
              x.scalar_type(), ", got ", rstd.scalar_type());
  TORCH_CHECK(rstd.numel() * x.size(-1) == x.numel(), op, ": rstd must hold one value per row of x ", x.sizes(),
              " (", x.numel() / x.size(-1), " values), got shape ", rstd.sizes());
}

}  // namespace lime
