// exp of shifted logits (z = l - max l <= 0) for the CPU kernels, per CPU capability.
//
// fp32, AVX2 / AVX-512 builds: exp_nonpositive() below, written for z <= 0 only (no overflow branch):
//   n = round(z log2 e) by the 1.5 * 2^23 shifter (one fma), r = z - n ln 2 with a two-part ln 2
//   (Cody-Waite), exp(r) by exp_u20's degree-5 polynomial, 2^n assembled from the shifter's low bits (one
//   integer shift and add). 14 vector operations against the 18 of Vectorized<float>::exp_u20(), and a more
//   accurate reduction. Measured against exp in double on 4200 floats in [-87.33, 0]: max relative error
//   1.5e-7 (tested below 5e-7: tests/test_cpp_kernels_smoke.py::test_kernels_exp_accuracy_and_edges).
//   Compiling with -DIMBREG_EXP_U20 uses exp_u20() instead (for comparisons). Below ln(FLT_MIN) = -87.34
//   it returns exactly 0 when denormals are flushed (the kernels run under cpu::FlushDenormals; without it
//   z in (-87.68, -87.34) gives the denormal p 2^-126): the true value is < 2^-126, a term < 2e-38 of the
//   largest one, which is exactly 1 since exp(0) == 1. Its 14 operations have no select. NaN stays NaN. z > 0 is outside its contract (exp_u20() covers it; the kernels
//   never pass it).
// fp32, DEFAULT build on x86-64: Vectorized<float>::exp_u20() there is std::exp per lane (a libm call
//   each), so exp_u20_sse2() below does the same computation with SSE2, the x86-64 baseline. Without FMA
//   the reduction uses a two-part ln 2. Measured like the above: max relative error 2.1e-7 (2.7 ulp) on
//   [-86.6, 0]; exp(0) == 1; below about -86.64 the intermediate 2^(n-1) p is below 2^-126 and the kernels'
//   flushed denormals make it exactly 0. NaN stays NaN.
// fp32, DEFAULT build elsewhere (e.g. aarch64, where Vectorized is NEON): Vectorized<float>::exp_u20().
// fp64, every build: Vectorized<double>::exp() (Sleef, 1 ulp; std::exp per lane in DEFAULT builds).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace imbreg_fast {

#if defined(__SSE2__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define IMBREG_EXP_SSE2 1
// exp_u20's algorithm with SSE2 only (the x86-64 baseline), 4 lanes at a time.
inline at::vec::Vectorized<float> exp_u20_sse2(const at::vec::Vectorized<float>& z) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  static_assert(W % 4 == 0, "the DEFAULT Vectorized<float> holds a multiple of 4 floats");
  const __m128 log2e = _mm_set1_ps(1.44269504088896341f);
  const __m128 ln2_hi = _mm_set1_ps(0.693359375f);      // 9 significant bits: n * ln2_hi is exact
  const __m128 ln2_lo = _mm_set1_ps(-2.12194440e-4f);   // ln 2 - ln2_hi
  const __m128 ln_flt_min = _mm_set1_ps(-87.3365478515625f);
  const __m128 ln_flt_max = _mm_set1_ps(88.72283172607421875f);
  const __m128 half = _mm_set1_ps(0.5f), one = _mm_set1_ps(1.0f), two = _mm_set1_ps(2.0f);
  const __m128 c5 = _mm_set1_ps(0.00828929059f), c4 = _mm_set1_ps(0.0418978221f),
               c3 = _mm_set1_ps(0.166676521f), c2 = _mm_set1_ps(0.499991506f), c1 = _mm_set1_ps(0.999999701f);
  const __m128i bias = _mm_set1_epi32(126);
  __at_align__ float buf[W];
  z.store(buf);
  for (int64_t l = 0; l < W; l += 4) {
    const __m128 x = _mm_load_ps(buf + l);
    const __m128 below = _mm_cmplt_ps(x, ln_flt_min);
    const __m128 v = _mm_max_ps(ln_flt_min, _mm_min_ps(ln_flt_max, x));   // NaN x: min/max return x
    // n = floor(v log2e + 1/2) from a truncating conversion
    const __m128 t = _mm_add_ps(_mm_mul_ps(v, log2e), half);
    __m128i n = _mm_cvttps_epi32(t);
    n = _mm_add_epi32(n, _mm_castps_si128(_mm_cmplt_ps(t, _mm_cvtepi32_ps(n))));  // -1 where rounded up
    const __m128 fn = _mm_cvtepi32_ps(n);
    const __m128 r = _mm_sub_ps(_mm_sub_ps(v, _mm_mul_ps(fn, ln2_hi)), _mm_mul_ps(fn, ln2_lo));
    __m128 p = _mm_add_ps(_mm_mul_ps(c5, r), c4);
    p = _mm_add_ps(_mm_mul_ps(p, r), c3);
    p = _mm_add_ps(_mm_mul_ps(p, r), c2);
    p = _mm_add_ps(_mm_mul_ps(p, r), c1);
    p = _mm_add_ps(_mm_mul_ps(p, r), one);
    // 2^(n-1) (n - 1 + 127 >= 0 for v >= ln(FLT_MIN)), 0 below ln(FLT_MIN); times 2
    const __m128 scale = _mm_andnot_ps(below, _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n, bias), 23)));
    _mm_store_ps(buf + l, _mm_mul_ps(_mm_mul_ps(p, scale), two));
  }
  return Vec::loadu(buf);
}
#endif

