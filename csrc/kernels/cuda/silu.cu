// Fused SiLU for CUDA: y = x * sigmoid(x) and dx = dy * s * (1 + x * (1 - s)), one pass each.
// Grid-stride loops over 16-byte packs (scalars when the size or alignment does not allow),
// fp32 arithmetic for fp32/bf16/fp16 storage.
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

template <typename T, int PACK>
__global__ void silu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t packs) {
  using A = typename Acc<T>::type;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, PACK> xp = reinterpret_cast<const Pack<T, PACK>*>(x)[i];
    Pack<T, PACK> yp;
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      const A v = static_cast<A>(xp.v[k]);
      yp.v[k] = static_cast<T>(v * sigmoid(v));
    }
    reinterpret_cast<Pack<T, PACK>*>(y)[i] = yp;
  }
}

template <typename T, int PACK>
__global__ void silu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                int64_t packs) {
  using A = typename Acc<T>::type;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, PACK> dyp = reinterpret_cast<const Pack<T, PACK>*>(dy)[i];
    const Pack<T, PACK> xp = reinterpret_cast<const Pack<T, PACK>*>(x)[i];
    Pack<T, PACK> dxp;
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      const A v = static_cast<A>(xp.v[k]);
      const A s = sigmoid(v);
      dxp.v[k] = static_cast<T>(static_cast<A>(dyp.v[k]) * s * (A(1) + v * (A(1) - s)));
    }
    reinterpret_cast<Pack<T, PACK>*>(dx)[i] = dxp;
  }
}

// Enough blocks to fill every SM several times over; the grid-stride loop does the rest. The
// SM count comes from ATen's per-device cache of the properties, not a driver call per launch.
unsigned grid_for(int64_t work_items, const at::Device& device) {
  const int64_t sms = device_info(device).multiprocessors;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work_items, kThreads), sms * 16)));
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
      silu_fwd_kernel<scalar_t, P><<<grid_for(numel / P, x.device()), kThreads, 0, stream>>>(xp, yp, numel / P);
    } else {
      silu_fwd_kernel<scalar_t, 1><<<grid_for(numel, x.device()), kThreads, 0, stream>>>(xp, yp, numel);
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
      silu_bwd_kernel<scalar_t, P><<<grid_for(numel / P, x.device()), kThreads, 0, stream>>>(dyp, xp, dxp, numel / P);
    } else {
      silu_bwd_kernel<scalar_t, 1><<<grid_for(numel, x.device()), kThreads, 0, stream>>>(dyp, xp, dxp, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace lime::cuda
