// Fused SiLU for CPU: y = x * sigmoid(x), and its gradient dx = dy * s * (1 + x * (1 - s)).
//
// One pass over memory each way (eager PyTorch's backward of x * sigmoid(x) takes several),
// elements split over OpenMP threads in contiguous slices, 8 fp32 lanes (AVX2) with a
// scalar tail, fp32 arithmetic for fp32/bf16/fp16 storage and fp64 for fp64.
#include "../checks.h"
#include "parallel.h"
#include "silu.h"
#include "vec.h"

#include <cmath>

namespace lime::cpu {
namespace {

constexpr const char* kFwd = "lime::silu_fwd (CPU)";
constexpr const char* kBwd = "lime::silu_bwd (CPU)";

template <typename A> inline A sigmoid(A v) { return A(1) / (A(1) + std::exp(-v)); }

template <typename T>
void silu_fwd_slice(const T* x, T* y, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  int64_t i = begin;
#if LIME_HAVE_AVX2
  if constexpr (HasVec<T>::value) {
    for (; i + kLanes <= end; i += kLanes) {
      const __m256 xv = load8(x + i);
      store8(y + i, _mm256_mul_ps(xv, sigmoid8(xv)));
    }
  }
#endif
  for (; i < end; ++i) {
    const A v = static_cast<A>(x[i]);
    y[i] = static_cast<T>(v * sigmoid(v));
  }
}

template <typename T>
void silu_bwd_slice(const T* dy, const T* x, T* dx, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  int64_t i = begin;
#if LIME_HAVE_AVX2
  if constexpr (HasVec<T>::value) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + kLanes <= end; i += kLanes) {
      const __m256 xv = load8(x + i);
      const __m256 s = sigmoid8(xv);
      // dy * s * (1 + x * (1 - s))
      const __m256 slope = _mm256_fmadd_ps(xv, _mm256_sub_ps(one, s), one);
      store8(dx + i, _mm256_mul_ps(_mm256_mul_ps(load8(dy + i), s), slope));
    }
  }
#endif
  for (; i < end; ++i) {
    const A v = static_cast<A>(x[i]);
    const A s = sigmoid(v);
    dx[i] = static_cast<T>(static_cast<A>(dy[i]) * s * (A(1) + v * (A(1) - s)));
  }
}

// exp and a division per element: a few times the arithmetic of a copy, so split smaller.
int silu_threads(int64_t numel) { return threads_for(numel, 4); }

}  // namespace

void silu_fwd_out(const torch::Tensor& x, torch::Tensor& y) {
  check_device(x, kFwd, "x", c10::DeviceType::CPU);
  check_device(y, kFwd, "y", c10::DeviceType::CPU);
  check_floating(x, kFwd, "x");
  check_contiguous(x, kFwd, "x");
  check_contiguous(y, kFwd, "y");
  check_same_dtype(x, y, kFwd, "x", "y");
  check_same_shape(x, y, kFwd, "x", "y");
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_silu_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    parallel_slices(numel, silu_threads(numel), [&](int64_t begin, int64_t end, int) {
      silu_fwd_slice<scalar_t>(xp, yp, begin, end);
    });
  });
}

torch::Tensor silu_fwd(const torch::Tensor& x) {
  check_device(x, kFwd, "x", c10::DeviceType::CPU);
  torch::Tensor y = torch::empty_like(x, at::MemoryFormat::Contiguous);
  silu_fwd_out(x, y);
  return y;
}

void silu_bwd_out(const torch::Tensor& dy, const torch::Tensor& x, torch::Tensor& dx) {
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, {&x, "x"}, {&dx, "dx"}}) {
    check_device(*t, kBwd, name, c10::DeviceType::CPU);
    check_contiguous(*t, kBwd, name);
  }
  check_floating(x, kBwd, "x");
  check_same_dtype(dy, x, kBwd, "dy", "x");
  check_same_shape(dy, x, kBwd, "dy", "x");
  check_same_dtype(dx, x, kBwd, "dx", "x");
  check_same_shape(dx, x, kBwd, "dx", "x");
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_silu_bwd_cpu", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    parallel_slices(numel, silu_threads(numel), [&](int64_t begin, int64_t end, int) {
      silu_bwd_slice<scalar_t>(dyp, xp, dxp, begin, end);
    });
  });
}

torch::Tensor silu_bwd(const torch::Tensor& dy, const torch::Tensor& x) {
  check_device(x, kBwd, "x", c10::DeviceType::CPU);
  torch::Tensor dx = torch::empty_like(x, at::MemoryFormat::Contiguous);
  silu_bwd_out(dy, x, dx);
  return dx;
}

}  // namespace lime::cpu
