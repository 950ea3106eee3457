// The vector type of the register-tiled kernels (gram.h, gemm.h), per CPU capability: at::vec::Vectorized
// in the AVX2 / AVX-512 builds (and off x86); in the DEFAULT build on x86-64, where the generic Vectorized
// (arrays of 8 float / 4 double) compiles to scalar code and shuffles in these loops, SSE2 (the x86-64
// baseline) directly, with fma as a multiply and an add.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#if defined(__SSE2__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define IMBREG_SIMD_SSE2 1
#include <emmintrin.h>
#endif

namespace imbreg_fast {
namespace simd {

#if defined(IMBREG_SIMD_SSE2)
template <typename T> struct Sse2;
template <> struct Sse2<float> {
  __m128 v;
  static constexpr int64_t size() { return 4; }
  Sse2() = default;
  Sse2(__m128 w) : v(w) {}
  explicit Sse2(float a) : v(_mm_set1_ps(a)) {}
  static Sse2 loadu(const float* p) { return _mm_loadu_ps(p); }
  void store(float* p) const { _mm_storeu_ps(p, v); }
  void store(float* p, int count) const {
    alignas(16) float buf[4];
    _mm_store_ps(buf, v);
    std::copy(buf, buf + count, p);
  }
};
template <> struct Sse2<double> {
  __m128d v;
  static constexpr int64_t size() { return 2; }
  Sse2() = default;
  Sse2(__m128d w) : v(w) {}
  explicit Sse2(double a) : v(_mm_set1_pd(a)) {}
  static Sse2 loadu(const double* p) { return _mm_loadu_pd(p); }
  void store(double* p) const { _mm_storeu_pd(p, v); }
  void store(double* p, int count) const {
    alignas(16) double buf[2];
    _mm_store_pd(buf, v);
    std::copy(buf, buf + count, p);
  }
};
inline Sse2<float> fmadd(const Sse2<float>& a, const Sse2<float>& b, const Sse2<float>& c) {
  return _mm_add_ps(_mm_mul_ps(a.v, b.v), c.v);
}
inline Sse2<double> fmadd(const Sse2<double>& a, const Sse2<double>& b, const Sse2<double>& c) {
  return _mm_add_pd(_mm_mul_pd(a.v, b.v), c.v);
}
template <typename T> using Vec = Sse2<T>;
#else
template <typename T> using Vec = at::vec::Vectorized<T>;
using at::vec::fmadd;
#endif

}  // namespace simd
}  // namespace imbreg_fast
