"""ConR: forward + backward (w.r.t. the features), time and peak extra memory.

Side by side in one run, per case: our backends (``torch``, ``cpp``; ``triton`` on CUDA only) against the
published formulation (``imbreg_fast.experiments.published.conr_loss_published``: the AgeDB code's
computation, its [n, n] masks and Python loop over the diagonal) in eager mode and under ``torch.compile``
(``dynamic=False, fullgraph=True``; compilation excluded from the timing, reported as ``compile_s``). One
benchmarked call = ``loss = conr(features, targets, preds, weights); loss.backward()``, the published
defaults (w = 1, tau = 0.07, e = 0.01, the published denominator).

Cases: n anchors (two views of n/2 images stacked), d = 128 features, integer ages in [0, 100) with the
views' predictions near them (ties and negatives as in AgeDB training), LDS-like weights in [0.5, 1.5).
``IMBREG_BENCH_SIZES=full`` (default): n = 256, 512, 1024; ``quick``: 512; ``smoke``: 64.

Run (see BENCHMARKS.md)::

    IMBREG_BENCH_THREADS=2 .venv/bin/python -m pytest bench/bench_conr.py --benchmark-only \
        --benchmark-json bench/out.json
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import imbreg_fast
import imbreg_fast.experiments.published as pub
import imbreg_fast.functional as F
from harness import skip_unavailable, preset, run_benchmark

CHECK_FINITE = os.environ.get("IMBREG_BENCH_CHECK_FINITE", "1") != "0"
D = 128


@dataclass(frozen=True)
class Case:
    n: int
    d: int = D

    def __str__(self) -> str:
        return f"conr-n{self.n}-d{self.d}"


CASES = [Case(n) for n in {"full": (256, 512, 1024), "quick": (512,), "smoke": (64,)}[preset()]]
PROVIDERS = ("cpu-reference", "cpu-reference_compile", "cpu-torch", "cpu-cpp",
             "cuda-reference", "cuda-reference_compile", "cuda-torch", "cuda-triton")


@dataclass
class Problem:
    features: torch.Tensor   # leaf [n, d]
    targets: torch.Tensor    # [n, 1]
    preds: torch.Tensor      # [n, 1] (detached, as the published training passes them)
    weights: torch.Tensor    # [n, 1]


def make_problem(case: Case, device) -> Problem:
    g = torch.Generator().manual_seed(0)
    b = case.n // 2
    ages = torch.randint(0, 100, (b, 1), generator=g).float()
    view = torch.randn(b, case.d, generator=g)
    features = torch.cat([view + 0.3 * torch.randn(b, case.d, generator=g),
                          view + 0.3 * torch.randn(b, case.d, generator=g)])
    targets = torch.cat([ages, ages])
    preds = targets + 3.0 * torch.randn(case.n, 1, generator=g)
    weights = 0.5 + torch.rand(b, 1, generator=g)
    to = dict(device=device)
    return Problem(features.to(**to).requires_grad_(), targets.to(**to), preds.to(**to),
                   torch.cat([weights, weights]).to(**to))


def reference(features, targets, preds, weights):
    return pub.conr_loss_published(features, targets, preds, w=1.0, weights=weights, t=0.07, e=0.01)


def make_step(case: Case, kind: str, device):
    p = make_problem(case, device)
    if kind in ("reference", "reference_compile"):
        fn = torch.compile(reference, dynamic=False, fullgraph=True) if kind == "reference_compile" else reference

        def loss():
            return fn(p.features, p.targets, p.preds, p.weights)
    else:
        def loss():
            return F.conr_loss(p.features, p.targets, p.preds, weights=p.weights, backend=kind,
                               check_finite=CHECK_FINITE)

    def step():
        p.features.grad = None
        loss().backward()

    return step, p


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fwd_bwd(benchmark, case: Case, provider: str):
    device, kind = provider.split("-", 1)
    skip_unavailable("conr_loss", device, kind)
    if kind == "reference_compile":
        torch._dynamo.reset()
    step, p = make_step(case, kind, device)
    benchmark.group = str(case)
    info = benchmark.extra_info
    info.update(case=str(case), op="conr", n=case.n, d=case.d, provider=provider, kind=kind,
                dtype=str(p.features.dtype).removeprefix("torch."))
    if kind in ("reference", "reference_compile"):
        info["backend"] = "published-" + ("compile" if kind == "reference_compile" else "eager")
    else:
        info["backend"] = imbreg_fast.selected_backend(p.features, "conr_loss", kind)
        info["check_finite"] = CHECK_FINITE
    run_benchmark(benchmark, step, device=device)
    if kind == "reference_compile":
        torch._dynamo.reset()
