// Definitions shared by the CPU kernel files (compiled once per CPU capability, like them).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

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

}  // namespace cpu
}  // namespace imbreg_fast
