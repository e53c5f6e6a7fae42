// Fused RMSNorm, and residual add + RMSNorm, for CUDA:
//   y = x / sqrt(mean(x^2) + eps) * weight over the last dimension;
//   with a residual: h = residual + delta (rounded to the storage dtype, as an unfused add would
//   store it), y = rms_norm(h), both returned, the residual stream read once.
//
// Two paths:
//   fast     row widths compiled in (FastFwdWidths: the presets' hidden sizes 64, 128, 768, 1536,
//            and 2048; the backward up to 1536), fp32/bf16 with 16-byte aligned tensors (what the
//            model meets). The
//            row lives in registers: each thread loads its share of the row as 16-byte packs,
//            all loads issued before any arithmetic, so a row costs one trip to memory and the
//            reduction is a few shuffles within the row's thread group (a warp, or 8 or 16 lanes
//            for narrow rows, so a warp handles several rows). Several rows per block,
//            __launch_bounds__ so the compiler keeps the row in registers without spills.
//            Backward: each thread keeps its columns' weight-gradient sums in registers while its
//            group walks rows (a grid-stride loop), the block adds its groups' sums once at the
//            end (shared memory, one write and one read per column), writing one fp32 partial
//            row per block; a small kernel sums the partial rows (fp64) into the weight's dtype.
//   generic  any other width, dtype or alignment: a warp per row that reads the row twice (the
//            second time from L1/L2), the weight gradient through per-warp shared rows or a
//            separate pass for very wide rows; with a residual, the add is a separate ATen add.
//
// Backward maths, with r = rstd, xh = x * r (h * r with a residual), n the row length:
//   dx = r * (w * dy - xh * mean(w * dy * xh))   (+ the residual's own gradient, added once)
//   dw = sum over rows of dy * xh
// The weight is read in its own dtype (bf16 weights with bf16 activations, or fp32 master
// weights with bf16 activations): no converted copy is allocated per call.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <utility>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace lime::cuda {
namespace {

constexpr const char* kFwd = "lime::rms_norm_fwd (CUDA)";
constexpr const char* kAddFwd = "lime::add_rms_norm_fwd (CUDA)";
constexpr const char* kBwd = "lime::rms_norm_bwd (CUDA)";
constexpr int kRowsPerBlock = 4;       // generic forward: warps (rows) per block
constexpr int kMaxBwdWarps = 8;        // generic backward: warps per block (fewer when n is wide)
constexpr int kBwdBlocksPerSm = 2;     // generic backward grid: blocks per SM (each block writes one partial row)
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
__global__ void __launch_bounds__(kWarpSize * kRowsPerBlock)
rms_norm_fwd_generic_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
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
__global__ void __launch_bounds__(kWarpSize * kMaxBwdWarps, 1)
rms_norm_bwd_generic_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
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
#pragma unroll 2  // with the weight-gradient rows, 4 packs in flight spilled (ptxas -v)
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
#pragma unroll 2
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
__global__ void __launch_bounds__(kWarpSize * kGradRows)
rms_norm_dw_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
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
__global__ void __launch_bounds__(kWarpSize * kFinalRows)
rms_norm_dw_final_kernel(const A* __restrict__ partial, D* __restrict__ dw, int64_t chunks,
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

// ---- fast path: the row in registers, a width known at compile time ----

constexpr int floor_power_of_two(int v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

// How a row of N elements of T is spread over threads: PACK elements per 16-byte pack, a group
// of THREADS lanes per row (a warp, or fewer for narrow rows), PACKS packs per thread; pack i
// of lane l is the row's pack i * THREADS + l, so a group's loads are consecutive 16-byte
// chunks (coalesced).
template <typename T, int N>
struct FastLayout {
  static constexpr int PACK = pack_size<T>();
  static constexpr int PACKS_PER_ROW = N / PACK;
  static constexpr int THREADS = PACKS_PER_ROW < kWarpSize ? PACKS_PER_ROW : kWarpSize;
  static constexpr int PACKS = PACKS_PER_ROW / THREADS;
  // Forward: 256 threads per block, so 8 rows of a warp (32 rows of 8 lanes for narrow rows).
  static constexpr int FWD_THREADS = 256;
  static constexpr int FWD_ROWS = FWD_THREADS / THREADS;
  // Backward: the block's weight-gradient sums pass through shared memory once at the end,
  // BWD_ROWS x N fp32, kept within 32 KB (4 rows of 1536 or 2048, 8 of 768), at most 256 threads.
  static constexpr int BWD_ROWS = floor_power_of_two(std::min(256 / THREADS, 8192 / N));
  static constexpr int BWD_THREADS = BWD_ROWS * THREADS;
  static_assert(N % PACK == 0 && PACKS_PER_ROW % THREADS == 0, "a row must split evenly into packs and lanes");
  static_assert((THREADS & (THREADS - 1)) == 0, "a row's lane group must be a power of two");
  static_assert(BWD_ROWS >= 1, "row too wide for the fast backward's shared buffer");
};

template <typename T, int P>
__device__ __forceinline__ Pack<T, P> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, P>*>(p);
}

template <typename T, int P>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, P>& v) {
  *reinterpret_cast<Pack<T, P>*>(p) = v;
}

// One row per lane group, FWD_ROWS rows per block. With `delta` (not null), h = x + delta is
// rounded to T, written to `sum` and normalised; without, x is. Rows past the end load the last
// row (valid memory, discarded) so every lane reaches the shuffles: no lane leaves early.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(FastLayout<T, N>::FWD_THREADS)
rms_norm_fwd_fast_kernel(const T* __restrict__ x, const T* __restrict__ delta, const W* __restrict__ w,
                         T* __restrict__ y, T* __restrict__ sum, float* __restrict__ rstd, int64_t rows,
                         float eps) {
  using L = FastLayout<T, N>;
  constexpr int P = L::PACK;
  constexpr int STRIDE = L::THREADS * P;  // elements between one thread's consecutive packs
  const int lane = threadIdx.x % L::THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::FWD_ROWS + threadIdx.x / L::THREADS;
  const bool valid = row < rows;
  const int64_t first = (valid ? row : rows - 1) * N + lane * P;  // this thread's first element in memory
  Pack<T, P> v[L::PACKS];
#pragma unroll
  for (int i = 0; i < L::PACKS; ++i) v[i] = load_pack<T, P>(x + first + i * STRIDE);
  if (delta != nullptr) {
    Pack<T, P> d[L::PACKS];
#pragma unroll
    for (int i = 0; i < L::PACKS; ++i) d[i] = load_pack<T, P>(delta + first + i * STRIDE);
#pragma unroll
    for (int i = 0; i < L::PACKS; ++i) {
#pragma unroll
      for (int k = 0; k < P; ++k) {
        v[i].v[k] = static_cast<T>(static_cast<float>(v[i].v[k]) + static_cast<float>(d[i].v[k]));
      }
      if (valid) store_pack<T, P>(sum + first + i * STRIDE, v[i]);
    }
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int i = 0; i < L::PACKS; ++i) {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const float value = static_cast<float>(v[i].v[k]);
      sum_sq = fmaf(value, value, sum_sq);
    }
  }
  sum_sq = group_sum<L::THREADS>(sum_sq);
  const float r = rsqrtf(sum_sq * (1.0f / N) + eps);
  if (!valid) return;  // after the last shuffle
  if (lane == 0) rstd[row] = r;
#pragma unroll
  for (int i = 0; i < L::PACKS; ++i) {
    const Pack<W, P> wp = load_pack<W, P>(w + lane * P + i * STRIDE);  // the weight: a row, cached in L1
    Pack<T, P> out;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      out.v[k] = static_cast<T>(static_cast<float>(v[i].v[k]) * r * static_cast<float>(wp.v[k]));
    }
    store_pack<T, P>(y + first + i * STRIDE, out);
  }
}

