// Single-threaded symmetric Gram matrix G = X^T X (upper triangle) for the CPU kernels, per CPU capability.
//
// Register tiles of MR rows x NV vectors of G (outer products over the rows of X, read in place: NV vector loads and
// MR broadcasts per row of X, MR * NV accumulators), only the tiles that meet the upper triangle (those on the
// diagonal also write entries below it). When C is not a multiple of the vector width VL, the last vector of
// columns is [C - VL, C) and the last tile of rows is [C - MR, C): they overlap their neighbours, whose entries they
// recompute with the same operations in the same order, hence the same bits. Every entry is one multiply-add chain
// over the rows in order: the result does not depend on the tiling, the alignment or the thread. x and out must not
// overlap.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "cpu/simd.h"

namespace imbreg_fast {
namespace gram {

using simd::fmadd;
using simd::Vec;

// G[i0 : i0 + MR, j[v] : j[v] + VL] (+)= sum_r x[r, i0 + m] x[r, j[v] : j[v] + VL] for v < NV.
//   x: [rows, *] row stride ldx; out: G with row stride ldo, read first when accumulate.
template <typename T, int MR, int NV>
inline void tile(const T* x, int64_t ldx, int64_t rows, int64_t i0, std::array<int64_t, NV> j, T* out,
                 int64_t ldo, bool accumulate) {
  using V = Vec<T>;
  V acc[MR][NV];
  T* o = out + i0 * ldo;
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = accumulate ? V::loadu(o + m * ldo + j[v]) : V(T(0));
  }
  const T* a = x + i0;
  for (int64_t r = 0; r < rows; ++r, a += ldx) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(a - i0 + j[v]);
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m) {
      const V am(a[m]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = fmadd(am, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v].store(o + m * ldo + j[v]);
  }
}

// Tiles of rows [i0, i0 + MR) for the vectors of columns v0, v0 + 1, ... < nvec starting at col(v):
// NV at a time, the rest as 2 + 2 rather than NV + 1 when NV = 3 (an MR x 1 tile has too few accumulators to
// hide the fma latency).
template <typename T, int MR, int NV, typename Col>
inline void tile_row(const T* x, int64_t ldx, int64_t rows, int64_t i0, int64_t v0, int64_t nvec, Col col,
                     T* out, int64_t ldo, bool accumulate) {
  static_assert(NV >= 1 && NV <= 3, "tile widths 1..3 vectors");
  int64_t v = v0;
  for (; nvec - v >= NV && !(NV == 3 && nvec - v == 4); v += NV) {
    std::array<int64_t, NV> j;
    for (int k = 0; k < NV; ++k) j[k] = col(v + k);
    tile<T, MR, NV>(x, ldx, rows, i0, j, out, ldo, accumulate);
  }
  if constexpr (NV > 1) {
    for (; nvec - v >= 2; v += 2) tile<T, MR, 2>(x, ldx, rows, i0, {col(v), col(v + 1)}, out, ldo, accumulate);
  }
  if (v < nvec) tile<T, MR, 1>(x, ldx, rows, i0, {col(v)}, out, ldo, accumulate);
}

template <typename T, int MR, int NV, int64_t L2 = (int64_t(1) << 20), int64_t PANEL = (int64_t(256) << 10)>
inline void gram_upper_impl(const T* x, int64_t rows, int64_t C, int64_t ldx, T* out, int64_t ldo) {
  constexpr int64_t VL = Vec<T>::size();
  static_assert(VL % MR == 0 || MR % VL == 0, "tiles of rows aligned with the vectors of columns");
  constexpr int64_t W = std::max<int64_t>(VL, MR);
  if (C < W) {
    // x copied KB rows at a time into [KB, W] zero-padded rows; G accumulated in a [W, W] buffer.
    constexpr int64_t KB = 64;
    alignas(64) T buf[KB * W] = {};
    alignas(64) T g[W * W];
    const auto col = [](int64_t v) { return v * VL; };
    const int64_t nblocks = std::max<int64_t>(1, (rows + KB - 1) / KB);
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t kr = std::min(KB, rows - blk * KB);
      for (int64_t r = 0; r < kr; ++r) {
        const T* src = x + (blk * KB + r) * ldx;
        for (int64_t c = 0; c < C; ++c) buf[r * W + c] = src[c];
      }
      for (int64_t i0 = 0; i0 < C; i0 += MR) {
        tile_row<T, MR, NV>(buf, W, kr, i0, i0 / VL, W / VL, col, g, W, blk > 0);
      }
    }
    for (int64_t i = 0; i < C; ++i) std::copy(g + i * W + i, g + i * W + C, out + i * ldo + i);
    return;
  }
  const int64_t nfull = C / VL;
  const int64_t nvec = (C + VL - 1) / VL;
  const auto col = [=](int64_t v) { return v < nfull ? v * VL : C - VL; };
  // When x outgrows L2, columns in blocks of nb vectors: the panel x[:, block], re-read for every tile of rows,
  // then stays in L2 (PANEL bytes: the best of 128 KB .. 2 MB measured on a 1 MB L2, rows 256..512, C 384..1024).
  int64_t nb = nvec;
  const int64_t row_bytes = std::max<int64_t>(rows, 1) * VL * int64_t(sizeof(T));
  if (row_bytes * nvec > L2) nb = std::min(nvec, std::max<int64_t>(NV, PANEL / row_bytes / NV * NV));
  for (int64_t vb = 0; vb < nvec; vb += nb) {
    const int64_t ve = std::min(nvec, vb + nb);
    for (int64_t i0 = 0; i0 < C; i0 += MR) {
      const int64_t i = std::min<int64_t>(i0, C - MR);
      if (i / VL >= ve) break;
      tile_row<T, MR, NV>(x, ldx, rows, i, std::max(i / VL, vb), ve, col, out, ldo, false);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 32 zmm registers: MR x NV = 8 x 3 accumulators + 3 loads (11 loads per 24 fma; 16 x 2 measures the same).
template <typename T> struct Tiling { static constexpr int MR = 8, NV = 3; };
#elif defined(CPU_CAPABILITY_AVX2)
// 16 ymm registers: 4 x 3 accumulators + 3 loads + 1 broadcast.
template <typename T> struct Tiling { static constexpr int MR = 4, NV = 3; };
#elif defined(__SSE2__)
// 16 xmm registers: 4 x 3 accumulators + 3 loads + 1 broadcast.
template <typename T> struct Tiling { static constexpr int MR = 4, NV = 3; };
#else
// Other DEFAULT builds (e.g. aarch64, where Vectorized is NEON): small tiles, whatever the vector width.
template <typename T> struct Tiling { static constexpr int MR = 4, NV = 1; };
#endif

// Upper triangle of G = X^T X, diagonal included: out[i * ldo + j] = sum_r x[r * ldx + i] * x[r * ldx + j]
// for 0 <= i <= j < C, overwritten; entries with i > j may be written with anything.
//   x: [rows, C] with row stride ldx >= C; out: [C, C] with row stride ldo >= C.
template <typename T>
inline void gram_upper(const T* x, int64_t rows, int64_t C, int64_t ldx, T* out, int64_t ldo) {
  gram_upper_impl<T, Tiling<T>::MR, Tiling<T>::NV>(x, rows, C, ldx, out, ldo);
}

}  // namespace gram
}  // namespace imbreg_fast
