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

// Calls body(begin, end, thread_index) on contiguous slices of [0, items), handed out to
// `num_threads` threads a slice at a time. Several slices per thread, taken dynamically: a
// thread that was descheduled (a busy machine, a data-loader process) does not hold the
// others up at the end. Contiguous slices keep each thread on its own pages and cache lines.
template <typename Body>
inline void parallel_slices(int64_t items, int num_threads, const Body& body) {
  if (num_threads <= 1) {
    if (items > 0) body(int64_t{0}, items, 0);
    return;
  }
  constexpr int64_t kSlicesPerThread = 8;
  const int64_t slices = std::min<int64_t>(items, kSlicesPerThread * num_threads);
  const int64_t slice = (items + slices - 1) / slices;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t index = 0; index < slices; ++index) {
    const int64_t begin = index * slice;
    const int64_t end = std::min(items, begin + slice);
    if (begin < end) body(begin, end, omp_get_thread_num());
  }
}

}  // namespace lime::cpu
