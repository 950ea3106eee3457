"""RankSim (Gong et al., ICML 2022) at the paper's batch size: time and peak extra memory of forward +
backward (the regulariser times gamma = 100, as the published training code), and forward alone.

Providers, side by side in one run: the published formulation (imbreg_fast/experiments/published.py,
``ranksim_loss_published``: a Python loop over the rows, a sort pair per row, the blackbox ranker as an
``autograd.Function``) eager and under ``torch.compile(dynamic=False)`` (not fullgraph: its subsample test
``len(torch.unique(y)) < len(y)`` is data dependent; compilation excluded from the timing, reported as
``compile_s``), and our backends ``torch``, ``cpp`` (CPU) and ``triton`` (CUDA only; skipped here without
a GPU). Labels (``labels``): ``distinct`` (``n`` distinct labels: the subsample keeps the whole batch; the
issue's target case) or ``ages`` (integer ages 0..99, repeated: the default subsample keeps one row per
distinct age — ours computes it without a host sync, the kept rows first and their count on the device);
features ``[n, 128]``.

Sizes (``IMBREG_BENCH_SIZES``): smoke n = 64, quick n = 256, full (default) n = 512.
Protocol (warm-up, memory, rounds): bench/harness.py. Run::

    IMBREG_BENCH_THREADS=2 .venv/bin/python -m pytest bench/bench_ranksim.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

import imbreg_fast
import imbreg_fast.experiments.published as pub
import imbreg_fast.functional as F
from harness import skip_unavailable, preset, run_benchmark

CHECK_FINITE = os.environ.get("IMBREG_BENCH_CHECK_FINITE", "1") != "0"
SIZES = {"smoke": 64, "quick": 256, "full": 512}
DIM = 128
GAMMA, LAMBDA = 100.0, 2.0
PROVIDERS = ("cpu-reference", "cpu-reference_compile", "cpu-torch", "cpu-cpp",
             "cuda-reference", "cuda-reference_compile", "cuda-torch", "cuda-triton")
MODES = ("fwd", "fwd_bwd")


@pytest.mark.parametrize("labels", ("distinct", "ages"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ranksim(benchmark, provider, mode, labels):
    device, kind = provider.split("-", 1)
    skip_unavailable("ranksim_loss", device, kind)
    n = SIZES[preset()]
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, DIM, generator=g).to(device).requires_grad_(mode == "fwd_bwd")
    if labels == "distinct":
        targets = (torch.randperm(n, generator=g).float() * 0.5).reshape(n, 1).to(device)
    else:
        targets = torch.randint(0, 100, (n, 1), generator=g).float().to(device)
    if kind.startswith("reference"):
        def fn(x, y):
            return GAMMA * pub.ranksim_loss_published(x, y, LAMBDA)

        if kind == "reference_compile":
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
    else:
        def fn(x, y):
            return GAMMA * F.ranksim_loss(x, y, interpolation_lambda=LAMBDA, backend=kind, check_finite=CHECK_FINITE)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(features, targets)
        features.grad = None
        loss = fn(features, targets)
        loss.backward()
        return loss

    run_benchmark(benchmark, step, device=device)
    benchmark.extra_info.update(case=f"ranksim-{labels}-n{n}-d{DIM}", provider=provider, mode=mode, n=n, d=DIM,
                                check_finite=CHECK_FINITE)
