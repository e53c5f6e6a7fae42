// Fused RMSNorm for CUDA: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.
//
// Forward:  a warp per row (kRowsPerBlock rows per block). Each lane reads 16-byte packs of x
//           when the row length and pointers allow it (scalars otherwise), and the weight as
//           packs of the same number of elements (one or two 16-byte loads, not one load per
//           element), accumulates sum(x^2) in fp32, the warp sums it with shuffles, and a
//           second pass over the row (now in L1/L2, not HBM) writes y once. rstd is stored,
//           one fp32 per row.
// Backward: with r = rstd and n the row length,
//             dx = r * w * dy - x * (r^3 / n) * sum(dy * w * x)
//             dw = sum over rows of dy * x * r
//           Warps stride over rows; the pass that writes dx also adds dy * x * r into the
//           warp's own fp32 row of shared memory, so dy and x are read once for both
//           gradients. Each block then sums its warps' rows into one partial row (fp32, a
//           blocks x n buffer), and a small kernel sums the partial rows per column (fp64)
//           and casts to the weight's dtype. Rows too wide for the shared rows (n > 3072 in
//           fp32) take a separate weight-gradient pass instead. With weight_grad false
//           (the weight needs no gradient) no weight gradient is computed at all.
// The weight is read in its own dtype (bf16 weights with bf16 activations, or fp32 master
// weights with bf16 activations): no converted copy is allocated per call.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace lime::cuda {
namespace {

constexpr const char* kFwd = "lime::rms_norm_fwd (CUDA)";
constexpr const char* kBwd = "lime::rms_norm_bwd (CUDA)";
constexpr int kRowsPerBlock = 4;       // warps per block in the forward kernel
constexpr int kMaxBwdWarps = 8;        // warps per block in the backward kernel (fewer when n is wide)
constexpr int kBwdBlocksPerSm = 2;     // backward grid: blocks per SM (each block writes one partial row)
constexpr size_t kMaxSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit of a block
constexpr int kGradRows = 8;           // threadIdx.y extent of the separate weight-gradient pass
constexpr int kFinalRows = 16;         // threadIdx.y extent of the partial-row reduction
constexpr int kMaxGradChunks = 128;    // partial rows of the separate weight-gradient pass

// Where column `col` of a warp's shared gradient row lives. Lane l owns columns
// l * PACK + t * 32 * PACK + [0, PACK); storing element k of that pack at
// t * 32 * PACK + k * 32 + l makes the 32 lanes of a warp touch 32 consecutive words
// (no bank conflicts). A row is padded up to a multiple of 32 * PACK.
template <int PACK>
__device__ __forceinline__ int64_t shared_index(int64_t col) {
  const int64_t group = col / (kWarpSize * PACK);
  const int64_t rem = col % (kWarpSize * PACK);
  return group * kWarpSize * PACK + (rem % PACK) * kWarpSize + rem / PACK;
}

template <int PACK>
__host__ __device__ __forceinline__ int64_t shared_row_length(int64_t n) {
  return (n + kWarpSize * PACK - 1) / (kWarpSize * PACK) * kWarpSize * PACK;
}

template <typename T, typename W, typename A, int PACK>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
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
    const Pack<W, PACK> wp = *reinterpret_cast<const Pack<W, PACK>*>(w + j);
    Pack<T, PACK> yp;
#pragma unroll
    for (int k = 0; k < PACK; ++k) yp.v[k] = static_cast<T>(static_cast<A>(xp.v[k]) * r * static_cast<A>(wp.v[k]));
    *reinterpret_cast<Pack<T, PACK>*>(yr + j) = yp;
  }
}

// dx for the rows of this warp (a grid-stride loop over rows, one warp per row at a time),
// and with WEIGHT_GRAD their dy * x * r summed per column into shared memory, then into
// partial[blockIdx.x, :] (blockDim.y warps per block; dynamic shared memory of
// blockDim.y * shared_row_length<PACK>(n) values of A).
template <typename T, typename W, typename A, int PACK, bool WEIGHT_GRAD>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                                    const A* __restrict__ rstd, T* __restrict__ dx, A* __restrict__ partial,
                                    int64_t rows, int64_t n) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  A* const shared = reinterpret_cast<A*>(shared_bytes);
  const int lane = threadIdx.x;
  const int warps = blockDim.y;
  const int64_t stride = shared_row_length<PACK>(n);
  A* const dw_row = shared + threadIdx.y * stride;  // this warp's row: only this warp touches it
  if constexpr (WEIGHT_GRAD) {
    for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
#pragma unroll
      for (int k = 0; k < PACK; ++k) dw_row[shared_index<PACK>(j + k)] = A(0);
    }
  }
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const A r = rstd[row];
    A dot = 0;  // sum(dy * w * x)