// dx for BWD_ROWS rows per block at a time (a grid-stride loop whose trip count is the same for
// every thread of the block: all lanes reach every shuffle), plus residual_grad when given;
// with `partial` (not null), each thread's columns' dy * xh summed over its rows in registers,
// then the block's rows added in shared memory into partial[blockIdx.x, :].
template <typename T, typename W, int N>
__global__ void __launch_bounds__(FastLayout<T, N>::BWD_THREADS)
rms_norm_bwd_fast_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                         const float* __restrict__ rstd, const T* __restrict__ residual_grad, T* __restrict__ dx,
                         float* __restrict__ partial, int64_t rows) {
  using L = FastLayout<T, N>;
  constexpr int P = L::PACK;
  constexpr int STRIDE = L::THREADS * P;
  const int lane = threadIdx.x % L::THREADS;
  const int group = threadIdx.x / L::THREADS;
  float dw[L::PACKS][P];
#pragma unroll
  for (int i = 0; i < L::PACKS; ++i) {
#pragma unroll
    for (int k = 0; k < P; ++k) dw[i][k] = 0.0f;
  }
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * L::BWD_ROWS; first < rows;
       first += static_cast<int64_t>(gridDim.x) * L::BWD_ROWS) {
    const int64_t row = first + group;
    const bool valid = row < rows;
    const int64_t first_element = (valid ? row : rows - 1) * N + lane * P;
    Pack<T, P> dyp[L::PACKS], xp[L::PACKS];
#pragma unroll
    for (int i = 0; i < L::PACKS; ++i) {
      dyp[i] = load_pack<T, P>(dy + first_element + i * STRIDE);
      xp[i] = load_pack<T, P>(x + first_element + i * STRIDE);
    }
    const float r = rstd[valid ? row : rows - 1];
    float dot = 0.0f;  // sum(w * dy * xh) over the row
#pragma unroll
    for (int i = 0; i < L::PACKS; ++i) {
      const Pack<W, P> wp = load_pack<W, P>(w + lane * P + i * STRIDE);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        dot = fmaf(static_cast<float>(wp.v[k]) * static_cast<float>(dyp[i].v[k]), static_cast<float>(xp[i].v[k]) * r,
                   dot);
      }
    }
    dot = group_sum<L::THREADS>(dot);
    const float mean_dot = dot * (1.0f / N);
    if (!valid) continue;  // every thread still takes the same number of loop trips
    Pack<T, P> gp[L::PACKS];
    if (residual_grad != nullptr) {
#pragma unroll
      for (int i = 0; i < L::PACKS; ++i) gp[i] = load_pack<T, P>(residual_grad + first_element + i * STRIDE);
    }
