// Pairwise Euclidean distances from the differences themselves: ||a - b||^2 = sum_c (a_c - b_c)^2, never
// ||a||^2 + ||b||^2 - 2 a.b (which cancels catastrophically for the close pairs of two views of a sample:
// relative error ~ eps ||a||^2 / ||a - b||^2). Fixed summation order per pair (vector lanes, then the lanes in
// a fixed tree, then the tail), each unordered pair computed once, so r(a, b) == r(b, a) and the result does
// not depend on the thread count.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/common.h"

namespace imbreg_fast {
namespace cpu {

// sum_c (a_c - b_k,c)^2 over c < d for the K rows b[k] (k < K): one accumulator chain per row (vector lanes in
// feature order), the K chains interleaved so that they run in parallel instead of one after the other; then
// each chain's lanes in a fixed tree and the tail in double. Row k's result does not depend on K or on the other
// rows: the same bits as K = 1.
template <typename T, int K>
inline void squared_distances(const T* a, const T* const* b, int64_t d, double* out) {
  using V = at::vec::Vectorized<T>;
  int64_t c = 0;
  V acc[K];
  for (int k = 0; k < K; ++k) acc[k] = V(T(0));
  for (; c + V::size() <= d; c += V::size()) {
    const V av = V::loadu(a + c);
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const V diff = av - V::loadu(b[k] + c);
      acc[k] = at::vec::fmadd(diff, diff, acc[k]);
    }
  }
  for (int k = 0; k < K; ++k) {
    double total = d >= V::size() ? static_cast<double>(at::vec::vec_reduce_all<T>(
                                        [](const V& x, const V& y) { return x + y; }, acc[k]))
                                  : 0.0;
    for (int64_t t = c; t < d; ++t) {
      const double diff = static_cast<double>(a[t]) - static_cast<double>(b[k][t]);
      total += diff * diff;
    }
    out[k] = total;
  }
}

// out[c] = sum_j h_j (a_c - b_jc) for c < d, b [m, d] rows, from the differences themselves (never
// (sum_j h_j) a - sum_j h_j b_j, which cancels where h_j is large, i.e. for close pairs). Columns in register
// blocks of up to kBlockVecs vectors, rows j in order: a fixed summation order.
template <typename T>
inline void weighted_differences(T* out, const T* a, const T* b, const T* h, int64_t m, int64_t d) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kBlockVecs = 8;
  int64_t c0 = 0;
  for (; c0 + V::size() <= d; c0 += kBlockVecs * V::size()) {
    const int64_t nv = std::min<int64_t>(kBlockVecs, (d - c0) / V::size());
    V acc[kBlockVecs], av[kBlockVecs];
    for (int64_t k = 0; k < kBlockVecs; ++k) {
      acc[k] = V(T(0));
      av[k] = k < nv ? V::loadu(a + c0 + k * V::size()) : V(T(0));
    }
    if (nv == kBlockVecs) {
      for (int64_t j = 0; j < m; ++j) {
        const V hv(h[j]);
        const T* bj = b + j * d + c0;
        for (int64_t k = 0; k < kBlockVecs; ++k) acc[k] = at::vec::fmadd(hv, av[k] - V::loadu(bj + k * V::size()), acc[k]);
      }
    } else {
      for (int64_t j = 0; j < m; ++j) {
        const V hv(h[j]);
        const T* bj = b + j * d + c0;
        for (int64_t k = 0; k < nv; ++k) acc[k] = at::vec::fmadd(hv, av[k] - V::loadu(bj + k * V::size()), acc[k]);
      }
    }
    for (int64_t k = 0; k < nv; ++k) acc[k].store(out + c0 + k * V::size());
    if (nv < kBlockVecs) {
      c0 += nv * V::size();
      break;
    }
  }
  for (int64_t c = c0; c < d; ++c) {   // the tail (< one vector)
    T acc = T(0);
    for (int64_t j = 0; j < m; ++j) acc += h[j] * (a[c] - b[j * d + c]);
    out[c] = acc;
  }
}

