"""Measurement protocol shared by the imbreg_fast benchmarks (pytest-benchmark).

One benchmarked call (``step``, e.g. forward + backward of a loss) goes through:

1. two warm-up calls, timed on their own: the first includes one-off work (``torch.compile``
   compilation, lazy initialisation) and is reported as ``first_call_s``; ``compile_s`` = first call
   minus the median of the timed rounds;
2. one call under :func:`peak_memory.measure_peak_memory` (outside the timed region);
3. ``benchmark.pedantic`` rounds of one call each; the number of rounds fills about
   ``IMBREG_BENCH_SECONDS`` (within [min_rounds, 200]).

Environment knobs (read once, recorded in the JSON's machine_info by bench/conftest.py):

- ``IMBREG_BENCH_SIZES``: ``smoke`` (tiny, validates the harness), ``quick``, ``full`` (default: the sizes
  the published figures are for);
- ``IMBREG_BENCH_SECONDS``: timing budget per benchmark (default 0.2 / 1 / 3 s by preset);
- ``IMBREG_BENCH_THREADS``: ``torch.set_num_threads`` for the whole run (default: torch's default);
- ``IMBREG_BENCH_MEM_BUDGET_GB``: larger problems are skipped (see :func:`memory_gate`), default 16.

Usage::

    from harness import run_benchmark
    peak = run_benchmark(benchmark, step, device="cpu")     # fills benchmark.extra_info
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import pytest
import torch

import imbreg_fast

from peak_memory import MB, PeakMemory, extrapolate_bytes, measure_peak_memory, memory_budget_bytes

__all__ = ["PRESETS", "preset", "seconds_budget", "sync", "run_benchmark", "median_seconds", "memory_gate",
           "common_extra_info"]

PRESETS = ("smoke", "quick", "full")
_DEFAULT_SECONDS = {"smoke": 0.2, "quick": 1.0, "full": 3.0}
_MIN_ROUNDS = {"smoke": 2, "quick": 3, "full": 5}
_MAX_ROUNDS = 200
GB = 2 ** 30


def preset() -> str:
    """The size preset of this run: IMBREG_BENCH_SIZES (default 'full')."""
    name = os.environ.get("IMBREG_BENCH_SIZES", "full").strip().lower() or "full"
    if name not in PRESETS:
        raise ValueError(f"IMBREG_BENCH_SIZES={name!r}: choose among {PRESETS}")
    return name


def seconds_budget() -> float:
    return float(os.environ.get("IMBREG_BENCH_SECONDS", _DEFAULT_SECONDS[preset()]))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object], device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def common_extra_info(device) -> dict:
    """Fields every benchmark records: device, threads, torch version, imbreg_fast's CPU kernel library."""
    import imbreg_fast

    return {"device": str(torch.device(device)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": imbreg_fast.cpu_capability(), "preset": preset()}


def run_benchmark(benchmark, step: Callable[[], object], *, device="cpu", measure_memory: bool = True,
                  min_rounds: int | None = None) -> PeakMemory | None:
    """Warm up, measure the peak extra memory of one call, then time ``step`` with ``benchmark.pedantic``.

    ``step`` must leave no state that changes the next call (e.g. reset ``.grad`` to None at its start).
    Records ``first_call_s``, ``compile_s``, ``rounds``, the peak memory (``peak_mb``...) and
    :func:`common_extra_info` in ``benchmark.extra_info``; returns the memory measurement.
    """
    first = _timed(step, device)
    again = _timed(step, device)
    peak = None
    if measure_memory:
        peak = measure_peak_memory(lambda: (step(), sync(device))[0], device)
        benchmark.extra_info.update(peak.as_extra_info())
    low = min_rounds if min_rounds is not None else _MIN_ROUNDS[preset()]
    rounds = int(min(_MAX_ROUNDS, max(low, math.ceil(seconds_budget() / max(again, 1e-9)))))

    def timed_step():
        step()
        sync(device)

    benchmark.pedantic(timed_step, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(common_extra_info(device))
    benchmark.extra_info.update(first_call_s=round(first, 6), rounds=rounds)
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["compile_s"] = round(max(0.0, first - median), 6)
    return peak


def median_seconds(benchmark) -> float | None:
    """Median time of the timed rounds (None under --benchmark-disable, where nothing is timed)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def memory_gate(what: str, probe: Callable[[int], Callable[[], object]], probe_sizes: tuple[int, int],
                work: Callable[[int], float], full_size: int, *, device="cpu", note: str = "") -> float:
    """Skip the calling test when ``what`` would need more than the memory budget at ``full_size``.

    ``probe(size)`` returns a ready-to-call step of the same problem at a smaller ``size``; each probe
    step is warmed up, then its peak extra memory measured; a straight line over ``work(size)`` through
    the probes (allocator and RSS measurements separately, the larger taken, + 20 %) predicts the peak at
    ``full_size``. Returns the predicted bytes when the test may run, else calls ``pytest.skip`` with
    the figures in the reason.
    """
    alloc_points, peak_points = [], []
    for size in probe_sizes:
        step = probe(size)
        step()
        peak = measure_peak_memory(lambda: (step(), sync(device))[0], device)
        alloc_points.append((work(size), peak.allocator_bytes))
        peak_points.append((work(size), peak.peak_bytes))
        del step
    target = work(full_size)
    predicted = 1.2 * max(extrapolate_bytes(alloc_points, target), extrapolate_bytes(peak_points, target))
    budget = memory_budget_bytes(device=device)
    if predicted > budget:
        probes = ", ".join(f"{s}: {p / MB:.0f} MB" for s, (_, p) in zip(probe_sizes, peak_points))
        pytest.skip(f"{what} would need ~{predicted / GB:.1f} GB of extra memory at size {full_size} "
                    f"(extrapolated from probes at sizes {probes}), over the {budget / GB:.1f} GB budget "
                    f"(IMBREG_BENCH_MEM_BUDGET_GB, capped at 80% of the available memory)" + (f"; {note}" if note else ""))
    return predicted


def skip_unavailable(op: str, device: str, kind: str) -> None:
    """Skip a provider that cannot run here: a CUDA provider without a CUDA device, or our ``cpp`` / ``triton``
    backend when it is unavailable or has no implementation of the public op ``op`` (e.g. ``'rnc_loss'``)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: CUDA providers (and the triton backend, which runs on CUDA tensors) are not "
                    "benchmarked here")
    if kind in ("cpp", "triton"):
        info = imbreg_fast.backend_info()[kind]
        if not info["available"] or op not in info["ops"]:
            pytest.skip(f"backend {kind} unavailable here: {info['reason'] or f'{op} not built'}")
