// CPU kernels of the benchmark-only ops (schemas: csrc/bench_probes.cpp). Compiled once per CPU capability
// like the library kernels, so each probe measures the code that the kernels of that build run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/common.h"

#include "cpu/fast_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace imbreg_fast {
namespace bench {
namespace {

// Elements per parallel block (fixed, so the sum does not depend on the thread count).
constexpr int64_t kExpBlock = 16384;

// exp throughput probe: `repeats` passes of sum(exp(x)) in parallel, returns the last pass's sum (the
// benchmark divides repeats * x.numel() by the time).
// variant 0: Vectorized<float>::exp() (Sleef u10; std::exp per lane in DEFAULT builds), 1: the kernels'
// exp_shifted (fast_exp.h), 2: ATen's Vectorized<float>::exp_u20() (std::exp per lane in DEFAULT builds), 3: the
// kernels' exp2_shifted (2^x: the sum is of 2^x).
at::Tensor exp_throughput_cpu(const at::Tensor& x, int64_t variant, int64_t repeats) {
  const char* op = "imbreg_fast_bench::exp_throughput";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(variant >= 0 && variant <= 3, op,
              ": variant must be 0 (Vectorized exp), 1 (the kernels' exp), 2 (ATen exp_u20) or 3 (the kernels' "
              "exp2), got ", variant);
  TORCH_CHECK(repeats >= 1, op, ": repeats must be >= 1, got ", repeats);
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const float* src = x.data_ptr<float>();
  const int64_t n = x.numel();
  const int64_t n_blocks = (n + kExpBlock - 1) / kExpBlock;
  std::vector<double> block_sum(n_blocks, 0.0);
  // One parallel region; each thread repeats its blocks (a region per pass would time thread wake-ups).
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    const cpu::FlushDenormals ftz;   // as the kernels run (fast_exp.h)
    for (int64_t rep = 0; rep < repeats; ++rep) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * kExpBlock, j1 = std::min(n, j0 + kExpBlock);
        Vec acc(0.f);
        int64_t j = j0;
        if (variant == 0) {
          for (; j + W <= j1; j += W) acc = acc + Vec::loadu(src + j).exp();
        } else if (variant == 2) {
          for (; j + W <= j1; j += W) acc = acc + Vec::loadu(src + j).exp_u20();
        } else if (variant == 3) {
          for (; j + W <= j1; j += W) acc = acc + exp2_shifted(Vec::loadu(src + j));
        } else {
          for (; j + W <= j1; j += W) acc = acc + exp_shifted(Vec::loadu(src + j));
        }
        double s = cpu::hsum(acc);
        for (; j < j1; ++j) s += variant == 3 ? std::exp2(double(src[j])) : std::exp(double(src[j]));
        block_sum[b] = s;
      }
#if defined(__GNUC__)
      // compiler barrier: x must be re-read and every pass recomputed (the passes are identical)
      __asm__ __volatile__("" ::: "memory");
#endif
    }
  });
  double total = 0.0;
  for (double v : block_sum) total += v;
  return at::scalar_tensor(total, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast_bench, CPU, m) {
  m.impl("exp_throughput", &exp_throughput_cpu);
}

}  // namespace bench
}  // namespace imbreg_fast
