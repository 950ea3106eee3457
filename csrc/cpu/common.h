// Definitions shared by the CPU kernel files (compiled once per CPU capability, like them).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace imbreg_fast {
namespace cpu {

// Reduction codes of the op schemas: at::Reduction::None / Mean / Sum (torch's own numbering, as
// torch.nn._reduction.get_enum) and one extension of ours, 'weighted_mean' (weighted losses only), the
// next number. Python side: imbreg_fast/_reduction.py.
constexpr int64_t kReductionWeightedMean = at::Reduction::END;
static_assert(kReductionWeightedMean == at::Reduction::Sum + 1, "imbreg_fast/_reduction.py: WEIGHTED_MEAN = SUM + 1");

// The dtype the kernels compute in: double for double inputs, float otherwise (half / bfloat16 upcast).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Sum of the lanes of v in lane order, in double.
template <typename T>
inline double hsum(const at::vec::Vectorized<T>& v) {
  __at_align__ T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t l = 0; l < at::vec::Vectorized<T>::size(); ++l) s += lanes[l];
  return s;
}

// Adds the lanes of v to acc[0 .. W) in double (W = v's width): per-lane partial sums without a scalar
// conversion and addition per lane. Each lane's sum is the same as a scalar loop's.
inline void add_lanes(double* acc, const at::vec::Vectorized<double>& v) {
  (at::vec::Vectorized<double>::loadu(acc) + v).store(acc);
}

inline void add_lanes(double* acc, const at::vec::Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), lo));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), hi));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), lo));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), hi));
#else
  __at_align__ float lanes[at::vec::Vectorized<float>::size()];
  v.store(lanes);
  for (int64_t l = 0; l < at::vec::Vectorized<float>::size(); ++l) acc[l] += double(lanes[l]);
#endif
}

// at::parallel_for(0, n_blocks, grain, f) with the blocks handed out dynamically: every thread that takes part
// claims chunks of consecutive blocks from a shared counter until none are left, so a thread slowed down (a
// busy core of a shared machine, an efficiency core, a cold cache) does not hold the others at the end of the
// loop, as a static split of the range into one equal part per thread would. For kernels whose blocks are
// independent and write their results to their own slots: which thread runs a block never changes its
// result. As at::parallel_for: one call f(0, n_blocks) when n_blocks <= grain or inside a parallel region, and
// at most ceil(n_blocks / grain) threads.
template <typename F>
void parallel_blocks(int64_t n_blocks, int64_t grain, const F& f) {
  if (n_blocks <= 0) return;
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n_blocks + grain - 1) / std::max<int64_t>(grain, 1));
  if (tasks <= 1 || at::in_parallel_region()) {
    f(0, n_blocks);
    return;
  }
  // about kChunksPerTask chunks per task: the wait at the end is at most one chunk
  constexpr int64_t kChunksPerTask = 16;
  const int64_t chunk = std::max<int64_t>(1, (n_blocks + tasks * kChunksPerTask - 1) / (tasks * kChunksPerTask));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t b0 = next.fetch_add(chunk, std::memory_order_relaxed); b0 < n_blocks;
         b0 = next.fetch_add(chunk, std::memory_order_relaxed)) {
      f(b0, std::min(n_blocks, b0 + chunk));
    }
  });
}

// Denormal results flushed to zero (FTZ) and denormal inputs read as zero (DAZ) for the scope of a kernel's
// parallel block (x86; MXCSR restored at the end). A denormal is below 2^-126 (fp32) / 2^-1022 (fp64): every
// value the kernels produce there is a term they keep against a sum >= 2^-50 (or a gradient term of one), far
// below its rounding, and a denormal operand would cost a microcode assist per instruction. The kernels' fp32
// exp (fast_exp.h) relies on it to return exactly 0 below ln(FLT_MIN).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// In-kernel value checks (check_finite=true). finite_acc(acc, x) = acc + x * 0 stays exactly acc while every
// x is finite and becomes NaN at the first NaN / +-inf (inf * 0 = NaN): one fma per vector, reduced with the
// outputs; nothing a compiler may fold (no fast-math). The name of the argument comes from an exact scan
// that runs only after the flag fired (bad input, or a finite product that overflowed: then nothing raises).
template <typename T>
inline at::vec::Vectorized<T> finite_acc(const at::vec::Vectorized<T>& acc, const at::vec::Vectorized<T>& x) {
  return at::vec::fmadd(x, at::vec::Vectorized<T>(T(0)), acc);
}

// Whether x [n, row] (row values per row; rows dropped by mask [n], when given, skipped) holds a NaN / inf.
template <typename T>
bool any_non_finite(const T* x, int64_t n, int64_t row, const bool* mask) {
  for (int64_t i = 0; i < n; ++i) {
    if (mask != nullptr && !mask[i]) continue;
    for (int64_t c = 0; c < row; ++c) {
      if (!std::isfinite(x[i * row + c])) return true;
    }
  }
  return false;
}

// The ValueError of a failed value check, worded as the Python checks (imbreg_fast/_validation.py
// check_all_finite): "<name> contains NaN or inf[ at kept positions] (pass check_finite=False ...)".
[[noreturn]] inline void raise_non_finite(const char* name, bool masked) {
  TORCH_CHECK_VALUE(false, name, " contains NaN or inf", masked ? " at kept positions" : "",
                    " (pass check_finite=False to skip this check)");
  __builtin_unreachable();
}

}  // namespace cpu
}  // namespace imbreg_fast
