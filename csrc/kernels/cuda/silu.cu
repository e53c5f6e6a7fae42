// Fused SiLU for CUDA: y = x * sigmoid(x) and dx = dy * s * (1 + x * (1 - s)), one pass each.
//
// Each thread moves kPacksPerThread 16-byte packs per tensor (scalars when the size or the
// alignment does not allow packs), all loads issued before any arithmetic, so a warp has
// 2 KB per tensor in flight; pack u of thread t is the block's item u * kThreads + t, so each
// round of loads is coalesced. Only the last block checks bounds. fp32 arithmetic for
// fp32/bf16/fp16 storage, with the hardware's exp and reciprocal (common.cuh: sigmoid): no
// IEEE division in either direction.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace lime::cuda {
namespace {

constexpr const char* kFwd = "lime::silu_fwd (CUDA)";
constexpr const char* kBwd = "lime::silu_bwd (CUDA)";
constexpr int kThreads = 256;
constexpr int kPacksPerThread = 4;
constexpr int64_t kItemsPerBlock = static_cast<int64_t>(kThreads) * kPacksPerThread;

template <typename T, int PACK>
__device__ __forceinline__ Pack<T, PACK> silu_pack(const Pack<T, PACK>& xp) {
  using A = typename Acc<T>::type;
  Pack<T, PACK> yp;
#pragma unroll
  for (int k = 0; k < PACK; ++k) {
    const A v = static_cast<A>(xp.v[k]);
    yp.v[k] = static_cast<T>(v * sigmoid(v));
  }
  return yp;
}

template <typename T, int PACK>
__device__ __forceinline__ Pack<T, PACK> silu_grad_pack(const Pack<T, PACK>& dyp, const Pack<T, PACK>& xp) {
  using A = typename Acc<T>::type;
  Pack<T, PACK> dxp;
#pragma unroll
  for (int k = 0; k < PACK; ++k) {
    const A v = static_cast<A>(xp.v[k]);
    const A s = sigmoid(v);
    // dy * s * (1 + x * (1 - s))
    dxp.v[k] = static_cast<T>(static_cast<A>(dyp.v[k]) * s * (A(1) + v * (A(1) - s)));
  }
  return dxp;
}

// `items` packs of PACK elements; this block's are [blockIdx.x * kItemsPerBlock, + kItemsPerBlock).
template <typename T, int PACK>
__global__ void __launch_bounds__(kThreads) silu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                            int64_t items) {
  using P = Pack<T, PACK>;
  const P* in = reinterpret_cast<const P*>(x);
  P* out = reinterpret_cast<P*>(y);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x;
  P xp[kPacksPerThread];
  if (first + (kPacksPerThread - 1) * kThreads < items) {  // a whole block: no bounds checks
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) xp[u] = in[first + u * kThreads];
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) out[first + u * kThreads] = silu_pack<T, PACK>(xp[u]);
    return;
  }
#pragma unroll
  for (int u = 0; u < kPacksPerThread; ++u) {
    if (first + u * kThreads < items) xp[u] = in[first + u * kThreads];
  }
#pragma unroll
  for (int u = 0; u < kPacksPerThread; ++u) {
    if (first + u * kThreads < items) out[first + u * kThreads] = silu_pack<T, PACK>(xp[u]);
  }
}

template <typename T, int PACK>
__global__ void __launch_bounds__(kThreads) silu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                            T* __restrict__ dx, int64_t items) {
  using P = Pack<T, PACK>;
  const P* grad = reinterpret_cast<const P*>(dy);
  const P* in = reinterpret_cast<const P*>(x);
  P* out = reinterpret_cast<P*>(dx);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x;
  P dyp[kPacksPerThread], xp[kPacksPerThread];
  if (first + (kPacksPerThread - 1) * kThreads < items) {
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) {
      dyp[u] = grad[first + u * kThreads];
      xp[u] = in[first + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) out[first + u * kThreads] = silu_grad_pack<T, PACK>(dyp[u], xp[u]);
    return;
  }
#pragma unroll
  for (int u = 0; u < kPacksPerThread; ++u) {
    if (first + u * kThreads < items) {
      dyp[u] = grad[first + u * kThreads];
      xp[u] = in[first + u * kThreads];
    }
  }
#pragma unroll
  for (int u = 0; u < kPacksPerThread; ++u) {
    if (first + u * kThreads < items) out[first + u * kThreads] = silu_grad_pack<T, PACK>(dyp[u], xp[u]);
  }
}

// One block per kItemsPerBlock items: no grid-stride loop, so every thread's loads are issued at once.
unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(items, kItemsPerBlock)));
}

}  // namespace

at::Tensor silu_fwd(const at::Tensor& x) {
  check_device(x, kFwd, "x", c10::DeviceType::CUDA);
  check_floating(x, kFwd, "x");
  check_contiguous(x, kFwd, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_silu_fwd_cuda", [&] {
    constexpr int P = pack_size<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (numel % P == 0 && aligned_for_packs({xp, yp})) {
      silu_fwd_kernel<scalar_t, P><<<grid_for(numel / P), kThreads, 0, stream>>>(xp, yp, numel / P);
    } else {
      silu_fwd_kernel<scalar_t, 1><<<grid_for(numel), kThreads, 0, stream>>>(xp, yp, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor silu_bwd(const at::Tensor& dy, const at::Tensor& x) {
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, {&x, "x"}}) {
    check_device(*t, kBwd, name, c10::DeviceType::CUDA);
    check_contiguous(*t, kBwd, name);
  }
  TORCH_CHECK(dy.device() == x.device(), kBwd, ": dy and x must be on the same GPU, got ", dy.device(), " and ",
              x.device());
  check_floating(x, kBwd, "x");
  check_same_dtype(dy, x, kBwd, "dy", "x");
  check_same_shape(dy, x, kBwd, "dy", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return dx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_silu_bwd_cuda", [&] {
    constexpr int P = pack_size<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    if (numel % P == 0 && aligned_for_packs({dyp, xp, dxp})) {
      silu_bwd_kernel<scalar_t, P><<<grid_for(numel / P), kThreads, 0, stream>>>(dyp, xp, dxp, numel / P);
    } else {
      silu_bwd_kernel<scalar_t, 1><<<grid_for(numel), kThreads, 0, stream>>>(dyp, xp, dxp, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace lime::cuda
