// Fused RMSNorm for CPU: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, and
// residual add + RMSNorm: h = residual + delta (rounded to the storage dtype, as an unfused add
// stores it), y = rms_norm(h), both returned.
//
// Forward:  one pass computes sum(x^2) for a row (with a residual: adds, rounds and stores h
//           first, then sums h^2), a second pass (the row is now in L1/L2) writes y once;
//           rstd = 1 / sqrt(mean(x^2) + eps) is kept, one fp32 per row.
// Backward: with r = rstd and n the row length,
//             dx = r * w * dy - x * (r^3 / n) * sum(dy * w * x)
//             dw = sum over rows of dy * x * r
//           one pass for the dot product, a second writes dx and adds dy * x * r into an
//           fp32 row per block of 32 rows, which goes into the thread's own fp64 weight-gradient
//           row; the per-thread rows are summed at the end. Without weight_grad (the weight
//           needs no gradient) the second pass only writes dx. With residual_grad (add_rms_norm's
//           backward: the gradient arriving at h itself) dx includes it, added in the same pass.
// Rows are split over OpenMP threads; 8 fp32 lanes (AVX2) with a scalar tail for any n.
#include "../checks.h"
#include "parallel.h"
#include "rms_norm.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace lime::cpu {
namespace {

constexpr const char* kFwd = "lime::rms_norm_fwd (CPU)";
constexpr const char* kAddFwd = "lime::add_rms_norm_fwd (CPU)";
constexpr const char* kBwd = "lime::rms_norm_bwd (CPU)";
constexpr int64_t kGradBlockRows = 32;

// With delta (not null): sum = x + delta, rounded to T, is written and normalised.
template <typename T, typename A>
void rms_norm_fwd_rows(const T* x, const T* delta, const A* w, T* y, T* sum, A* rstd, int64_t begin, int64_t end,
                       int64_t n, A eps) {
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    if (delta != nullptr) {
      const T* dr = delta + row * n;
      T* sr = sum + row * n;
      int64_t j = 0;
#if LIME_HAVE_AVX2
      if constexpr (HasVec<T>::value) {
        for (; j + kLanes <= n; j += kLanes) store8(sr + j, _mm256_add_ps(load8(xr + j), load8(dr + j)));
      }
#endif
      for (; j < n; ++j) sr[j] = static_cast<T>(static_cast<A>(xr[j]) + static_cast<A>(dr[j]));
      xr = sr;  // the rounded sum is what an unfused norm would read
    }
    int64_t j = 0;
    A sum_sq = 0;
#if LIME_HAVE_AVX2
    if constexpr (HasVec<T>::value) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
        const __m256 a = load8(xr + j), b = load8(xr + j + kLanes);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
      }
      for (; j + kLanes <= n; j += kLanes) {
        const __m256 a = load8(xr + j);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
      }
      sum_sq = horizontal_sum(_mm256_add_ps(acc0, acc1));
    }
#endif
    for (; j < n; ++j) {
      const A v = static_cast<A>(xr[j]);
      sum_sq += v * v;
    }
    const A r = A(1) / std::sqrt(sum_sq / static_cast<A>(n) + eps);
    rstd[row] = r;
    j = 0;
#if LIME_HAVE_AVX2
    if constexpr (HasVec<T>::value) {
      const __m256 rv = _mm256_set1_ps(r);
      for (; j + kLanes <= n; j += kLanes) {
        store8(yr + j, _mm256_mul_ps(_mm256_mul_ps(load8(xr + j), rv), _mm256_loadu_ps(w + j)));
      }
    }
#endif
    for (; j < n; ++j) yr[j] = static_cast<T>(static_cast<A>(xr[j]) * r * w[j]);
  }
}

// dx for rows [begin, end), and with WEIGHT_GRAD their dy * x * r summed into dw_block (n values,
// overwritten).
template <typename T, typename A, bool WEIGHT_GRAD>
void rms_norm_bwd_rows(const T* dy, const T* x, const A* w, const A* rstd, const T* residual_grad, T* dx,
                       A* dw_block, int64_t begin, int64_t end, int64_t n) {
  if constexpr (WEIGHT_GRAD) std::fill(dw_block, dw_block + n, A(0));
  for (int64_t row = begin; row < end; ++row) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const T* gr = residual_grad != nullptr ? residual_grad + row * n : nullptr;
    const A r = rstd[row];
    int64_t j = 0;
    A dot = 0;  // sum(dy * w * x)
#if LIME_HAVE_AVX2
    if constexpr (HasVec<T>::value) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
        acc0 = _mm256_fmadd_ps(_mm256_mul_ps(load8(dyr + j), _mm256_loadu_ps(w + j)), load8(xr + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_mul_ps(load8(dyr + j + kLanes), _mm256_loadu_ps(w + j + kLanes)),
                               load8(xr + j + kLanes), acc1);
      }
      for (; j + kLanes <= n; j += kLanes) {
        acc0 = _mm256_fmadd_ps(_mm256_mul_ps(load8(dyr + j), _mm256_loadu_ps(w + j)), load8(xr + j), acc0);
      }
      dot = horizontal_sum(_mm256_add_ps(acc0, acc1));
    }