#if (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)) && !defined(IMBREG_EXP_U20)
#define IMBREG_EXP_NONPOSITIVE 1
// exp(z) for z <= 0 (see the top of this file), generic over the AVX2 / AVX-512 Vectorized<float>.
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& z) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec lowest(-88.0f);                              // round(-88 log2 e) = -127: 2^n's bits are 0
  const Vec shifter(12582912.0f);                        // 1.5 * 2^23: adding it rounds to an integer
  const Vec log2e(1.44269504088896341f);
  const Vec ln2_hi(-0.693359375f);                       // -ln 2 in two parts: n * ln2_hi is exact
  const Vec ln2_lo(2.12194440e-4f);
  const Vec x = at::vec::clamp_min(z, lowest);           // n >= -127 below; NaN stays NaN
  const Vec t = at::vec::fmadd(x, log2e, shifter);       // shifter + n, n = round(x log2 e) in [-127, 0]
  const Vec n = t - shifter;
  Vec r = at::vec::fmadd(n, ln2_hi, x);
  r = at::vec::fmadd(n, ln2_lo, r);                       // x - n ln 2, |r| <= ln 2 / 2 (+ rounding)
  Vec p = at::vec::fmadd(Vec(0.00828929059f), r, Vec(0.0418978221f));
  p = at::vec::fmadd(p, r, Vec(0.166676521f));
  p = at::vec::fmadd(p, r, Vec(0.499991506f));
  p = at::vec::fmadd(p, r, Vec(0.999999701f));
  p = at::vec::fmadd(p, r, Vec(1.0f));                    // exp(r); exactly 1 at r = 0
  // 2^n: the low bits of t hold n (two's complement), so bits(t) << 23 == n << 23 (mod 2^32). No select for
  // the underflow: z <= -87.68 gives n = -127, whose bits are those of 0.0, so the result is exactly 0; between
  // that and ln(FLT_MIN) the result is below 2^-126, which the kernels flush to 0 (cpu::FlushDenormals).
  const IVec two_n = (at::vec::cast<int32_t>(t) << IVec(23)) + IVec(127 << 23);
  return p * at::vec::cast<float>(two_n);
}
#endif

#if defined(IMBREG_EXP_NONPOSITIVE)
// 2^x for x <= 0 (a kernel that folds log2 e into its constants saves the exp's multiply and the two-part
// reduction): n = round(x), r = x - n exactly (|r| <= 1/2), 2^r by the exp's degree-5 polynomial in
// r ln 2 (coefficients c_k ln2^k, so the same approximation on the same interval |r ln 2| <= ln 2 / 2;
// c_0 = 1, so 2^0 == 1 exactly), times 2^n. AVX-512: n by vrndscaleps and r by vreduceps (independent), the
// scaling by vscalefps (8 vector operations); AVX2: a clamp, the shifter and an integer add as in
// exp_nonpositive (12). Max relative error against
// 2^x in double on [-126, 0]: tested below 5e-7 (tests/test_cpp_kernels_smoke.py). Below -126 the result is
// below 2^-126 (0 where the kernels flush denormals, 0 exactly for x <= -127); NaN stays NaN.
inline at::vec::Vectorized<float> exp2_nonpositive(const at::vec::Vectorized<float>& z) {
  using Vec = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // n = round(z) and r = z - round(z) (vreduceps) side by side, no clamp: for z = -inf, r = +0 and n = -inf, so
  // vscalefps gives p(0) 2^-inf = 0; a huge finite z likewise gives 0; NaN gives NaN
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec r(_mm512_reduce_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  const Vec x = at::vec::clamp_min(z, Vec(-127.0f));     // NaN stays NaN
  const Vec shifter(12582912.0f);                        // 1.5 * 2^23: adding it rounds to an integer
  const Vec t = x + shifter;                             // shifter + n, n = round(x) in [-127, 0]
  const Vec r = x - (t - shifter);
#endif
  Vec p = at::vec::fmadd(Vec(0.0013263088f), r, Vec(0.009671488f));   // c_5 ln2^5, c_4 ln2^4
  p = at::vec::fmadd(p, r, Vec(0.05550739f));                         // c_3 ln2^3
  p = at::vec::fmadd(p, r, Vec(0.24022242f));                         // c_2 ln2^2
  p = at::vec::fmadd(p, r, Vec(0.69314694f));                         // c_1 ln2
  p = at::vec::fmadd(p, r, Vec(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_scalef_ps(p, n));
#else
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec two_n = (at::vec::cast<int32_t>(t) << IVec(23)) + IVec(127 << 23);   // n = -127: the bits of 0.0
  return p * at::vec::cast<float>(two_n);
#endif
}
#endif

inline at::vec::Vectorized<float> exp_shifted(const at::vec::Vectorized<float>& z) {
#if defined(IMBREG_EXP_SSE2)
  return exp_u20_sse2(z);
#elif defined(IMBREG_EXP_NONPOSITIVE)
  return exp_nonpositive(z);
#else
  return z.exp_u20();
#endif
}

inline at::vec::Vectorized<double> exp_shifted(const at::vec::Vectorized<double>& z) { return z.exp(); }

// 2^z for z <= 0: exp2_nonpositive where it exists (AVX2, AVX-512 builds), else ATen's exp2 (Sleef's in fp64;
// std::exp2 per lane in DEFAULT builds: accurate, not fast). Kernels take the base-2 form of an exponent only
// where kFastExp2<T> says it is the faster one.
template <typename T>
inline constexpr bool kFastExp2 = false;

inline at::vec::Vectorized<float> exp2_shifted(const at::vec::Vectorized<float>& z) {
#if defined(IMBREG_EXP_NONPOSITIVE)
  return exp2_nonpositive(z);
#else
  return z.exp2();
#endif
}

inline at::vec::Vectorized<double> exp2_shifted(const at::vec::Vectorized<double>& z) { return z.exp2(); }

#if defined(IMBREG_EXP_NONPOSITIVE)
template <>
inline constexpr bool kFastExp2<float> = true;
#endif

}  // namespace imbreg_fast
