"""Peak extra memory of one call, for the benchmarks (CPU and CUDA tensors).

PyTorch keeps no allocator statistics for CPU tensors, so on CPU two independent measurements are taken
during the same call and the larger is reported:

- ``allocator_bytes``: the peak, over the call, of the bytes allocated by PyTorch's CPU allocator during
  the call and still live. Exact to the byte, read from the allocation timeline of
  ``torch.profiler.profile(profile_memory=True)`` (freeing a block allocated before the call is not seen:
  the profiler warns "Memory block of unknown size ..." and the figure is unaffected). Blind spot: only
  allocations made on the calling thread are reported (at::parallel_for / OpenMP worker threads do not
  carry the profiler state).
- ``rss_bytes``: the rise of the process's peak resident set size (VmHWM, reset through
  ``/proc/self/clear_refs`` just before the call, after ``malloc_trim``) above its resident size before
  the call. Sees every thread and every allocator (Inductor's scratch buffers, ``std::vector``), with two
  blind spots of its own: pages allocated but never touched are not resident, and memory kept by malloc
  from earlier calls can be reused without raising the RSS. Resolution: a page; noise: a few MB.

On CUDA the caching allocator's own peak (``torch.cuda.max_memory_allocated``) is used.

Usage (any benchmark, e.g. FDS or weighted losses)::

    from peak_memory import measure_peak_memory

    def step():
        loss_fn(pred, target).backward()

    step()                                     # warm up first: lazy initialisation is not the op's memory
    peak = measure_peak_memory(step)           # runs step() once more
    benchmark.extra_info.update(peak.as_extra_info())   # peak_mb, peak_allocator_mb, peak_rss_mb
    assert peak.peak_mb < 64

Measure outside the timed region: the profiler slows the call down.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["PeakMemory", "measure_peak_memory", "available_memory_bytes", "memory_budget_bytes",
           "extrapolate_bytes", "MB"]

MB = 2 ** 20


@dataclass(frozen=True)
class PeakMemory:
    """Peak extra memory of one call (bytes). ``peak_bytes`` = the larger of the two CPU measurements."""
    device: str
    allocator_bytes: int
    rss_bytes: int | None          # None on CUDA, or where /proc/self/clear_refs is not writable
    result: Any = None             # what the call returned

    @property
    def peak_bytes(self) -> int:
        return max(self.allocator_bytes, self.rss_bytes or 0)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB

    def as_extra_info(self, prefix: str = "peak") -> dict:
        """``{peak_mb, peak_allocator_mb, peak_rss_mb}`` for ``benchmark.extra_info`` (JSON-friendly)."""
        return {f"{prefix}_mb": round(self.peak_mb, 3),
                f"{prefix}_allocator_mb": round(self.allocator_bytes / MB, 3),
                f"{prefix}_rss_mb": None if self.rss_bytes is None else round(self.rss_bytes / MB, 3)}


# ----------------------------------------------------------------------------------------------------
# CPU: resident-set high-water mark
# ----------------------------------------------------------------------------------------------------

_STATUS_RE = {key: re.compile(rf"^{key}:\s+(\d+) kB", re.MULTILINE) for key in ("VmRSS", "VmHWM")}


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = _STATUS_RE[key].search(f.read())
    except OSError:
        return None
    return None if m is None else int(m.group(1)) * 1024


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


_libc = None


def _malloc_trim() -> None:
    """Give malloc's free memory back to the OS, so the call cannot hide inside memory cached earlier."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


# ----------------------------------------------------------------------------------------------------
# CPU: allocator timeline from the profiler
# ----------------------------------------------------------------------------------------------------


def _allocator_peak(prof) -> int:
    """Peak of the running sum of the [memory] events (+alloc / -free, bytes) of CPU tensors."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _measure_cpu(fn: Callable[[], Any]) -> PeakMemory:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # Inside the profiler, so that its own start-up allocations are part of the baseline.
        _malloc_trim()
        rss_ok = _reset_rss_peak()
        rss_before = _status_bytes("VmRSS")
        result = fn()
        rss_peak = _status_bytes("VmHWM")
    rss = None
    if rss_ok and rss_before is not None and rss_peak is not None:
        rss = max(0, rss_peak - rss_before)
    return PeakMemory("cpu", _allocator_peak(prof), rss, result)


def _measure_cuda(fn: Callable[[], Any], device: torch.device) -> PeakMemory:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return PeakMemory(str(device), max(0, torch.cuda.max_memory_allocated(device) - before), None, result)


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> PeakMemory:
    """Run ``fn()`` once and return its peak extra memory (see the module docstring for the method).

    ``device``: where ``fn`` allocates its tensors (``'cpu'`` or a CUDA device). Call ``fn`` once before
    (warm-up) so one-off allocations (lazy initialisation, ``torch.compile``) are not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, device)
    if device.type != "cpu":
        raise ValueError(f"measure_peak_memory supports cpu and cuda devices, got {device}")
    return _measure_cpu(fn)


# ----------------------------------------------------------------------------------------------------
# Deciding whether a large case can run
# ----------------------------------------------------------------------------------------------------


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return None if m is None else int(m.group(1)) * 1024


def memory_budget_bytes(default_gb: float = 16.0, device: str | torch.device = "cpu") -> int:
    """How much extra memory one benchmarked call may take: ``IMBREG_BENCH_MEM_BUDGET_GB`` (default
    ``default_gb``), capped at 80 % of the memory available right now (host memory, or the CUDA device's
    free memory)."""
    budget = int(float(os.environ.get("IMBREG_BENCH_MEM_BUDGET_GB", default_gb)) * 2 ** 30)
    device = torch.device(device)
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        avail = available_memory_bytes()
    return budget if avail is None else min(budget, int(0.8 * avail))


def extrapolate_bytes(points: list[tuple[float, float]], work: float) -> float:
    """Least-squares line ``bytes = a + b * work`` through ``points`` [(work, bytes), ...] (>= 2 points),
    evaluated at ``work``: the peak memory of a large problem predicted from small probes, when memory grows
    linearly with some work measure (N*M logits, N*K terms, ...)."""
    if len(points) < 2:
        raise ValueError("extrapolate_bytes needs at least two (work, bytes) points")
    n = len(points)
    mx = sum(w for w, _ in points) / n
    my = sum(b for _, b in points) / n
    sxx = sum((w - mx) ** 2 for w, _ in points)
    if sxx == 0:
        raise ValueError("extrapolate_bytes needs points at different work sizes")
    slope = sum((w - mx) * (b - my) for w, b in points) / sxx
    return my + slope * (work - mx)
