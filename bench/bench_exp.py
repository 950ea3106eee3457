"""Vectorised exp throughput: the practical limit the Balanced MSE kernels' exp/s are compared against.

``torch.ops.imbreg_fast_bench.exp_throughput(x, variant, repeats)`` (a benchmark-only op: schema
csrc/bench_probes.cpp, kernel csrc/cpu/bench_probes_kernel.cpp, loaded with the C++ extension) applies
exp to every element of ``x`` ``repeats`` times with vector code: variant 0 = Sleef exp (1 ulp, what
``at::vec::Vectorized::exp`` uses), 1 = the kernels' exp (``exp_shifted``, csrc/cpu/fast_exp.h: for z <= 0),
2 = ATen's ``exp_u20`` (the limit issue [P] states its targets against), 3 = the kernels' 2^x (``exp2_shifted``,
for kernels whose exponents carry log2 e; x read as a base-2 exponent). ``torch.exp`` (out=, same element
count) is measured alongside. On 1 and 2 threads; x has 16M floats (DRAM-sized, as the
brief) and 256K floats (L2-resident: the compute limit); values in [-20, 0], the range the kernels
exponentiate (logit minus running max).

Recorded in ``extra_info``: impl, variant, threads, n, repeats, exps (= n * repeats), exp_per_s.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import median_seconds, preset, run_benchmark
from imbreg_fast import _extension

IMPLS = {"sleef_u10": 0, "kernels": 1, "exp_u20": 2, "kernels_exp2": 3, "torch.exp": None}
SIZES = {"full": (2 ** 18, 2 ** 24), "quick": (2 ** 18, 2 ** 24), "smoke": (2 ** 16,)}[preset()]
# exps per benchmarked call: about 0.1-0.3 s at 1-2 G exp/s per core.
EXPS_PER_CALL = {"full": 2 ** 28, "quick": 2 ** 27, "smoke": 2 ** 20}[preset()]


def _exp_kernel_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("imbreg_fast_bench::exp_throughput", "CPU")
    except RuntimeError:
        return False


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("impl", tuple(IMPLS))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_exp_throughput(benchmark, n, impl, threads):
    if threads > (os.cpu_count() or 1):
        pytest.skip(f"{threads} threads requested, {os.cpu_count()} CPUs")
    variant = IMPLS[impl]
    if variant is not None:
        if not _extension.cpp_available():
            pytest.skip(f"cpp backend unavailable: {_extension.cpp_error()}")
        if not _exp_kernel_registered():
            pytest.skip("imbreg_fast_bench::exp_throughput has no CPU kernel registered in this build "
                        "(csrc/cpu/bench_probes_kernel.cpp)")
    repeats = max(1, EXPS_PER_CALL // n)
    x = torch.empty(n).uniform_(-20.0, 0.0, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)

    if variant is None:
        def step():
            for _ in range(repeats):
                torch.exp(x, out=out)
    else:
        def step():
            return torch.ops.imbreg_fast_bench.exp_throughput(x, variant, repeats)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.group = f"exp-n{n}"
        run_benchmark(benchmark, step, measure_memory=False)
    finally:
        torch.set_num_threads(before)
    exps = n * repeats
    benchmark.extra_info.update(impl=impl, variant=variant, threads=threads, n=n, repeats=repeats, exps=exps)
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["exp_per_s"] = exps / median