#endif
    for (; j < n; ++j) dot += static_cast<A>(dyr[j]) * w[j] * static_cast<A>(xr[j]);
    const A c = dot * r * r * r / static_cast<A>(n);
    j = 0;
#if LIME_HAVE_AVX2
    if constexpr (HasVec<T>::value) {
      const __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
      for (; j + kLanes <= n; j += kLanes) {
        const __m256 dyv = load8(dyr + j), xv = load8(xr + j);
        // dx = r * (w * dy) - c * x (+ the residual's gradient)
        __m256 g = _mm256_fmsub_ps(rv, _mm256_mul_ps(_mm256_loadu_ps(w + j), dyv), _mm256_mul_ps(cv, xv));
        if (gr != nullptr) g = _mm256_add_ps(g, load8(gr + j));
        store8(dxr + j, g);
        // dw += (dy * x) * r
        if constexpr (WEIGHT_GRAD) {
          _mm256_storeu_ps(dw_block + j, _mm256_fmadd_ps(_mm256_mul_ps(dyv, xv), rv, _mm256_loadu_ps(dw_block + j)));
        }
      }
    }
#endif
    for (; j < n; ++j) {
      const A dyv = static_cast<A>(dyr[j]), xv = static_cast<A>(xr[j]);
      const A g = r * (w[j] * dyv) - c * xv;
      dxr[j] = static_cast<T>(gr != nullptr ? g + static_cast<A>(gr[j]) : g);
      if constexpr (WEIGHT_GRAD) dw_block[j] += dyv * xv * r;
    }
  }
}

at::ScalarType acc_dtype(const torch::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_fwd_inputs(const torch::Tensor& x, const torch::Tensor& weight, const char* op) {
  check_device(x, op, "x", c10::DeviceType::CPU);
  check_device(weight, op, "weight", c10::DeviceType::CPU);
  check_floating(x, op, "x");
  check_floating(weight, op, "weight");
  check_contiguous(x, op, "x");
  check_rms_norm_shapes(x, weight, op);
}

// y = rms_norm(x), or with delta: sum = x + delta, y = rms_norm(sum). Outputs preallocated.
void rms_norm_fwd_impl(const torch::Tensor& x, const torch::Tensor* delta, const torch::Tensor& weight, double eps,
                       torch::Tensor& y, torch::Tensor* sum, torch::Tensor& rstd, const char* op) {
  check_fwd_inputs(x, weight, op);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  for (const auto& [t, name] : {std::pair{delta, "delta"}, {&y, "y"}, {sum, "sum"}}) {
    if (t == nullptr) continue;
    check_device(*t, op, name, c10::DeviceType::CPU);
    check_contiguous(*t, op, name);
    check_same_dtype(x, *t, op, "x", name);
    check_same_shape(x, *t, op, "x", name);
  }
  check_device(rstd, op, "rstd", c10::DeviceType::CPU);
  check_contiguous(rstd, op, "rstd");
  check_rstd(rstd, x, op);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  // The weight is tiny (one row): converting it to the accumulation type once lets the row
  // loops take one weight type whatever the parameter's dtype (fp32 master weights with bf16
  // activations under autocast, or bf16 weights with bf16 activations).
  const torch::Tensor w = weight.to(acc_dtype(x)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_fwd_cpu", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = delta != nullptr ? delta->data_ptr<scalar_t>() : nullptr;
    const A* wp = w.data_ptr<A>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* sp = sum != nullptr ? sum->data_ptr<scalar_t>() : nullptr;
    A* rp = rstd.data_ptr<A>();
    parallel_slices(rows, threads_for(rows, n), [&](int64_t begin, int64_t end, int) {
      rms_norm_fwd_rows<scalar_t, A>(xp, dp, wp, yp, sp, rp, begin, end, n, static_cast<A>(eps));
    });
  });
}

