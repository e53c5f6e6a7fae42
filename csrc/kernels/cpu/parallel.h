// Splitting rows (or elements) over OpenMP threads.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace lime::cpu {

// Below this many elements a parallel region costs more than the work it splits.
constexpr int64_t kMinElementsPerThread = 32 * 1024;

// Threads worth using for `items` units of `cost` elements each: torch's thread count
// (torch.set_num_threads applies), fewer for small inputs, never more than there are units.
inline int threads_for(int64_t items, int64_t cost) {
  const int64_t by_size = std::max<int64_t>(1, items * cost / kMinElementsPerThread);
  return static_cast<int>(std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), by_size, std::max<int64_t>(items, 1)}));
}

// Calls body(begin, end, thread_index) on `num_threads` contiguous slices of [0, items).
// Contiguous slices keep each thread on its own pages and cache lines.
template <typename Body>
inline void parallel_slices(int64_t items, int num_threads, const Body& body) {
  if (num_threads <= 1) {
    if (items > 0) body(int64_t{0}, items, 0);
    return;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t thread = omp_get_thread_num();
    const int64_t team = omp_get_num_threads();
    const int64_t chunk = (items + team - 1) / team;
    const int64_t begin = std::min(items, thread * chunk);
    const int64_t end = std::min(items, begin + chunk);
    if (begin < end) body(begin, end, static_cast<int>(thread));
  }
}

}  // namespace lime::cpu
