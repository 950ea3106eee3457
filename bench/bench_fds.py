"""FDS kernels: recolouring (forward, forward + backward) and per-bin statistics accumulation; time and
peak extra memory, our backends side by side with the reference-style formulations of imbreg_fast/experiments/published.py.

Problem (``IMBREG_BENCH_SIZES=full``, the default): dense features ``[8, C, 60, 80]`` (N = 38400 pixels),
C = 32, 64, 128, 100 depth bins of 0.1 m with a skewed (depth-like) occupancy, fp32. Providers:

- ``cpp`` / ``torch`` (/ ``triton`` on CUDA): our ops through the dispatch (``fds_recolor`` /
  ``fds_accumulate`` on the features' [B, C, P] view, bins given); ``module-cpp``: the :class:`imbreg_fast.FDS`
  calls (labels -> bins, checks; for accumulation also the Chan merge into the float64 accumulators);
- recolouring: (a) ``gathered`` ``bmm(A[bins], z)``, (b) ``masked_loop``, (c) ``sorted_loop`` (sort + one
  matmul per bin), (d) ``grouped_mm`` (sort included) and ``grouped_mm_presorted`` (sort done beforehand);
- accumulation: ``masked_loop`` (per-bin loop) and ``outer`` (index_add of per-pixel outer products).

The formulations read pixel rows, so they include the ``[B, C, H, W] -> [N, C]`` permute copy, as a user of
them would. Recorded in ``extra_info``: case, provider, pass, ``gemm_gflop`` (2 N C^2 per direction: the
matrix products' work) and ``gflop_per_s``, peak extra memory (bench/peak_memory.py: the larger of PyTorch's
CPU allocator peak and the resident-set high-water mark). Goals (on this 2-core machine): recolouring
forward + backward >= 3x faster than (c), faster than (d) with its sort, within 2x of the GEMM bound;
accumulation >= 3x faster than the per-bin loop and >= 30x faster than the outer products; extra memory
O(N C + bins C^2).

Run on a quiet machine (the full preset takes about 10 minutes: the slow formulations run >= 5 rounds)::

    .venv/bin/python -m pytest bench/bench_fds.py --benchmark-only
    IMBREG_BENCH_SIZES=smoke .venv/bin/python -m pytest bench/bench_fds.py --benchmark-only -q   # harness check
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import imbreg_fast
import imbreg_fast.experiments.published as ref
from harness import median_seconds, memory_gate, preset, run_benchmark
from imbreg_fast import _dispatch, _extension
from imbreg_fast.lds import bin_index
from imbreg_fast.ops import fds as fds_ops


@dataclass(frozen=True)
class Case:
    b: int
    c: int
    h: int
    w: int
    num_bins: int

    def __str__(self) -> str:
        return f"C{self.c}-N{self.n}-bins{self.num_bins}"

    @property
    def n(self) -> int:
        return self.b * self.h * self.w

    def with_pixels(self, b: int) -> "Case":
        return Case(b, self.c, self.h, self.w, self.num_bins)


def _cases(name: str) -> list[Case]:
    if name == "smoke":
        return [Case(1, 8, 12, 16, 10)]
    channels = (32, 128) if name == "quick" else (32, 64, 128)
    return [Case(8, c, 60, 80, 100) for c in channels]


CASES = _cases(preset())
RECOLOR_PROVIDERS = ("cpp", "torch", "triton", "module-cpp", "gathered", "masked_loop", "sorted_loop", "grouped_mm",
                     "grouped_mm_presorted")
ACCUMULATE_PROVIDERS = ("cpp", "torch", "triton", "module-cpp", "masked_loop", "outer")
MATERIALISING = ("gathered", "outer")         # [N, C, C] temporaries


@dataclass
class Problem:
    features: torch.Tensor      # [B, C, H, W] fp32 leaf
    labels: torch.Tensor        # [B, 1, H, W] depth in metres, skewed towards small depths
    bins: torch.Tensor          # [B, H*W] int64
    transform: torch.Tensor     # [nb, C, C] fp32
    shift: torch.Tensor         # [nb, C] fp32
    grad: torch.Tensor          # [B, C, H, W] upstream gradient


def make_problem(case: Case, device="cpu") -> Problem:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(case.b, case.c, case.h, case.w, generator=g)
    labels = 10.0 * torch.rand(case.b, 1, case.h, case.w, generator=g) ** 2
    edges = torch.linspace(0.0, 10.0, case.num_bins + 1, dtype=torch.float64)
    bins = bin_index(labels, edges).reshape(case.b, -1).contiguous()
    eye = torch.eye(case.c)
    transform = eye + torch.randn(case.num_bins, case.c, case.c, generator=g) / (4 * math.sqrt(case.c))
    shift = torch.randn(case.num_bins, case.c, generator=g)
    grad = torch.randn(features.shape, generator=g)
    to = dict(device=device)
    return Problem(features.to(**to).requires_grad_(), labels.to(**to), bins.to(**to), transform.to(**to),
                   shift.to(**to), grad.to(**to))


def make_module(case: Case, p: Problem, backend: str) -> imbreg_fast.FDS:
    """An FDS module in its calibrating state with the problem's transforms (no eigendecomposition)."""
    fds = imbreg_fast.FDS(case.c, case.num_bins, (0.0, 10.0), backend=backend).to(p.features.device)
    fds.update()                                            # epoch 1 >= start_smooth: calibrating
    fds.transform.copy_(p.transform)
    fds.shift.copy_(p.shift)
    fds._refresh_f32()
    return fds


