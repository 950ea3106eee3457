"""DIR evaluation of dense depth predictions: streaming :class:`imbreg_fast.metrics.DIRMetrics` against the
published concatenate-then-compute procedure; time and peak extra memory of a whole evaluation.

Problem (``IMBREG_BENCH_SIZES=full``, the default): 100 batches of ``[8, 1, 480, 640]`` fp32 depth maps
(2.46 M pixels per batch, 246 M in all), ~90 % valid pixels (the holes are NaN in the target
and masked out), 100 depth bins of 0.1 m over [0, 10) m with a skewed training histogram (all three shot
groups occupied). Every metric of ``DIRMetrics(depth=True)`` is computed: per shot group (all / many /
medium / few) count, MAE, MSE, RMSE, GM, bMAE, bMSE, AbsRel, log10, δ1-δ3, and Pearson over all pixels.
Four distinct batches are generated and cycled through the 100 updates.

Providers:

- ``ours``: ``DIRMetrics(...)``, 100 ``update(pred, target, mask)`` calls and ``compute()`` (float64
  per-bin sums; nothing is kept per pixel).
- ``numpy_concat``: the published procedure (YyzHarry/imbalanced-regression nyud2-dir ``Evaluator``, the
  DIR / Balanced MSE ``shot_metrics``): keep each batch's valid predictions and targets (``pred[mask]``), one
  ``np.concatenate`` at the end, then per shot group a boolean mask and the metrics of the selected pixels
  (fp32 element-wise, float64 sums as ``.mean(dtype=float64)``). Made as fast as numpy allows where the
  published code is slower: bins by ``np.searchsorted`` (not a per-pixel Python ``map``), the group of a
  pixel by a per-bin lookup table (not one pass per bin), per-bin means by ``np.bincount`` (not one boolean
  mask per label), Pearson by float64 centred dot products. Its GM floors |e| as ours does (docs/methods.md
  §6.3): at 2e8 pixels some fp32 errors are exactly 0, and the published ``gmean`` would be 0.

The numpy result is checked against ours once per run (outside the timing). Sizes: smoke 3 x [2, 1, 24, 32],
quick 100 x [8, 1, 120, 160], full 100 x [8, 1, 480, 640]. Protocol (warm-up, memory, rounds):
bench/harness.py; a full round of the numpy provider takes tens of seconds, so it runs >= 3 rounds. Run::

    .venv/bin/python -m pytest bench/bench_metrics.py --benchmark-only --benchmark-json=/tmp/metrics.json
    IMBREG_BENCH_SIZES=quick .venv/bin/python -m pytest bench/bench_metrics.py --benchmark-only
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import median_seconds, memory_gate, preset, run_benchmark
from imbreg_fast.lds import bin_edges, label_histogram
from imbreg_fast.metrics import GM_FLOOR, SHOTS, DIRMetrics

SIZES = {"smoke": (3, (2, 1, 24, 32)), "quick": (100, (8, 1, 120, 160)), "full": (100, (8, 1, 480, 640))}
POOL = 4                      # distinct batches, cycled through the updates
NUM_BINS, RANGE = 100, (0.0, 10.0)
MANY, FEW = 100_000, 20_000   # training pixel counts per bin (of 2e7 training pixels)
DEPTH_KEYS = ("absrel", "log10", "delta1", "delta2", "delta3")
CHECKED = ("mae", "mse", "rmse", "gm", "bmae", "bmse") + DEPTH_KEYS


def _depth(n_or_shape, gen) -> torch.Tensor:
    """Depth-like values in [0.5, 10): gamma-shaped, dense around 2-3 m, a thin far tail."""
    shape = (n_or_shape,) if isinstance(n_or_shape, int) else n_or_shape
    x = -torch.log(torch.rand((3, *shape), generator=gen)).sum(0)         # Gamma(3, 1)
    return (0.5 + 0.9 * x).clamp(max=9.99)


def train_counts() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return sum(label_histogram(_depth(1_000_000, gen), NUM_BINS, RANGE) for _ in range(20))


def make_batches(shape) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(POOL):
        target = 0.5 + 9.49 * torch.rand(shape, generator=gen)          # test depths cover the range
        pred = (target * torch.exp(0.12 * torch.randn(shape, generator=gen))).clamp(0.1, 12.0)
        mask = torch.rand(shape, generator=gen) > 0.1
        out.append((pred, target.masked_fill(~mask, math.nan), mask))
    return out


def ours_step(batches, updates: int, counts: torch.Tensor):
    def step():
        metric = DIRMetrics(NUM_BINS, RANGE, train_counts=counts, many=MANY, few=FEW, depth=True)
        for i in range(updates):
            metric.update(*batches[i % len(batches)])
        return {key: value.item() for key, value in metric.compute().items()}
    return step


def numpy_step(batches, updates: int, counts: torch.Tensor):
    inner = bin_edges(NUM_BINS, RANGE)[1:-1].numpy()
    tc = counts.numpy()
    group_of_bin = np.where(tc > MANY, 1, np.where(tc < FEW, 3, 2)).astype(np.int8)
    arrays = [(p.numpy(), t.numpy(), m.numpy()) for p, t, m in batches]

    def step():
        preds, targets = [], []
        for i in range(updates):                   # evaluator(output[mask], depth[mask]) of each batch
            p, t, m = arrays[i % len(arrays)]
            preds.append(p[m])
            targets.append(t[m])
        p, t = np.concatenate(preds), np.concatenate(targets)
        del preds, targets
        bucket = np.searchsorted(inner, t, side="right").astype(np.int16)
        group = group_of_bin[bucket]
        out = {}
        for gi, shot in enumerate(SHOTS):
            if gi == 0:
                ps, ts, bs = p, t, bucket
            else:
                sel = group == gi
                ps, ts, bs = p[sel], t[sel], bucket[sel]
            out.update(_evaluate(shot, ps, ts, bs))
        p64 = p.astype(np.float64)
        p64 -= p64.mean()
        t64 = t.astype(np.float64)
        t64 -= t64.mean()
        out["all/pearson"] = float(np.dot(p64, t64) / math.sqrt(np.dot(p64, p64) * np.dot(t64, t64)))
        return out
    return step


def _evaluate(shot: str, p: np.ndarray, t: np.ndarray, bucket: np.ndarray) -> dict:
    n = p.size
    out = {f"{shot}/count": n}
    if n == 0:
        return out | {f"{shot}/{key}": math.nan for key in CHECKED}
    err = np.abs(p - t)
    sq = err * err
    out[f"{shot}/mae"] = float(err.mean(dtype=np.float64))
    out[f"{shot}/mse"] = float(sq.mean(dtype=np.float64))
    out[f"{shot}/rmse"] = math.sqrt(out[f"{shot}/mse"])
    # the published gmean with our floor (at this size some fp32 errors are exactly 0, and a plain gmean is 0);
    # the float64 floor is below float32's range, so the floored terms are added apart
    zero = err == 0
    log_sum = np.log(np.where(zero, np.float32(1), err)).sum(dtype=np.float64) + zero.sum() * math.log(GM_FLOOR)
    out[f"{shot}/gm"] = math.exp(log_sum / n)
    per_bin = np.bincount(bucket, minlength=NUM_BINS)
    occupied = per_bin > 0
    out[f"{shot}/bmae"] = float((np.bincount(bucket, err, NUM_BINS)[occupied] / per_bin[occupied]).mean())
    out[f"{shot}/bmse"] = float((np.bincount(bucket, sq, NUM_BINS)[occupied] / per_bin[occupied]).mean())
    out[f"{shot}/absrel"] = float((err / t).mean(dtype=np.float64))
    out[f"{shot}/log10"] = float(np.abs(np.log10(p) - np.log10(t)).mean(dtype=np.float64))
    ratio = np.maximum(p / t, t / p)
    for k in (1, 2, 3):
        out[f"{shot}/delta{k}"] = float((ratio < 1.25 ** k).mean(dtype=np.float64))
    return out


def _check(numpy_result: dict, ours: dict) -> None:
    """The two providers compute the same metrics (numpy's fp32 element-wise errors: ~1e-6 relative)."""
    for shot in SHOTS:
        assert numpy_result[f"{shot}/count"] == ours[f"{shot}/count"] > 0, shot
        for key in CHECKED:
            assert numpy_result[f"{shot}/{key}"] == pytest.approx(ours[f"{shot}/{key}"], rel=1e-4), f"{shot}/{key}"
    assert numpy_result["all/pearson"] == pytest.approx(ours["all/pearson"], rel=1e-6)


@pytest.fixture(scope="module")
def problem():
    updates, shape = SIZES[preset()]
    return updates, shape, make_batches(shape), train_counts()


@pytest.mark.parametrize("provider", ["ours", "numpy_concat"])
def test_dir_evaluation(benchmark, problem, provider):
    updates, shape, batches, counts = problem
    make = ours_step if provider == "ours" else numpy_step
    if provider == "numpy_concat" and updates >= 8:
        memory_gate("the concatenate-then-compute evaluation", lambda u: make(batches, u, counts),
                    (updates // 16, updates // 8), float, updates)
    pixels = updates * math.prod(shape)
    benchmark.group = f"dir-eval-{updates}x{'x'.join(map(str, shape))}"
    benchmark.extra_info.update(case=benchmark.group, provider=provider, updates=updates,
                                batch_pixels=math.prod(shape), pixels=pixels, num_bins=NUM_BINS, depth=True)
    peak = run_benchmark(benchmark, make(batches, updates, counts), min_rounds=3)
    median = median_seconds(benchmark)
    if median:
        benchmark.extra_info["mpixel_per_s"] = round(pixels / median / 1e6, 2)
    if provider == "numpy_concat" and peak is not None:
        _check(peak.result, ours_step(batches, updates, counts)())
