"""Balanced MSE (BMC, GAI, BNI): forward + backward (w.r.t. pred and sigma), time and peak extra memory.

Side by side in one run, per case: our backends (``torch``, ``cpp``; ``triton`` on CUDA only) against the
published formulation (imbreg_fast/experiments/published.py) in eager mode and under ``torch.compile``
(``dynamic=False, fullgraph=True``; compilation is excluded from the timing and reported as
``compile_s``). One benchmarked call = ``loss = f(pred, target, sigma ** 2, ...); loss.backward()``.

Cases (``IMBREG_BENCH_SIZES=full``, the default): BMC on 1-D rows at N = 1024, 4096, 16384, 65536; dense
BMC, N = 8*240*320 pixels against M = 4096 candidates; GAI with K = 2, 16, 128 and BNI with 100 bins at
N = 8*240*320 pixels. Problems a materialising formulation cannot fit in the memory budget are skipped with
the predicted size in the reason (bench/harness.py: ``memory_gate``).

Recorded in ``extra_info``: case, provider, backend actually used, threads, peak extra memory (MB), the
number of exps the op performs (BMC: N*M with M = N or 1 + #candidates; GAI/BNI: N*K) and exps / median.

Run (see BENCHMARKS.md)::

    IMBREG_BENCH_SIZES=quick .venv/bin/python -m pytest bench/bench_balanced_mse.py --benchmark-only \
        --benchmark-json bench/out.json
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest
import torch

import imbreg_fast
import imbreg_fast.experiments.published as pub
import imbreg_fast.functional as F
from harness import median_seconds, memory_gate, preset, run_benchmark
from imbreg_fast import _dispatch, _extension

GB = 2 ** 30


CHECK_FINITE = os.environ.get("IMBREG_BENCH_CHECK_FINITE", "1") != "0"
# A materialising provider is probed for memory (memory_gate) when 12 fp32 copies of its [N, M] logits
# would exceed this.
PROBE_ABOVE_BYTES = 2 * GB


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str                          # 'bmc' | 'bmc_dense' | 'gai' | 'bni' | 'bni_irregular'
    n: int                           # rows (pixels)
    size: int = 0                    # bmc_dense: M candidates; gai / bni: K components; bmc: unused
    dense: tuple | None = None       # (B, H, W): pred/target [B, 1, H, W] for our backends

    def __str__(self) -> str:
        if self.op == "bmc":
            return f"bmc-N{self.n}"
        if self.op == "bmc_dense":
            return f"bmc_dense-N{self.n}-M{self.size}"
        return f"{self.op}-K{self.size}-N{self.n}"

    @property
    def columns(self) -> int:
        """Logits per row: N (BMC), 1 + M (BMC with candidates), K (GAI/BNI)."""
        return {"bmc": self.n, "bmc_dense": 1 + self.size}.get(self.op, self.size)

    @property
    def exps(self) -> int:
        return self.n * self.columns

    def rows_of(self, n: int) -> "Case":
        """The same problem with n rows (row layout): the memory probes."""
        return replace(self, n=n, dense=None)


def _dense(op, bhw, size=0):
    b, h, w = bhw
    return Case(op, b * h * w, size, bhw)


def _cases(name: str) -> list[Case]:
    if name == "full":
        bmc_n, bhw, mix_bhw, m = (1024, 4096, 16384, 65536), (8, 240, 320), (8, 240, 320), 4096
    elif name == "quick":
        bmc_n, bhw, mix_bhw, m = (1024, 4096), (1, 120, 160), (2, 240, 320), 4096
    else:
        bmc_n, bhw, mix_bhw, m = (256, 1024), (1, 24, 32), (1, 24, 32), 256
    return ([Case("bmc", n) for n in bmc_n] + [_dense("bmc_dense", bhw, m)]
            + [_dense("gai", mix_bhw, k) for k in (2, 16, 128)] + [_dense("bni", mix_bhw, 100)]
            + [_dense("bni_irregular", mix_bhw, 100)])


CASES = _cases(preset())

PROVIDERS = ("cpu-reference", "cpu-reference_compile", "cpu-torch", "cpu-cpp",
             "cuda-reference", "cuda-reference_compile", "cuda-torch", "cuda-triton")
MATERIALISING = ("reference", "reference_compile", "torch")
PUBLIC_OP = {"bmc": "bmc_loss", "bmc_dense": "bmc_loss", "gai": "gai_loss", "bni": "bni_loss",
             "bni_irregular": "bni_loss"}
CPP_KERNEL = {"bmc": "imbreg_fast::bmc_fwd", "bmc_dense": "imbreg_fast::bmc_fwd",
              "gai": "imbreg_fast::mixture_nll_fwd", "bni": "imbreg_fast::mixture_nll_fwd",
              "bni_irregular": "imbreg_fast::mixture_nll_fwd"}


# ----------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    pred: torch.Tensor               # leaf, [N, 1] or [B, 1, H, W]
    target: torch.Tensor
    sigma: torch.Tensor              # leaf, [] (noise_var = sigma ** 2)
    extra: tuple                     # candidates [M] | (gmm weights, means, variances) [K] | (centres, weights) [K]


def make_problem(case: Case, device) -> Problem:
    g = torch.Generator().manual_seed(0)
    shape = (case.dense[0], 1, case.dense[1], case.dense[2]) if case.dense else (case.n, 1)
    if case.op == "bmc":
        target = torch.randn(shape, generator=g)
    else:                                                    # depth-like labels in metres
        target = 0.7 + 9.3 * torch.rand(shape, generator=g)
    pred = target + 0.5 * torch.randn(shape, generator=g)
    k = case.size
    if case.op == "bmc_dense":
        extra = (target.reshape(-1)[torch.randperm(case.n, generator=g)[:k]],)
    elif case.op == "gai":
        weights = torch.rand(k, generator=g) + 0.1
        means = torch.linspace(0.7, 10.0, k) + 0.1 * torch.randn(k, generator=g)
        variances = ((9.3 / k) ** 2) * (0.5 + torch.rand(k, generator=g))
        extra = (weights / weights.sum(), means, variances)
    elif case.op in ("bni", "bni_irregular"):
        # bni: bin_prior's evenly spaced bins (the kernels' uniform-grid recurrence); bni_irregular: the same
        # bins moved by up to 1e-3 bin widths, not a grid (the general path: one exp per bin)
        centers = torch.linspace(0.0, 10.0, k + 1)[:-1] + 5.0 / k
        if case.op == "bni_irregular":
            centers = centers + (10.0 / k) * 1e-3 * torch.rand(k, generator=g)
        weights = torch.exp(-0.5 * ((centers - 3.0) / 2.0) ** 2) + 0.01
        extra = (centers, weights / weights.sum())
    else:
        extra = ()
    to = dict(device=device)
    return Problem(pred.to(**to).requires_grad_(), target.to(**to),
                   torch.tensor(1.0, **to).requires_grad_(), tuple(x.to(**to) for x in extra))


# The published formulation as functions of tensors only (one torch.compile cache entry per shape).
def reference_bmc(pred, target, sigma):
    return pub.bmc_loss_published(pred, target, sigma ** 2)


def reference_bmc_dense(pred, target, candidates, sigma):
    return pub.bmc_loss_candidates_published(pred, target, candidates, sigma ** 2)


def reference_gai(pred, target, weights, means, variances, sigma):
    return pub.gai_loss_published(pred, target, sigma ** 2, weights, means, variances)


def reference_bni(pred, target, centers, weights, sigma):
    return pub.bni_loss_published(pred, target, sigma ** 2, centers, weights)


REFERENCE = {"bmc": reference_bmc, "bmc_dense": reference_bmc_dense, "gai": reference_gai, "bni": reference_bni,
             "bni_irregular": reference_bni}


def ours(case: Case, p: Problem, backend: str, check_finite: bool = CHECK_FINITE) -> torch.Tensor:
    noise_var = p.sigma ** 2
    kw = dict(backend=backend, check_finite=check_finite)
    if case.op == "bmc":
        return F.bmc_loss(p.pred, p.target, noise_var, **kw)
    if case.op == "bmc_dense":
        return F.bmc_loss(p.pred, p.target, noise_var, candidates=p.extra[0], **kw)
    if case.op == "gai":
        return F.gai_loss(p.pred, p.target, noise_var, p.extra, **kw)
    return F.bni_loss(p.pred, p.target, noise_var, *p.extra, **kw)


def make_step(case: Case, kind: str, device, compiled=None):
    """(step, problem): ``step()`` = forward + backward of provider ``kind`` on a fresh problem."""
    p = make_problem(case, device)
    if kind in ("reference", "reference_compile"):
        fn = compiled if compiled is not None else REFERENCE[case.op]
        if kind == "reference_compile" and compiled is None:
            fn = torch.compile(fn, dynamic=False, fullgraph=True)

        def loss():
            return fn(p.pred.reshape(-1, 1), p.target.reshape(-1, 1), *p.extra, p.sigma)
    else:
        def loss():
            return ours(case, p, kind)

    def step():
        p.pred.grad = None
        p.sigma.grad = None
        loss().backward()

    return step, p


# ----------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------


def _kernel_registered(qualname: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    except RuntimeError:
        return False


def skip_unavailable(case: Case, device: str, kind: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: CUDA providers (and the triton backend, which runs on CUDA tensors) "
                    "are not benchmarked here; the Triton interpreter is not benchmarked")
    if kind == "cpp":
        if not _extension.cpp_available():
            pytest.skip(f"cpp backend unavailable: {_extension.cpp_error()}")
        if not _kernel_registered(CPP_KERNEL[case.op]):
            pytest.skip(f"C++ op {CPP_KERNEL[case.op]} has no CPU kernel registered in this build")
    if kind == "triton":
        reason = _dispatch._triton_reason(torch.device(device))
        if reason is not None:
            pytest.skip(f"triton backend unavailable: {reason}")


def gate_materialising(case: Case, kind: str, device: str) -> float | None:
    """Skip (with the reason) when a materialising provider would not fit in the memory budget."""
    if kind not in MATERIALISING or 12 * 4 * case.exps <= PROBE_ABOVE_BYTES:
        return None
    if case.op == "bmc":
        sizes, work = (2048, 4096), (lambda s: s * s)
    elif case.op == "bmc_dense":
        base = max(4096, case.size)                          # probes keep all M candidates
        sizes, work = (base, 4 * base), (lambda s: s * (1 + case.size))
    else:
        sizes, work = (case.n // 64, case.n // 16), (lambda s: s * case.size)
    compiled = None
    if kind == "reference_compile":
        torch._dynamo.reset()
        compiled = torch.compile(REFERENCE[case.op], dynamic=True, fullgraph=True)
    what = {"reference": "the published formulation (eager)",
            "reference_compile": "the published formulation under torch.compile",
            "torch": "our torch backend (materialising, like the published code)"}[kind]
    note = f"the formulation's [N, {case.columns}] fp32 logits alone take {4 * case.exps / GB:.1f} GB"
    try:
        return memory_gate(what, lambda s: make_step(case.rows_of(s), kind, device, compiled)[0], sizes, work,
                           case.n, device=device, note=note)
    finally:
        if kind == "reference_compile":
            torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fwd_bwd(benchmark, case: Case, provider: str):
    device, kind = provider.split("-", 1)
    skip_unavailable(case, device, kind)
    predicted = gate_materialising(case, kind, device)
    if kind == "reference_compile":
        torch._dynamo.reset()
    step, p = make_step(case, kind, device)
    benchmark.group = str(case)
    info = benchmark.extra_info
    info.update(case=str(case), op=case.op, n=case.n, columns=case.columns, provider=provider, kind=kind,
                dtype=str(p.pred.dtype).removeprefix("torch."), exps=case.exps)
    if kind in ("reference", "reference_compile"):
        info["backend"] = "published-" + ("compile" if kind == "reference_compile" else "eager")
    else:
        info["backend"] = imbreg_fast.selected_backend(p.pred, PUBLIC_OP[case.op], kind)
        info["check_finite"] = CHECK_FINITE
    if predicted is not None:
        info["predicted_peak_mb"] = round(predicted / 2 ** 20, 1)
    run_benchmark(benchmark, step, device=device)
    median = median_seconds(benchmark)
    if median is not None:
        info["exp_per_s"] = case.exps / median
    if kind == "reference_compile":
        torch._dynamo.reset()
