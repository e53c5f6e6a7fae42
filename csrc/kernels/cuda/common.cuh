// Helpers shared by the CUDA kernels: packed 16-byte loads, warp sums, launch sizes.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <mutex>

namespace lime::cuda {

constexpr int kWarpSize = 32;
constexpr int kPackBytes = 16;  // one 128-bit load or store per thread

// The accumulation type: fp32 for every 16/32-bit float, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// `N` values of T moved as one 16-byte transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T> constexpr int pack_size() { return kPackBytes / static_cast<int>(sizeof(T)); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum over an aligned group of GROUP lanes (a power of two <= 32): xor offsets below GROUP
// never leave the group. Every lane of the warp must call it (the mask is the full warp).
template <int GROUP, typename A>
__device__ __forceinline__ A group_sum(A v) {
  static_assert(GROUP > 0 && GROUP <= kWarpSize && (GROUP & (GROUP - 1)) == 0, "GROUP: a power of two <= 32");
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float reciprocal_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double reciprocal_sqrt(double v) { return rsqrt(v); }

// 1 / (1 + e^-v) with the hardware's exp2 and reciprocal (MUFU.EX2, MUFU.RCP): a few ulp in fp32,
// far below a bf16 or fp16 rounding step, and no IEEE division's Newton iterations and slow path.
// For v < -88, e^-v is inf and __fdividef(1, inf) is 0: sigmoid's limit.
__device__ __forceinline__ float sigmoid(float v) { return __fdividef(1.0f, 1.0f + __expf(-v)); }
__device__ __forceinline__ double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

// True when every listed pointer can be read `Pack<T, pack_size<T>()>` at a time.
inline bool aligned_for_packs(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<std::uintptr_t>(p) % kPackBytes != 0) return false;
  }
  return true;
}

// True when `p` can be read as a Pack<T, N> (whose alignment is sizeof(T) * N).
template <typename T, int N>
bool aligned_for(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % alignof(Pack<T, N>) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What the launch code needs to know about a GPU, read from the driver once per device and
// cached (not a cudaDeviceGetAttribute per launch). ATen's own cache (ATen/cuda/CUDAContext.h)
// would drag in the cuBLAS / cuSPARSE headers.
struct DeviceInfo {
  int multiprocessors = 0;
};

inline const DeviceInfo& device_info(const at::Device& device) {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceInfo, kMaxDevices> cache;
  static std::array<std::once_flag, kMaxDevices> filled;
  const int index = device.index();
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "lime kernels: CUDA device index ", index, " out of range");
  std::call_once(filled[index], [&] {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[index].multiprocessors, cudaDevAttrMultiProcessorCount, index));
  });
  return cache[index];
}

}  // namespace lime::cuda