def recolor_fn(case: Case, p: Problem, provider: str):
    """() -> recoloured features of the problem, differentiable w.r.t. p.features."""
    if provider in ("cpp", "torch", "triton"):
        impl = _dispatch.resolve("fds_recolor", p.features, provider)[1]
        return lambda: fds_ops.restore_layout(impl(fds_ops.as_pixels(p.features), p.bins, p.transform, p.shift),
                                              p.features)
    if provider == "module-cpp":
        fds = make_module(case, p, "cpp")
        return lambda: fds(p.features, p.labels)
    if provider == "grouped_mm_presorted":
        presorted = ref.grouped_mm_presort(p.bins, case.num_bins)
        return lambda: ref.recolor_grouped_mm(p.features, p.bins, p.transform, p.shift, presorted)
    formulation = {"gathered": ref.recolor_gathered, "masked_loop": ref.recolor_masked_loop,
                   "sorted_loop": ref.recolor_sorted_loop, "grouped_mm": ref.recolor_grouped_mm}[provider]
    return lambda: formulation(p.features, p.bins, p.transform, p.shift)


def accumulate_fn(case: Case, p: Problem, provider: str):
    feats = p.features.detach()
    if provider in ("cpp", "torch", "triton"):
        impl = _dispatch.resolve("fds_accumulate", feats, provider)[1]
        return lambda: impl(fds_ops.as_pixels(feats), p.bins, case.num_bins, True)
    if provider == "module-cpp":
        fds = imbreg_fast.FDS(case.c, case.num_bins, (0.0, 10.0), backend="cpp").to(feats.device)
        return lambda: fds.accumulate(feats, p.labels)
    if provider == "masked_loop":
        return lambda: ref.accumulate_masked_loop(feats, p.bins, case.num_bins)
    return lambda: ref.accumulate_outer(feats, p.bins, case.num_bins)


def recolor_step(case: Case, provider: str, pass_: str, device="cpu"):
    p = make_problem(case, device)
    fn = recolor_fn(case, p, provider)

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                fn()
            return
        p.features.grad = None
        fn().backward(p.grad)

    return step


def accumulate_step(case: Case, provider: str, device="cpu"):
    p = make_problem(case, device)
    fn = accumulate_fn(case, p, provider)

    def step():
        with torch.no_grad():
            fn()

    return step


def skip_unavailable(case: Case, provider: str, device="cpu") -> None:
    kind = provider.removeprefix("module-")
    if kind == "cpp":
        if not _extension.cpp_available():
            pytest.skip(f"cpp backend unavailable: {_extension.cpp_error()}")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("imbreg_fast::fds_recolor", "CPU"):
            pytest.skip("this build of the extension has no FDS kernels")
    if kind == "triton":
        reason = _dispatch._triton_reason(torch.device(device))
        if reason is not None or device == "cpu":
            pytest.skip("triton backend: CUDA tensors only here (the interpreter is not benchmarked)")
    if provider.startswith("grouped_mm") and (case.c % 4 or not hasattr(torch.nn.functional, "grouped_mm")):
        pytest.skip("torch.nn.functional.grouped_mm on CPU needs fp32 rows of 16-byte multiples (C % 4 == 0)")


def gate(case: Case, what: str, make_step) -> None:
    """Skip a materialising formulation that would not fit the memory budget (probes at 1/8 and 1/4 of N)."""
    sizes = (max(1, case.b // 8), max(1, case.b // 4))
    if case.n * case.c * case.c * 4 * 3 < 2 ** 31 or sizes[0] == sizes[1]:
        return
    memory_gate(what, lambda b: make_step(case.with_pixels(b)), sizes, lambda b: float(b), case.b,
                note=f"its [N, C, C] fp32 temporaries alone take {case.n * case.c ** 2 * 4 / 2 ** 30:.1f} GB")


def _record(benchmark, case: Case, provider: str, pass_: str, gemm_flop: float) -> None:
    info = benchmark.extra_info
    info.update(case=str(case), provider=provider, pass_=pass_, n=case.n, c=case.c, num_bins=case.num_bins,
                dtype="float32", gemm_gflop=round(gemm_flop / 1e9, 4))
    if provider.removeprefix("module-") in ("cpp", "torch", "triton"):
        info["backend"] = provider.removeprefix("module-")


@pytest.mark.parametrize("provider", RECOLOR_PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_recolor(benchmark, case: Case, pass_: str, provider: str):
    skip_unavailable(case, provider)
    if provider in MATERIALISING:
        gate(case, f"recolouring formulation {provider}", lambda c: recolor_step(c, provider, pass_))
    benchmark.group = f"recolor-{pass_}-{case}"
    gemm_flop = 2.0 * case.n * case.c ** 2 * (2 if pass_ == "fwd_bwd" else 1)
    _record(benchmark, case, provider, pass_, gemm_flop)
    run_benchmark(benchmark, recolor_step(case, provider, pass_))
    median = median_seconds(benchmark)
    if median:
        benchmark.extra_info["gflop_per_s"] = round(gemm_flop / median / 1e9, 2)


@pytest.mark.parametrize("provider", ACCUMULATE_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_accumulate(benchmark, case: Case, provider: str):
    skip_unavailable(case, provider)
    if provider in MATERIALISING:
        gate(case, f"accumulation formulation {provider}", lambda c: accumulate_step(c, provider))
    benchmark.group = f"accumulate-{case}"
    gemm_flop = 2.0 * case.n * case.c ** 2
    _record(benchmark, case, provider, "accumulate", gemm_flop)
    run_benchmark(benchmark, accumulate_step(case, provider))
    median = median_seconds(benchmark)
    if median:
        benchmark.extra_info["gflop_per_s"] = round(gemm_flop / median / 1e9, 2)
