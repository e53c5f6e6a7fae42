// Eight fp32 lanes loaded from / stored to float, bfloat16 or float16 memory (AVX2 + FMA + F16C).
//
// The kernels compute in fp32 whatever the storage type, so each storage type only needs a
// load that widens to 8 x fp32 and a store that rounds back (round-to-nearest-even, as
// PyTorch's own conversions do, so results match the reference bit for bit where they can).
// Builds without AVX2 (other architectures) get LIME_HAVE_AVX2 = 0 and the kernels use
// their scalar loops only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LIME_HAVE_AVX2 1
#else
#define LIME_HAVE_AVX2 0
#endif

namespace lime::cpu {

// The accumulation type: fp32 for every 16/32-bit float, fp64 for fp64 (used by gradcheck).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> inline float to_float(T v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v) { return static_cast<T>(v); }

#if LIME_HAVE_AVX2
constexpr int kLanes = 8;  // fp32 lanes in one __m256

// True for the storage types that have an 8-lane fp32 load/store below.
template <typename T> struct HasVec { static constexpr bool value = false; };
template <> struct HasVec<float> { static constexpr bool value = true; };
template <> struct HasVec<c10::BFloat16> { static constexpr bool value = true; };
template <> struct HasVec<c10::Half> { static constexpr bool value = true; };

template <typename T> inline __m256 load8(const T* p);
template <typename T> inline void store8(T* p, __m256 v);

template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline void store8<float>(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

template <> inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen each 16-bit value and shift it into place.
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <> inline void store8<c10::BFloat16>(c10::BFloat16* p, __m256 v) {
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then keep the top 16 bits.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lowest_kept, _mm256_set1_epi32(0x7fff))), 16);
  // NaN stays NaN (rounding could carry a NaN's payload into infinity).
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), is_nan);
  // packus works per 128-bit half: (r0..r3, r0..r3 | r4..r7, r4..r7); pick qwords 0 and 2.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <> inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <> inline void store8<c10::Half>(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float horizontal_sum(__m256 v) {
  const __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum2, _mm_movehdup_ps(sum2)));
}

// exp(x) for 8 lanes: Cephes' expf (range reduction by ln 2 split in two parts, then a
// degree-5 polynomial), within 2 ulp of std::exp on [-87.3, 88]. Inputs outside are clamped
// (only sigmoid uses it, and there sigmoid is already 0 or 1 in fp32). NaN propagates: it is
// the second operand of min/max, which is the one they return.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3365f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n: put n + 127 into the exponent field.
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// sigmoid(x) = 1 / (1 + exp(-x)), with an exact division (rcp's 12 bits would show in bf16 tests).
inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#endif  // LIME_HAVE_AVX2

}  // namespace lime::cpu