#pragma unroll
    for (int i = 0; i < L::PACKS; ++i) {
      const Pack<W, P> wp = load_pack<W, P>(w + lane * P + i * STRIDE);
      Pack<T, P> out;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const float dyv = static_cast<float>(dyp[i].v[k]);
        const float xh = static_cast<float>(xp[i].v[k]) * r;
        float g = r * fmaf(static_cast<float>(wp.v[k]), dyv, -xh * mean_dot);
        if (residual_grad != nullptr) g += static_cast<float>(gp[i].v[k]);
        out.v[k] = static_cast<T>(g);
        dw[i][k] = fmaf(dyv, xh, dw[i][k]);
      }
      store_pack<T, P>(dx + first_element + i * STRIDE, out);
    }
  }
  if (partial == nullptr) return;  // uniform over the grid: no thread waits at the barrier alone
  __shared__ float block_sums[L::BWD_ROWS][N];
#pragma unroll
  for (int i = 0; i < L::PACKS; ++i) {
#pragma unroll
    for (int k = 0; k < P; ++k) block_sums[group][lane * P + i * STRIDE + k] = dw[i][k];
  }
  __syncthreads();
  for (int col = threadIdx.x; col < N; col += L::BWD_THREADS) {
    float total = 0.0f;
#pragma unroll
    for (int g = 0; g < L::BWD_ROWS; ++g) total += block_sums[g][col];  // a fixed order: deterministic
    partial[static_cast<int64_t>(blockIdx.x) * N + col] = total;
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

// The fast path's widths, once: the dispatch below and the kernels' instantiations both come from
// them. The backward also keeps each thread's weight-gradient sums in registers: at 2048 that
// exceeds 255 registers and spills (ptxas -v), so 2048 takes the generic backward.
using FastFwdWidths = std::integer_sequence<int, 64, 128, 768, 1536, 2048>;
using FastBwdWidths = std::integer_sequence<int, 64, 128, 768, 1536>;

// The storage types with fast kernels: fp32 and bf16 (training's). fp16 and fp64 take the
// generic path: each fast type doubles the instantiations, and the compile time with them.
template <typename T>
constexpr bool kHasFastPath = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// Calls body(std::integral_constant<int, N>{}) when n is one of the fast widths; false otherwise.
template <typename Body, int... WIDTHS>
bool with_fast_width(int64_t n, std::integer_sequence<int, WIDTHS...>, const Body& body) {
  return ((n == WIDTHS ? (body(std::integral_constant<int, WIDTHS>{}), true) : false) || ...);
}

// A width with a fast kernel that still took the generic path: a tensor was not 16-byte aligned
// (a view at an odd offset, a weight inside a flat buffer). Correct, but several times slower: say so once.
template <int... WIDTHS>
void warn_if_width_is_fast(int64_t n, std::integer_sequence<int, WIDTHS...>, const char* op) {
  if (((n == WIDTHS) || ...)) {
    TORCH_WARN_ONCE(op, ": rows of ", n, " have a fast kernel, but a tensor (or the weight) is not 16-byte aligned ",
                    "(32-byte for an fp32 weight with bf16 rows), so the slower generic kernel runs");
  }
}

// Blocks of the fast backward that fit on the GPU at once (its grid-stride loop needs no more),
// asked of the driver once per kernel and device.
template <typename T, typename W, int N>
int64_t fast_bwd_blocks(int64_t rows, const at::Device& device) {
  using L = FastLayout<T, N>;
  constexpr int kMaxDevices = 64;
  static std::array<int, kMaxDevices> per_sm{};
  static std::array<std::once_flag, kMaxDevices> asked;
  const int index = device.index();
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "lime kernels: CUDA device index ", index, " out of range");
  std::call_once(asked[index], [&] {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[index], rms_norm_bwd_fast_kernel<T, W, N>,
                                                                 L::BWD_THREADS, 0));
  });
  const int64_t resident = static_cast<int64_t>(device_info(device).multiprocessors) * std::max(per_sm[index], 1);
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, L::BWD_ROWS), resident));
}

