"""The default path (``check_finite=True``) against ``check_finite=False``, paired: the two settings alternate
call by call in one process, so slow drifts of a shared machine hit both alike (the pytest-benchmark runs
of bench_balanced_mse.py measure each setting in its own process, minutes apart). fwd+bwd on the cpp
backend, the problems of bench_balanced_mse.py (full sizes) plus the weighted MSE of
bench_weighted_losses.py's size. Run::

    IMBREG_CPU_CAPABILITY=avx2 .venv/bin/python bench/paired_checks.py [repetitions]

Prints, per op, min and median of each setting and the default path's extra cost.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imbreg_fast  # noqa: E402
import imbreg_fast.functional as F  # noqa: E402
from bench_balanced_mse import Case, _dense, make_problem, ours  # noqa: E402

CASES = [Case("bmc", 4096), _dense("gai", (8, 240, 320), 16), _dense("bni", (8, 240, 320), 100),
         _dense("bni_irregular", (8, 240, 320), 100)]


def weighted_mse_step(check: bool):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(8, 1, 240, 320, generator=g) * 10
    pred = (target + torch.randn(target.shape, generator=g)).requires_grad_()
    weight = torch.rand(target.shape, generator=g)
    return lambda: F.weighted_mse_loss(pred, target, weight, check_finite=check, backend="cpp").backward()


def steps():
    for case in CASES:
        p = make_problem(case, "cpu")
        yield str(case), {chk: (lambda chk=chk: ours(case, p, "cpp", check_finite=chk).backward())
                          for chk in (True, False)}
    yield "weighted_mse-N614400", {chk: weighted_mse_step(chk) for chk in (True, False)}


def main(reps: int) -> None:
    print(f"library {imbreg_fast.cpu_capability()}, {torch.get_num_threads()} threads, {reps} pairs")
    for name, fn in steps():
        times = {True: [], False: []}
        for r in range(reps + 3):
            for chk in ((True, False) if r % 2 else (False, True)):
                t0 = time.perf_counter()
                fn[chk]()
                if r >= 3:                              # warm-up pairs
                    times[chk].append(time.perf_counter() - t0)
        on, off = times[True], times[False]
        print(f"{name:36s} default min {min(on) * 1e3:8.2f} median {statistics.median(on) * 1e3:8.2f} ms | "
              f"checks off min {min(off) * 1e3:8.2f} median {statistics.median(off) * 1e3:8.2f} ms | "
              f"extra: min {min(on) / min(off) - 1:+6.1%}, median {statistics.median(on) / statistics.median(off) - 1:+6.1%}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
