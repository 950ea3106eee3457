// Definitions shared by the CPU kernel files (compiled once per CPU capability, like them).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace imbreg_fast {
namespace cpu {

// Reduction codes of the op schemas (imbreg_fast/_validation.py REDUCTIONS, ops/weighted_losses.py).
constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;
constexpr int64_t kReductionSum = 2;
constexpr int64_t kReductionWeightedMean = 3;

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

}  // namespace cpu
}  // namespace imbreg_fast
