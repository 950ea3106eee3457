"""bench/peak_memory.py measures known allocations correctly (cheap: ~100 MB, a fraction of a second)."""
import importlib.util
import sys
import threading
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("peak_memory", Path(__file__).resolve().parents[1] / "bench" / "peak_memory.py")
peak_memory = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("peak_memory", peak_memory)
_spec.loader.exec_module(peak_memory)

MB = peak_memory.MB


def _rss_supported() -> bool:
    return peak_memory._reset_rss_peak()


def test_known_allocation_100mb():
    peak = peak_memory.measure_peak_memory(lambda: torch.ones(100 * MB, dtype=torch.uint8))
    assert peak.allocator_bytes == 100 * MB
    assert isinstance(peak.result, torch.Tensor) and peak.result.numel() == 100 * MB
    if _rss_supported():
        assert 95 * MB <= peak.rss_bytes <= 110 * MB, peak
    assert 100 <= peak.peak_mb <= 110


def test_peak_not_sum_of_sequential_allocations():
    def fn():
        a = torch.ones(60 * MB, dtype=torch.uint8)
        del a
        b = torch.ones(40 * MB, dtype=torch.uint8)
        del b

    peak = peak_memory.measure_peak_memory(fn)
    assert peak.allocator_bytes == 60 * MB
    if _rss_supported():
        assert 55 * MB <= peak.rss_bytes <= 70 * MB, peak


def test_nothing_allocated_is_small():
    x = torch.ones(1000)
    peak = peak_memory.measure_peak_memory(lambda: x.add_(1))
    assert peak.allocator_bytes < 1024          # a scalar or two, nothing the size of x
    assert peak.peak_mb < 8, peak


def test_rss_sees_other_threads():
    # The allocator timeline only sees the calling thread; the RSS high-water mark sees every thread.
    if not _rss_supported():
        pytest.skip("/proc/self/clear_refs is not writable here")

    def fn():
        t = threading.Thread(target=lambda: torch.ones(64 * MB, dtype=torch.uint8))
        t.start()
        t.join()

    peak = peak_memory.measure_peak_memory(fn)
    assert peak.allocator_bytes == 0
    assert 60 * MB <= peak.rss_bytes <= 75 * MB, peak
    assert peak.peak_bytes == peak.rss_bytes


def test_extra_info_keys():
    info = peak_memory.measure_peak_memory(lambda: torch.ones(MB, dtype=torch.uint8)).as_extra_info()
    assert set(info) == {"peak_mb", "peak_allocator_mb", "peak_rss_mb"}
    assert info["peak_allocator_mb"] == 1.0


def test_extrapolate_bytes():
    assert peak_memory.extrapolate_bytes([(1, 10), (2, 12), (3, 14)], 10) == pytest.approx(28)
    with pytest.raises(ValueError):
        peak_memory.extrapolate_bytes([(1, 10)], 5)
    with pytest.raises(ValueError):
        peak_memory.extrapolate_bytes([(1, 10), (1, 12)], 5)
