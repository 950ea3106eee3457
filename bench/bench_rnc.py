"""Rank-N-Contrast: forward + backward (w.r.t. the features), time and peak extra memory.

Side by side in one run: our backends (``torch``, ``cpp``; ``triton`` on CUDA only, when registered) against the
published O(n^3) formulation (imbreg_fast/experiments/published.py ``rnc_loss_published``) in eager mode and
under ``torch.compile`` (``dynamic=False, fullgraph=True``; compilation excluded from the timing, reported as
``compile_s``). One benchmarked call = ``loss = f(features, labels); loss.backward()`` with two views
``features`` [B, 2, d] (n = 2B anchors), fp32, integer ages as labels (ties, as in AgeDB).

Cases (``IMBREG_BENCH_SIZES``): full = B 256 (n = 512, the paper's batch), d = 128; quick = B 128; smoke = B 32.

Run (see BENCHMARKS.md)::

    OMP_NUM_THREADS=2 .venv/bin/python -m pytest bench/bench_rnc.py --benchmark-only \\
        --benchmark-json bench/out_rnc.json
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import imbreg_fast
import imbreg_fast.experiments.published as pub
import imbreg_fast.functional as F
from harness import skip_unavailable, median_seconds, preset, run_benchmark

CHECK_FINITE = os.environ.get("IMBREG_BENCH_CHECK_FINITE", "1") != "0"


@dataclass(frozen=True)
class Case:
    b: int          # samples; n = 2 b anchors (two views)
    d: int          # feature dimension

    def __str__(self) -> str:
        return f"rnc-n{2 * self.b}-d{self.d}"


CASES = {"full": [Case(256, 128)], "quick": [Case(128, 128)], "smoke": [Case(32, 16)]}[preset()]
PROVIDERS = ("cpu-reference", "cpu-reference_compile", "cpu-torch", "cpu-cpp", "cuda-reference", "cuda-torch",
             "cuda-triton")


def make_problem(case: Case, device):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(case.b, 2, case.d, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, 100, (case.b,), generator=g).float().to(device)
    return features, labels


def reference(features, labels):
    return pub.rnc_loss_published(features, labels[:, None], 2.0)


def make_step(case: Case, kind: str, device):
    features, labels = make_problem(case, device)
    if kind == "reference":
        fn = reference
    elif kind == "reference_compile":
        fn = torch.compile(reference, dynamic=False, fullgraph=True)
    else:
        def fn(f, y):
            return F.rnc_loss(f, y, backend=kind, check_finite=CHECK_FINITE)

    def step():
        features.grad = None
        fn(features, labels).backward()

    return step, features


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fwd_bwd(benchmark, case: Case, provider: str):
    device, kind = provider.split("-", 1)
    skip_unavailable("rnc_loss", device, kind)
    if kind == "reference_compile":
        torch._dynamo.reset()
    step, features = make_step(case, kind, device)
    benchmark.group = str(case)
    info = benchmark.extra_info
    info.update(case=str(case), n=2 * case.b, d=case.d, provider=provider, kind=kind, dtype="float32")
    if kind in ("reference", "reference_compile"):
        info["backend"] = "published-" + ("compile" if kind == "reference_compile" else "eager")
    else:
        info["backend"] = imbreg_fast.selected_backend(features, "rnc_loss", kind)
        info["check_finite"] = CHECK_FINITE
    run_benchmark(benchmark, step, device=device)
    median = median_seconds(benchmark)
    if median is not None:
        info["pairs_per_s"] = (2 * case.b) * (2 * case.b - 1) / median
    if kind == "reference_compile":
        torch._dynamo.reset()