#pragma unroll 4
    for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
      const Pack<T, PACK> dyp = *reinterpret_cast<const Pack<T, PACK>*>(dyr + j);
      const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(xr + j);
      const Pack<W, PACK> wp = *reinterpret_cast<const Pack<W, PACK>*>(w + j);
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        dot += static_cast<A>(dyp.v[k]) * static_cast<A>(wp.v[k]) * static_cast<A>(xp.v[k]);
      }
    }
    dot = warp_sum(dot);
    const A c = dot * r * r * r / static_cast<A>(n);
#pragma unroll 4
    for (int64_t j = static_cast<int64_t>(lane) * PACK; j < n; j += kWarpSize * PACK) {
      const Pack<T, PACK> dyp = *reinterpret_cast<const Pack<T, PACK>*>(dyr + j);
      const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(xr + j);
      const Pack<W, PACK> wp = *reinterpret_cast<const Pack<W, PACK>*>(w + j);
      Pack<T, PACK> dxp;
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        const A dyv = static_cast<A>(dyp.v[k]), xv = static_cast<A>(xp.v[k]);
        dxp.v[k] = static_cast<T>(r * (static_cast<A>(wp.v[k]) * dyv) - c * xv);
        if constexpr (WEIGHT_GRAD) dw_row[shared_index<PACK>(j + k)] += dyv * xv * r;
      }
      *reinterpret_cast<Pack<T, PACK>*>(dxr + j) = dxp;
    }
  }
  if constexpr (WEIGHT_GRAD) {
    __syncthreads();
    // The block's warps' rows -> one partial row, summed in a fixed order (deterministic).
    for (int64_t col = static_cast<int64_t>(threadIdx.y) * kWarpSize + lane; col < n;
         col += static_cast<int64_t>(warps) * kWarpSize) {
      const int64_t index = shared_index<PACK>(col);
      A total = 0;
      for (int k = 0; k < warps; ++k) total += shared[k * stride + index];
      partial[static_cast<int64_t>(blockIdx.x) * n + col] = total;
    }
  }
}

// The separate weight-gradient pass, for rows too wide for the shared rows: block (32
// columns, kGradRows) sums rows [chunk * rows_per_chunk, ...) of dy * x * rstd for its 32
// columns: warps read 32 consecutive columns (coalesced).
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

