"""pytest configuration of the benchmarks (pytest-benchmark).

- Collects ``bench/bench_*.py`` (the tests' ``test_*.py`` pattern is left alone).
- ``IMBREG_BENCH_THREADS`` sets ``torch.set_num_threads`` for the run (see bench/harness.py for the other
  knobs).
- Adds to the ``--benchmark-json`` output: ``machine_info.imbreg`` (lscpu model line, threads, torch,
  imbreg_fast CPU kernel library, preset, memory) and ``skipped`` (every skipped benchmark with its
  params and reason), which bench/report.py turns into BENCHMARKS.md.
"""
from __future__ import annotations

import fnmatch
import os
import subprocess

import pytest
import torch

_threads = os.environ.get("IMBREG_BENCH_THREADS")
if _threads:
    torch.set_num_threads(int(_threads))

_SKIPPED: list[dict] = []


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself whatever their name.
    if fnmatch.fnmatch(file_path.name, "bench_*.py") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        callspec = getattr(item, "callspec", None)
        _SKIPPED.append({"name": item.name, "nodeid": item.nodeid,
                         "params": {k: str(v) for k, v in callspec.params.items()} if callspec else {},
                         "reason": reason.removeprefix("Skipped: ")})


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import imbreg_fast
    from harness import preset, seconds_budget

    machine_info["imbreg"] = {
        "lscpu_model": _lscpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_capability": imbreg_fast.cpu_capability(),
        "backends": list(imbreg_fast.available_backends()), "cuda": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else None, "mem_total_gb": _mem_total_gb(), "preset": preset(),
        "seconds_budget": seconds_budget(),
        "env": {k: os.environ[k] for k in ("IMBREG_BENCH_SIZES", "IMBREG_BENCH_SECONDS", "IMBREG_BENCH_THREADS",
                                           "IMBREG_BENCH_MEM_BUDGET_GB", "IMBREG_BENCH_CHECK_FINITE",
                                           "OMP_NUM_THREADS", "IMBREG_CPU_CAPABILITY") if k in os.environ},
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
