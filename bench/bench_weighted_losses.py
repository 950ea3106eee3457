"""Weighted regression losses (docs/methods.md §2: MSE, Huber, Focal-R) with per-pixel LDS weights and a
validity mask, at dense-depth size: time and peak extra memory, forward and forward + backward.

Providers, side by side in one run: the published formulation (imbreg_fast/experiments/published.py,
``published_*``: YyzHarry/imbalanced-regression loss.py, masked by indexing as its depth training code
does) eager and under ``torch.compile(dynamic=False, fullgraph=True)`` (compilation excluded from the
timing, reported as ``compile_s``), and our backends ``torch``, ``cpp`` (CPU) and ``triton`` (CUDA only;
skipped here without a GPU). Modes: ``fwd`` (no grad) and ``fwd_bwd`` (loss + backward w.r.t. pred).

Sizes (``IMBREG_BENCH_SIZES``): smoke 2x1x24x32, quick 8x1x120x160, full (default) 8x1x240x320 pixels.
Protocol (warm-up, memory, rounds): bench/harness.py. Run::

    IMBREG_BENCH_SIZES=quick .venv/bin/python -m pytest bench/bench_weighted_losses.py --benchmark-only
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
SHAPES = {"smoke": (2, 1, 24, 32), "quick": (8, 1, 120, 160), "full": (8, 1, 240, 320)}
LOSSES = ("mse", "huber", "focal_mse")
PROVIDERS = ("cpu-reference", "cpu-reference_compile", "cpu-torch", "cpu-cpp",
             "cuda-reference", "cuda-reference_compile", "cuda-torch", "cuda-triton")
MODES = ("fwd", "fwd_bwd")

OURS = {"mse": F.weighted_mse_loss, "huber": F.weighted_huber_loss, "focal_mse": F.weighted_focal_mse_loss}
PUBLISHED = {"mse": pub.published_weighted_mse_loss, "huber": pub.published_weighted_huber_loss,
             "focal_mse": pub.published_weighted_focal_mse_loss}


def reference_fn(name):
    published = PUBLISHED[name]

    def fn(pred, target, weight, mask):
        return published(pred[mask], target[mask], weight[mask])

    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", LOSSES)
def test_weighted_loss(benchmark, name, provider, mode):
    device, kind = provider.split("-", 1)
    skip_unavailable("weighted_regression_loss", device, kind)
    shape = SHAPES[preset()]
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(shape, generator=g).to(device).requires_grad_(mode == "fwd_bwd")
    target = (torch.rand(shape, generator=g) * 10).to(device)
    weight = (torch.rand(shape, generator=g) * 2).to(device)
    mask = (torch.rand(shape, generator=g) > 0.1).to(device)
    if kind.startswith("reference"):
        fn = reference_fn(name)
        if kind == "reference_compile":
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False, fullgraph=True)
    else:
        def fn(p, t, w, m):
            return OURS[name](p, t, w, mask=m, backend=kind, check_finite=CHECK_FINITE)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(pred, target, weight, mask)
        pred.grad = None
        loss = fn(pred, target, weight, mask)
        loss.backward()
        return loss

    run_benchmark(benchmark, step, device=device)
    benchmark.extra_info.update(case=f"{name}-{'x'.join(map(str, shape))}", provider=provider, mode=mode,
                                n_pixels=pred.numel(), check_finite=CHECK_FINITE)