void check_fwd_inputs(const at::Tensor& x, const at::Tensor& weight, double eps, const char* op) {
  check_device(x, op, "x", c10::DeviceType::CUDA);
  check_device(weight, op, "weight", c10::DeviceType::CUDA);
  check_floating(x, op, "x");
  check_floating(weight, op, "weight");
  check_contiguous(x, op, "x");
  check_rms_norm_shapes(x, weight, op);
  TORCH_CHECK(x.device() == weight.device(), op, ": x and weight must be on the same GPU, got ", x.device(),
              " and ", weight.device());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

// y = rms_norm(x), or with delta: sum = x + delta, y = rms_norm(sum). rstd: one value per row.
void forward(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps, at::Tensor& y,
             at::Tensor* sum, at::Tensor& rstd) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  if (rows == 0) return;
  const at::Tensor w = readable_weight(weight, x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_fwd_cuda", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    constexpr int P = pack_size<T>();
    with_weight_type<T, A>(w, [&](auto w_type) {
      using W = decltype(w_type);
      const T* xp = x.data_ptr<T>();
      const T* dp = delta != nullptr ? delta->data_ptr<T>() : nullptr;
      const W* wp = static_cast<const W*>(w.data_ptr());
      T* yp = y.data_ptr<T>();
      T* sp = sum != nullptr ? sum->data_ptr<T>() : nullptr;
      A* rp = rstd.data_ptr<A>();
      if constexpr (kHasFastPath<T>) {
        const bool fast = can_use_packs<T>(n, {xp, dp, yp, sp}, wp) &&
            with_fast_width(n, FastFwdWidths{}, [&](auto width) {
              constexpr int N = decltype(width)::value;
              using L = FastLayout<T, N>;
              rms_norm_fwd_fast_kernel<T, W, N><<<static_cast<unsigned>(ceil_div(rows, L::FWD_ROWS)), L::FWD_THREADS,
                                                   0, stream>>>(xp, dp, wp, yp, sp, rp, rows, static_cast<float>(eps));
            });
        if (fast) {
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        warn_if_width_is_fast(n, FastFwdWidths{}, kFwd);
      }
      // Generic: the add is its own pass (ATen's, rounding as the fast path does), then the norm of the sum.
      const T* source = xp;
      if (delta != nullptr) {
        at::add_out(*sum, x, *delta);
        source = sp;
      }
      const dim3 block(kWarpSize, kRowsPerBlock);
      const dim3 grid(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)));
      if (can_use_packs<T>(n, {source, yp}, wp)) {
        rms_norm_fwd_generic_kernel<T, W, A, P><<<grid, block, 0, stream>>>(source, wp, yp, rp, rows, n,
                                                                              static_cast<A>(eps));
      } else {
        rms_norm_fwd_generic_kernel<T, W, A, 1><<<grid, block, 0, stream>>>(source, wp, yp, rp, rows, n,
                                                                              static_cast<A>(eps));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_fwd_inputs(x, weight, eps, kFwd);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
  forward(x, nullptr, weight, eps, y, nullptr, rstd);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& residual, const at::Tensor& delta,
                                                                const at::Tensor& weight, double eps) {
  check_fwd_inputs(residual, weight, eps, kAddFwd);
  check_device(delta, kAddFwd, "delta", c10::DeviceType::CUDA);
  check_contiguous(delta, kAddFwd, "delta");
  check_same_dtype(residual, delta, kAddFwd, "residual", "delta");
  check_same_shape(residual, delta, kAddFwd, "residual", "delta");
  TORCH_CHECK(delta.device() == residual.device(), kAddFwd, ": residual and delta must be on the same GPU, got ",
              residual.device(), " and ", delta.device());
  const c10::cuda::CUDAGuard guard(residual.device());
  at::Tensor sum = at::empty_like(residual, at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty_like(residual, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty(residual.sizes().slice(0, residual.dim() - 1),
                              residual.options().dtype(acc_dtype(residual)));
  forward(residual, &delta, weight, eps, y, &sum, rstd);
  return {sum, y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd, bool weight_grad,
                                                const std::optional<at::Tensor>& residual_grad) {
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
  const at::Tensor* extra = residual_grad.has_value() && residual_grad->defined() ? &*residual_grad : nullptr;
  if (extra != nullptr) {
    check_device(*extra, kBwd, "residual_grad", c10::DeviceType::CUDA);
    check_contiguous(*extra, kBwd, "residual_grad");
    check_same_dtype(*extra, x, kBwd, "residual_grad", "x");
    check_same_shape(*extra, x, kBwd, "residual_grad", "x");
    TORCH_CHECK(extra->device() == x.device(), kBwd, ": residual_grad must be on ", x.device(), ", got ",
                extra->device());
  }
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
  bool fast = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_bwd_cuda", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    constexpr int P = pack_size<T>();
    with_weight_type<T, A>(w, [&](auto w_type) {
      using W = decltype(w_type);
      const T* dyp = dy.data_ptr<T>();
      const T* xp = x.data_ptr<T>();
      T* dxp = dx.data_ptr<T>();
      const T* gp = extra != nullptr ? extra->data_ptr<T>() : nullptr;
      const W* wp = static_cast<const W*>(w.data_ptr());
      const A* rp = rstd.data_ptr<A>();
      if constexpr (kHasFastPath<T>) {
        fast = can_use_packs<T>(n, {dyp, xp, dxp, gp}, wp) &&
            with_fast_width(n, FastBwdWidths{}, [&](auto width) {
              constexpr int N = decltype(width)::value;
              using L = FastLayout<T, N>;
              const int64_t blocks = fast_bwd_blocks<T, W, N>(rows, x.device());
              at::Tensor partial = weight_grad ? at::empty({blocks, n}, x.options().dtype(at::kFloat)) : at::Tensor();
              rms_norm_bwd_fast_kernel<T, W, N><<<static_cast<unsigned>(blocks), L::BWD_THREADS, 0, stream>>>(
                  dyp, xp, wp, rp, gp, dxp, weight_grad ? partial.data_ptr<float>() : nullptr, rows);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              if (weight_grad) final_weight_gradient(partial, dw, stream);
            });
        if (fast) return;
        warn_if_width_is_fast(n, FastBwdWidths{}, kBwd);
      }
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
          rms_norm_bwd_generic_kernel<T, W, A, P, true><<<grid, block, shared_bytes, stream>>>(
              dyp, xp, wp, rp, dxp, partial.data_ptr<A>(), rows, n);
        } else {
          rms_norm_bwd_generic_kernel<T, W, A, 1, true><<<grid, block, shared_bytes, stream>>>(
              dyp, xp, wp, rp, dxp, partial.data_ptr<A>(), rows, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        final_weight_gradient(partial, dw, stream);
        return;
      }
      if (packs) {
        rms_norm_bwd_generic_kernel<T, W, A, P, false><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dxp, nullptr,
                                                                                    rows, n);
      } else {
        rms_norm_bwd_generic_kernel<T, W, A, 1, false><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dxp, nullptr,
                                                                                    rows, n);
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
  // The generic kernels know nothing of a residual: its gradient is added here, one more pass.
  if (!fast && extra != nullptr) dx.add_(*extra);
  return {dx, dw};
}

}  // namespace lime::cuda
