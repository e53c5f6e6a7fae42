// Fused RMSNorm for CUDA: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.
//
// Forward:  a warp per row (kRowsPerBlock rows per block). Each lane reads 16-byte packs
//           when the row length and pointers allow it (scalars otherwise), accumulates
//           sum(x^2) in fp32, the warp sums it with shuffles, and a second pass over the
//           row (now in L1/L2, not HBM) writes y once. rstd is stored, one fp32 per row.
// Backward: dx by a warp per row, as on CPU:
//             dx = r * w * dy - x * (r^3 / n) * sum(dy * w * x)
//           dweight = sum over rows of dy * x * r, in two stages: blocks of 32 columns x
//           kGradRows threads sum a chunk of rows into a partial row (fp32, in a
//           chunks x n buffer), then one thread per column sums the partials and casts.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace lime::cuda {
namespace {

constexpr const char* kFwd = "lime::rms_norm_fwd (CUDA)";
constexpr const char* kBwd = "lime::rms_norm_bwd (CUDA)";
constexpr int kRowsPerBlock = 4;   // warps per block in the row kernels
constexpr int kGradRows = 8;       // threadIdx.y extent of the weight-gradient kernel
// Stage-1 chunks: 128 x ceil(n / 32) blocks fill an H100 at n = 1536, and stage 2 sums only
// 128 partials per column.
constexpr int kMaxGradChunks = 128;

template <typename T, typename A, int PACK>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const A* __restrict__ w, T* __restrict__ y,
                                    A* __restrict__ rstd, int64_t rows, int64_t n, A eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  A sum_sq = 0;
#pragma unroll 4  // several packs in flight per lane: a row is only a few packs long
  for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
    const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(xr + j);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      const A v = static_cast<A>(xp.v[k]);
      sum_sq += v * v;
    }
  }
  sum_sq = warp_sum(sum_sq);
  const A r = reciprocal_sqrt(sum_sq / static_cast<A>(n) + eps);
  if (lane == 0) rstd[row] = r;
#pragma unroll 4
  for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
    const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(xr + j);
    Pack<T, PACK> yp;
#pragma unroll
    for (int k = 0; k < PACK; ++k) yp.v[k] = static_cast<T>(static_cast<A>(xp.v[k]) * r * w[j + k]);
    *reinterpret_cast<Pack<T, PACK>*>(yr + j) = yp;
  }
}

template <typename T, typename A, int PACK>
__global__ void rms_norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ w,
                                       const A* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int64_t n) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T* dyr = dy + row * n;
  const T* xr = x + row * n;
  T* dxr = dx + row * n;
  const A r = rstd[row];
  A dot = 0;  // sum(dy * w * x)
#pragma unroll 4
  for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
    const Pack<T, PACK> dyp = *reinterpret_cast<const Pack<T, PACK>*>(dyr + j);
    const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(xr + j);
#pragma unroll
    for (int k = 0; k < PACK; ++k) dot += static_cast<A>(dyp.v[k]) * w[j + k] * static_cast<A>(xp.v[k]);
  }
  dot = warp_sum(dot);
  const A c = dot * r * r * r / static_cast<A>(n);
#pragma unroll 4
  for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
    const Pack<T, PACK> dyp = *reinterpret_cast<const Pack<T, PACK>*>(dyr + j);
    const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(xr + j);
    Pack<T, PACK> dxp;
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      dxp.v[k] = static_cast<T>(r * (w[j + k] * static_cast<A>(dyp.v[k])) - c * static_cast<A>(xp.v[k]));
    }
    *reinterpret_cast<Pack<T, PACK>*>(dxr + j) = dxp;
  }
}

// Stage 1: block (32 columns, kGradRows) sums rows [chunk * rows_per_chunk, ...) of
// dy * x * rstd for its 32 columns: warps read 32 consecutive columns (coalesced).
template <typename T, typename A>
__global__ void rms_norm_dw_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                           const A* __restrict__ rstd, A* __restrict__ partial, int64_t rows,
                                           int64_t n, int64_t rows_per_chunk) {
  __shared__ A sums[kGradRows][kWarpSize + 1];  // +1: no bank conflicts on the column-wise read
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = min(rows, begin + rows_per_chunk);
  A acc = 0;
  if (col < n) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kGradRows) {
      acc += static_cast<A>(dy[row * n + col]) * static_cast<A>(x[row * n + col]) * rstd[row];
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    A total = 0;
#pragma unroll
    for (int k = 0; k < kGradRows; ++k) total += sums[k][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * n + col] = total;
  }
}