// partial (chunks, n) -> dw (n,) in the weight's dtype. Block (32 columns, kFinalRows): each
// thread sums every kFinalRows-th partial row of its column in fp64, the block adds the
// kFinalRows sums (fixed order), and one thread per column casts and writes.
template <typename A, typename D>
__global__ void rms_norm_dw_final_kernel(const A* __restrict__ partial, D* __restrict__ dw, int64_t chunks,
                                         int64_t n) {
  __shared__ double sums[kFinalRows][kWarpSize + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  double total = 0;
  if (col < n) {
#pragma unroll 4
    for (int64_t c = threadIdx.y; c < chunks; c += kFinalRows) total += static_cast<double>(partial[c * n + col]);
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    double sum = 0;
#pragma unroll
    for (int k = 0; k < kFinalRows; ++k) sum += sums[k][threadIdx.x];
    dw[col] = static_cast<D>(sum);
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The weight as the kernels read it: itself when its dtype is x's or the accumulation dtype
// (the cases training meets), else converted once to the accumulation dtype.
at::Tensor readable_weight(const at::Tensor& weight, const at::Tensor& x) {
  const auto dtype = weight.scalar_type();
  if (dtype == x.scalar_type() || dtype == acc_dtype(x)) return weight.contiguous();
  return weight.to(acc_dtype(x)).contiguous();
}

// Calls body(W{}) with W the C++ type of `weight` (x's type T, or the accumulation type A).
template <typename T, typename A, typename Body>
void with_weight_type(const at::Tensor& weight, const Body& body) {
  if (weight.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    body(T{});
  } else {
    body(A{});
  }
}

// 16-byte packs when the row length is a multiple of the pack and every pointer is aligned
// for its pack (the weight's pack holds as many elements, so it may be 32 bytes).
template <typename T, typename W>
bool can_use_packs(int64_t n, std::initializer_list<const void*> pointers, const W* w) {
  return n % pack_size<T>() == 0 && aligned_for_packs(pointers) && aligned_for<W, pack_size<T>()>(w);
}

void final_weight_gradient(const at::Tensor& partial, at::Tensor& dw, cudaStream_t stream) {
  const int64_t chunks = partial.size(0), n = partial.size(1);
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "lime_rms_norm_dw_partial_cuda", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dw.scalar_type(), "lime_rms_norm_dw_cuda", [&] {
      const dim3 block(kWarpSize, kFinalRows);
      rms_norm_dw_final_kernel<A, scalar_t><<<static_cast<unsigned>(ceil_div(n, kWarpSize)), block, 0, stream>>>(
          partial.data_ptr<A>(), dw.data_ptr<scalar_t>(), chunks, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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
  const at::Tensor w = readable_weight(weight, x);
  const dim3 block(kWarpSize, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_fwd_cuda", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    constexpr int P = pack_size<T>();
    with_weight_type<T, A>(w, [&](auto w_type) {
      using W = decltype(w_type);
      const T* xp = x.data_ptr<T>();
      const W* wp = static_cast<const W*>(w.data_ptr());
      T* yp = y.data_ptr<T>();
      if (can_use_packs<T>(n, {xp, yp}, wp)) {
        rms_norm_fwd_kernel<T, W, A, P><<<grid, block, 0, stream>>>(xp, wp, yp, rstd.data_ptr<A>(), rows, n,
                                                                      static_cast<A>(eps));
      } else {
        rms_norm_fwd_kernel<T, W, A, 1><<<grid, block, 0, stream>>>(xp, wp, yp, rstd.data_ptr<A>(), rows, n,
                                                                      static_cast<A>(eps));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd, bool weight_grad) {
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
  // Without weight_grad, dw is an empty (0,) tensor: the caller asked for no weight gradient.
  at::Tensor dw = weight_grad ? at::empty_like(weight, at::MemoryFormat::Contiguous) : weight.new_empty({0});
  if (rows == 0) {
    if (weight_grad) dw.zero_();
    return {dx, dw};
  }
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor w = readable_weight(weight, x);
  const int64_t sms = device_info(x.device()).multiprocessors;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_bwd_cuda", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    constexpr int P = pack_size<T>();
    with_weight_type<T, A>(w, [&](auto w_type) {
      using W = decltype(w_type);
      const T* dyp = dy.data_ptr<T>();
      const T* xp = x.data_ptr<T>();
      T* dxp = dx.data_ptr<T>();
      const W* wp = static_cast<const W*>(w.data_ptr());
      const A* rp = rstd.data_ptr<A>();
      const bool packs = can_use_packs<T>(n, {dyp, xp, dxp}, wp);
      const int64_t row_length = packs ? shared_row_length<P>(n) : shared_row_length<1>(n);
      // As many warps per block (8, else 4) as the shared gradient rows allow; none: separate pass.
      int warps = kMaxBwdWarps;
      while (warps > kRowsPerBlock && warps * row_length * sizeof(A) > kMaxSharedBytes) warps /= 2;
      const size_t shared_bytes = static_cast<size_t>(warps) * row_length * sizeof(A);
      const bool fused_weight_grad = weight_grad && shared_bytes <= kMaxSharedBytes;
      const int64_t blocks_for_rows = ceil_div(rows, warps);
      const int64_t blocks = fused_weight_grad
          ? std::min<int64_t>(blocks_for_rows, sms * kBwdBlocksPerSm)
          : std::min<int64_t>(blocks_for_rows, sms * 32);
      const dim3 block(kWarpSize, warps);
      const dim3 grid(static_cast<unsigned>(blocks));
      if (fused_weight_grad) {
        at::Tensor partial = at::empty({blocks, n}, x.options().dtype(acc));
        if (packs) {
          rms_norm_bwd_kernel<T, W, A, P, true><<<grid, block, shared_bytes, stream>>>(
              dyp, xp, wp, rp, dxp, partial.data_ptr<A>(), rows, n);
        } else {
          rms_norm_bwd_kernel<T, W, A, 1, true><<<grid, block, shared_bytes, stream>>>(
              dyp, xp, wp, rp, dxp, partial.data_ptr<A>(), rows, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        final_weight_gradient(partial, dw, stream);
        return;
      }
      if (packs) {
        rms_norm_bwd_kernel<T, W, A, P, false><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dxp, nullptr, rows, n);
      } else {
        rms_norm_bwd_kernel<T, W, A, 1, false><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dxp, nullptr, rows, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!weight_grad) return;
      // Rows too wide for shared memory: a separate pass over dy and x for the weight gradient.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxGradChunks, rows / kGradRows));
      at::Tensor partial = at::empty({chunks, n}, x.options().dtype(acc));
      const dim3 grad_block(kWarpSize, kGradRows);
      const dim3 grad_grid(static_cast<unsigned>(ceil_div(n, kWarpSize)), static_cast<unsigned>(chunks));
      rms_norm_dw_partial_kernel<T, A><<<grad_grid, grad_block, 0, stream>>>(dyp, xp, rp, partial.data_ptr<A>(),
                                                                             rows, n, ceil_div(rows, chunks));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      final_weight_gradient(partial, dw, stream);
    });
  });
  return {dx, dw};
}

}  // namespace lime::cuda
