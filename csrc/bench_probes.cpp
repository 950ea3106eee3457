// Benchmark-only operator schemas, in their own namespace imbreg_fast_bench (not part of the library's API;
// no fake kernel or autograd). Kernels: csrc/cpu/bench_probes_kernel.cpp (one build per CPU capability).
#include <torch/library.h>

TORCH_LIBRARY(imbreg_fast_bench, m) {
  // Vectorised-exp throughput probe (bench/bench_exp.py): sum(exp(x)) computed `repeats` times with
  // variant 0 = Sleef exp (1 ulp), 1 = the kernels' exp (fast_exp.h), 2 = ATen exp_u20. x: contiguous float32 CPU tensor.
  // Returns the sum of the last pass as a float32 scalar tensor.
  m.def("exp_throughput(Tensor x, int variant, int repeats) -> Tensor");
  // The chunk length R of the uniform-grid recurrence mixture_nll_fwd takes for these tables (d = 1; kernel
  // csrc/cpu/balanced_mse_kernel.cpp), 0 when it takes the general path (tests/test_bni_grid.py).
  m.def("mixture_grid_chunk(Tensor log_weight, Tensor log_norm, Tensor means, Tensor precision, "
        "Tensor grad_var_bias) -> int");
}
