"""The default path (``check_finite=True``) against ``check_finite=False`` and against the exp limit, paired:
the two settings and ATen's ``exp_u20`` (``imbreg_fast_bench.exp_throughput`` variant 2, the limit issue [P]
states its targets against, on 2^18 floats in L2 for as many exps as the op has logits) alternate call by
call in one process, so slow drifts of a shared machine hit all three alike (the pytest-benchmark runs of
bench_balanced_mse.py measure each setting in its own process, minutes apart). A step is what a training
step runs: gradients set to None, fwd+bwd on the cpp backend, the problems of bench_balanced_mse.py (full
sizes) plus the weighted MSE of bench_weighted_losses.py's size. Run::

    IMBREG_CPU_CAPABILITY=avx2 .venv/bin/python bench/paired_checks.py [repetitions]

Prints, per op, min and median of each setting, the default path's extra cost, and each setting's rate in
logits per second as a % of ``exp_u20``'s rate (min over min, median over median).
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

    def step():
        pred.grad = None
        F.weighted_mse_loss(pred, target, weight, check_finite=check, backend="cpp").backward()
    return step


def _logits(case: Case, p) -> int:
    n = p.pred.numel()
    return n * n if case.op == "bmc" else n * case.size


def steps():
    for case in CASES:
        p = make_problem(case, "cpu")

        def step(chk, case=case, p=p):
            p.pred.grad = None
            p.sigma.grad = None
            ours(case, p, "cpp", check_finite=chk).backward()
        yield str(case), {chk: (lambda chk=chk, step=step: step(chk)) for chk in (True, False)}, _logits(case, p)
    yield "weighted_mse-N614400", {chk: weighted_mse_step(chk) for chk in (True, False)}, 0


def main(reps: int) -> None:
    print(f"library {imbreg_fast.cpu_capability()}, {torch.get_num_threads()} threads, {reps} pairs")
    x = -20 * torch.rand(2 ** 18, generator=torch.Generator().manual_seed(0))
    probe = torch.ops.imbreg_fast_bench.exp_throughput
    for name, fn, logits in steps():
        repeats = max(1, round(logits / x.numel()))
        calls = dict(fn)
        if logits:
            calls["exp_u20"] = lambda: probe(x, 2, repeats)
        times = {key: [] for key in calls}
        order = list(calls)
        for r in range(reps + 3):
            for key in (order if r % 2 else order[::-1]):
                t0 = time.perf_counter()
                calls[key]()
                if r >= 3:                              # warm-up rounds
                    times[key].append(time.perf_counter() - t0)
        on, off = times[True], times[False]
        line = (f"{name:36s} default min {min(on) * 1e3:8.2f} median {statistics.median(on) * 1e3:8.2f} ms | "
                f"checks off min {min(off) * 1e3:8.2f} median {statistics.median(off) * 1e3:8.2f} ms | "
                f"extra: min {min(on) / min(off) - 1:+6.1%}, median {statistics.median(on) / statistics.median(off) - 1:+6.1%}")
        if logits:
            # the probe's time for exactly `logits` exps (it ran repeats * 2^18)
            ex = [t * logits / (repeats * x.numel()) for t in times["exp_u20"]]
            pct = {k: (min(ex) / min(v), statistics.median(ex) / statistics.median(v)) for k, v in
                   (("default", on), ("off", off))}
            line += (f" | exp_u20 {logits / statistics.median(ex) / 1e9:.2f} G exp/s (median); % of it: default "
                     f"{pct['default'][0]:.0%} / {pct['default'][1]:.0%}, off {pct['off'][0]:.0%} / {pct['off'][1]:.0%}"
                     " (min / median)")
        print(line)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