// Stage 2: one thread per column sums the chunks' partial rows and casts to the weight dtype.
// The running sum is fp64: it adds up to kMaxGradChunks partials, a long chain for fp32.
template <typename A, typename W>
__global__ void rms_norm_dw_final_kernel(const A* __restrict__ partial, W* __restrict__ dw, int64_t chunks,
                                         int64_t n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  double total = 0;
#pragma unroll 8
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * n + col];
  dw[col] = static_cast<W>(total);
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Packs of 16 bytes when the row length is a multiple of the pack and the pointers are aligned.
template <typename T>
bool can_use_packs(int64_t n, std::initializer_list<const void*> pointers) {
  return n % pack_size<T>() == 0 && aligned_for_packs(pointers);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_device(x, kFwd, "x", c10::DeviceType::CUDA);
  check_device(weight, kFwd, "weight", c10::DeviceType::CUDA);
  check_floating(x, kFwd, "x");
  check_floating(weight, kFwd, "weight");
  check_contiguous(x, kFwd, "x");
  check_rms_norm_shapes(x, weight, kFwd);
  TORCH_CHECK(x.device() == weight.device(), kFwd, ": x and weight must be on the same GPU, got ", x.device(),
              " and ", weight.device());
  TORCH_CHECK(eps >= 0, kFwd, ": eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
  if (rows == 0) return {y, rstd};
  const at::Tensor w = weight.to(acc_dtype(x)).contiguous();
  const dim3 block(kWarpSize, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_fwd_cuda", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int P = pack_size<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (can_use_packs<scalar_t>(n, {xp, yp})) {
      rms_norm_fwd_kernel<scalar_t, A, P><<<grid, block, 0, stream>>>(xp, w.data_ptr<A>(), yp, rstd.data_ptr<A>(),
                                                                        rows, n, static_cast<A>(eps));
    } else {
      rms_norm_fwd_kernel<scalar_t, A, 1><<<grid, block, 0, stream>>>(xp, w.data_ptr<A>(), yp, rstd.data_ptr<A>(),
                                                                        rows, n, static_cast<A>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, {&x, "x"}, {&weight, "weight"}, {&rstd, "rstd"}}) {
    check_device(*t, kBwd, name, c10::DeviceType::CUDA);
    check_contiguous(*t, kBwd, name);
    TORCH_CHECK(t->device() == x.device(), kBwd, ": ", name, " must be on ", x.device(), ", got ", t->device());
  }
  check_floating(x, kBwd, "x");
  check_floating(weight, kBwd, "weight");
  check_rms_norm_shapes(x, weight, kBwd);
  check_same_dtype(dy, x, kBwd, "dy", "x");
  check_same_shape(dy, x, kBwd, "dy", "x");
  check_rstd(rstd, x, kBwd);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dw = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (rows == 0) return {dx, dw.zero_()};
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor w = weight.to(acc).contiguous();
  // Enough chunks to fill the GPU, each at least kGradRows rows long.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxGradChunks, rows / kGradRows));
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  at::Tensor partial = at::empty({chunks, n}, x.options().dtype(acc));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_bwd_cuda", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int P = pack_size<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const A* wp = w.data_ptr<A>();
    const A* rp = rstd.data_ptr<A>();
    const dim3 row_block(kWarpSize, kRowsPerBlock);
    const dim3 row_grid(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)));
    if (can_use_packs<scalar_t>(n, {dyp, xp, dxp})) {
      rms_norm_bwd_dx_kernel<scalar_t, A, P><<<row_grid, row_block, 0, stream>>>(dyp, xp, wp, rp, dxp, rows, n);
    } else {
      rms_norm_bwd_dx_kernel<scalar_t, A, 1><<<row_grid, row_block, 0, stream>>>(dyp, xp, wp, rp, dxp, rows, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grad_block(kWarpSize, kGradRows);
    const dim3 grad_grid(static_cast<unsigned>(ceil_div(n, kWarpSize)), static_cast<unsigned>(chunks));
    rms_norm_dw_partial_kernel<scalar_t, A><<<grad_grid, grad_block, 0, stream>>>(dyp, xp, rp, partial.data_ptr<A>(),
                                                                                  rows, n, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "lime_rms_norm_dw_cuda", [&] {
      constexpr int kThreads = 256;
      rms_norm_dw_final_kernel<A, scalar_t><<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
          partial.data_ptr<A>(), dw.data_ptr<scalar_t>(), chunks, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw};
}

}  // namespace lime::cuda