// dist [n, n] = ||x_i - x_j||_2 for x [n, d], each unordered pair computed once (row pairs (p, n - 1 - p) per task,
// so every task has the same work), squared distances reduced to T, square roots vectorised per row.
template <typename T>
void pairwise_distances(const T* x, int64_t n, int64_t d, T* dist, int64_t grain) {
  using V = at::vec::Vectorized<T>;
  auto row = [&](int64_t i) {
    dist[i * n + i] = T(0);
    const T* xi = x + i * d;
    int64_t j = i + 1;
    double sq[4];
    for (; j + 4 <= n; j += 4) {
      const T* b[4] = {x + j * d, x + (j + 1) * d, x + (j + 2) * d, x + (j + 3) * d};
      squared_distances<T, 4>(xi, b, d, sq);
      for (int k = 0; k < 4; ++k) dist[i * n + j + k] = dist[(j + k) * n + i] = static_cast<T>(sq[k]);
    }
    for (; j < n; ++j) {
      const T* b[1] = {x + j * d};
      squared_distances<T, 1>(xi, b, d, sq);
      dist[i * n + j] = dist[j * n + i] = static_cast<T>(sq[0]);
    }
  };
  at::parallel_for(0, (n + 1) / 2, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      row(p);
      if (n - 1 - p != p) row(n - 1 - p);
    }
  });
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* r = dist + i * n;
      int64_t j = 0;
      for (; j + V::size() <= n; j += V::size()) V::loadu(r + j).sqrt().store(r + j);
      for (; j < n; ++j) r[j] = std::sqrt(r[j]);
    }
  });
}

// Small matrix products for row groups, by register tiles: out[r * ldo + j] = scale * sum_{c < k} x[r][c] b[c * ldb + j]
// for the kTileRows rows x[r] and j < width (a multiple of two vectors; b readable on [0, width) of each of its k
// rows). Each entry is one multiply-add chain over c in order (no lane sums), so it has the same bits whatever the
// grouping or the thread; with b = a transposed, entry (i, j) equals entry (j, i) (the product commutes).
// kTileRows rows x 2 column vectors of accumulators per pass over c. Used for S = z z^T rows (similarity_rows:
// ConR, RankSim) and for dz = A z (RankSim's backward).
constexpr int64_t kTileRows = 4;

template <typename T>
inline void rows_times(const T* const* x, const T* b, int64_t ldb, int64_t k, int64_t width, T scale, T* out,
                       int64_t ldo) {
  using V = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < width; j += 2 * V::size()) {
    V a[kTileRows][2];
    for (int64_t r = 0; r < kTileRows; ++r) a[r][0] = a[r][1] = V(T(0));
    const T* col = b + j;
    for (int64_t c = 0; c < k; ++c, col += ldb) {
      const V b0 = V::loadu(col), b1 = V::loadu(col + V::size());
#pragma GCC unroll 4
      for (int64_t r = 0; r < kTileRows; ++r) {
        const V xr(x[r][c]);
        a[r][0] = at::vec::fmadd(xr, b0, a[r][0]);
        a[r][1] = at::vec::fmadd(xr, b1, a[r][1]);
      }
    }
    for (int64_t r = 0; r < kTileRows; ++r) {
      (a[r][0] * V(scale)).store(out + r * ldo + j);
      (a[r][1] * V(scale)).store(out + r * ldo + j + V::size());
    }
  }
}

// n rounded up to whole pairs of vectors of T (the column padding rows_times needs).
template <typename T>
inline int64_t pad_to_vector_pairs(int64_t n) {
  constexpr int64_t w = 2 * at::vec::Vectorized<T>::size();
  return (n + w - 1) / w * w;
}

// z^T of the first n rows of z [*, d] as [d, npad] (npad = pad_to_vector_pairs<T>(n)), zero columns past n: the
// operand of similarity_rows.
template <typename T>
inline std::vector<T> transpose_padded(const T* z, int64_t n, int64_t d, int64_t npad) {
  std::vector<T> zt(d * npad, T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < d; ++c) zt[c * npad + i] = z[i * d + c];
  }
  return zt;
}

// S rows i0 .. i0 + kTileRows - 1 of scale z z^T (rows past n repeat row n - 1): out[r * npad + j] =
// scale (z_i . z_j) for j < npad, from zt = transpose_padded(z, n, d, npad); one multiply-add chain per entry over
// the features in order (the same bits for S_ji: the product commutes), whatever the grouping.
template <typename T>
inline void similarity_rows(const T* z, const T* zt, int64_t n, int64_t npad, int64_t d, int64_t i0, T scale,
                            T* out) {
  const T* zr[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) zr[r] = z + std::min(i0 + r, n - 1) * d;
  rows_times(zr, zt, npad, d, npad, scale, out, npad);
}

}  // namespace cpu
}  // namespace imbreg_fast