torch::Tensor empty_rstd(const torch::Tensor& x) {
  return torch::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> rms_norm_fwd(const torch::Tensor& x, const torch::Tensor& weight,
                                                      double eps) {
  check_fwd_inputs(x, weight, kFwd);
  torch::Tensor y = torch::empty_like(x, at::MemoryFormat::Contiguous);
  torch::Tensor rstd = empty_rstd(x);
  rms_norm_fwd_impl(x, nullptr, weight, eps, y, nullptr, rstd, kFwd);
  return {y, rstd};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> add_rms_norm_fwd(const torch::Tensor& residual,
                                                                         const torch::Tensor& delta,
                                                                         const torch::Tensor& weight, double eps) {
  check_fwd_inputs(residual, weight, kAddFwd);
  torch::Tensor sum = torch::empty_like(residual, at::MemoryFormat::Contiguous);
  torch::Tensor y = torch::empty_like(residual, at::MemoryFormat::Contiguous);
  torch::Tensor rstd = empty_rstd(residual);
  rms_norm_fwd_impl(residual, &delta, weight, eps, y, &sum, rstd, kAddFwd);
  return {sum, y, rstd};
}

namespace {

// dx, and dw when it is given (defined): the weight gradient is skipped otherwise. With
// residual_grad (not null), dx includes it.
void rms_norm_bwd_impl(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& rstd, const torch::Tensor* residual_grad, torch::Tensor& dx,
                       torch::Tensor* dw) {
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, {&x, "x"}, {&weight, "weight"}, {&rstd, "rstd"},
                                {&dx, "dx"}}) {
    check_device(*t, kBwd, name, c10::DeviceType::CPU);
    check_contiguous(*t, kBwd, name);
  }
  if (dw != nullptr) {
    check_device(*dw, kBwd, "dw", c10::DeviceType::CPU);
    check_contiguous(*dw, kBwd, "dw");
    check_same_dtype(*dw, weight, kBwd, "dw", "weight");
    check_same_shape(*dw, weight, kBwd, "dw", "weight");
  }
  check_floating(x, kBwd, "x");
  check_floating(weight, kBwd, "weight");
  check_rms_norm_shapes(x, weight, kBwd);
  check_same_dtype(dy, x, kBwd, "dy", "x");
  check_same_shape(dy, x, kBwd, "dy", "x");
  check_same_dtype(dx, x, kBwd, "dx", "x");
  check_same_shape(dx, x, kBwd, "dx", "x");
  if (residual_grad != nullptr) {
    check_device(*residual_grad, kBwd, "residual_grad", c10::DeviceType::CPU);
    check_contiguous(*residual_grad, kBwd, "residual_grad");
    check_same_dtype(*residual_grad, x, kBwd, "residual_grad", "x");
    check_same_shape(*residual_grad, x, kBwd, "residual_grad", "x");
  }
  check_rstd(rstd, x, kBwd);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const int num_threads = threads_for(rows, n);
  const at::ScalarType acc = acc_dtype(x);
  const torch::Tensor w = weight.to(acc).contiguous();
  // One weight-gradient row per thread: no atomics and no false sharing in the row loop. It is
  // fp64: it sums one fp32 block sum per 32 rows, and 8192 rows make 256 of them per row.
  const bool weight_grad = dw != nullptr;
  torch::Tensor dw_partial = torch::zeros({weight_grad ? num_threads : 0, n}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lime_rms_norm_bwd_cpu", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = residual_grad != nullptr ? residual_grad->data_ptr<scalar_t>() : nullptr;
    const A* wp = w.data_ptr<A>();
    const A* rp = rstd.data_ptr<A>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    double* partial = dw_partial.data_ptr<double>();
    parallel_slices(rows, num_threads, [&](int64_t begin, int64_t end, int thread) {
      // Rows are summed kGradBlockRows at a time into an fp32 scratch row (vectorised), which is
      // then added to the thread's fp64 row: no fp32 running sum is longer than a block.
      std::vector<A> block(weight_grad ? n : 0);
      double* thread_partial = weight_grad ? partial + thread * n : nullptr;
      for (int64_t block_begin = begin; block_begin < end; block_begin += kGradBlockRows) {
        const int64_t block_end = std::min(end, block_begin + kGradBlockRows);
        if (!weight_grad) {
          rms_norm_bwd_rows<scalar_t, A, false>(dyp, xp, wp, rp, gp, dxp, nullptr, block_begin, block_end, n);
          continue;
        }
        rms_norm_bwd_rows<scalar_t, A, true>(dyp, xp, wp, rp, gp, dxp, block.data(), block_begin, block_end, n);
        for (int64_t j = 0; j < n; ++j) thread_partial[j] += static_cast<double>(block[j]);
      }
    });
  });
  // Second stage: num_threads x n -> n in fp64, then cast once to the weight's dtype.
  if (weight_grad) dw->copy_(dw_partial.sum(0));
}

const torch::Tensor* defined_or_null(const std::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> rms_norm_bwd(const torch::Tensor& dy, const torch::Tensor& x,
                                                      const torch::Tensor& weight, const torch::Tensor& rstd,
                                                      bool weight_grad,
                                                      const std::optional<torch::Tensor>& residual_grad) {
  check_device(x, kBwd, "x", c10::DeviceType::CPU);
  check_device(weight, kBwd, "weight", c10::DeviceType::CPU);
  torch::Tensor dx = torch::empty_like(x, at::MemoryFormat::Contiguous);
  // Without weight_grad, dw is an empty (0,) tensor: the caller asked for no weight gradient.
  torch::Tensor dw = weight_grad ? torch::empty_like(weight, at::MemoryFormat::Contiguous) : weight.new_empty({0});
  rms_norm_bwd_impl(dy, x, weight, rstd, defined_or_null(residual_grad), dx, weight_grad ? &dw : nullptr);
  return {dx, dw};
}

}  // namespace lime::cpu
