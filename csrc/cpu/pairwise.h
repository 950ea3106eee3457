// Pairwise Euclidean distances from the differences themselves: ||a - b||^2 = sum_c (a_c - b_c)^2, never
// ||a||^2 + ||b||^2 - 2 a.b (which cancels catastrophically for the close pairs of two views of a sample:
// relative error ~ eps ||a||^2 / ||a - b||^2). Fixed summation order per pair (vector lanes, then the lanes in
// order, then the tail), so r(a, b) == r(b, a) bit for bit ((a - b)^2 == (b - a)^2 exactly) and the result
// does not depend on the thread count.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

#include "cpu/common.h"

namespace imbreg_fast {
namespace cpu {

// sum_c (a_c - b_c)^2 over c < d, in double (lanes accumulated in T).
template <typename T>
inline double squared_distance(const T* a, const T* b, int64_t d) {
  using V = at::vec::Vectorized<T>;
  int64_t c = 0;
  double total = 0.0;
  if (d >= V::size()) {
    V acc(T(0));
    for (; c + V::size() <= d; c += V::size()) {
      const V diff = V::loadu(a + c) - V::loadu(b + c);
      acc = at::vec::fmadd(diff, diff, acc);
    }
    total = hsum(acc);
  }
  for (; c < d; ++c) {
    const double diff = static_cast<double>(a[c]) - static_cast<double>(b[c]);
    total += diff * diff;
  }
  return total;
}

// out[c] += coef * (a_c - b_c) for c < d.
template <typename T>
inline void axpy_difference(T* out, T coef, const T* a, const T* b, int64_t d) {
  using V = at::vec::Vectorized<T>;
  const V vc(coef);
  int64_t c = 0;
  for (; c + V::size() <= d; c += V::size()) {
    at::vec::fmadd(vc, V::loadu(a + c) - V::loadu(b + c), V::loadu(out + c)).store(out + c);
  }
  for (; c < d; ++c) out[c] += coef * (a[c] - b[c]);
}

}  // namespace cpu
}  // namespace imbreg_fast
