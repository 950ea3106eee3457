"""Smoke tests of the C++ CPU kernels of the Balanced MSE family (csrc/cpu/balanced_mse_kernel.cpp).

Quick parity checks cpp vs torch backend (values and gradients w.r.t. pred and noise_var), the exact
edge cases the kernels promise (N = 1 gives 0, masked NaN rows never read, extreme sigma^2 stays finite,
bit-identical results for 1 and 2 threads), opcheck of the raw ops, and every CPU capability library in a
subprocess. The full suite (naive references, gradcheck, torch.compile) is tests/test_balanced_mse.py.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import imbreg_fast
from imbreg_fast import functional as F
from imbreg_fast.ops import balanced_mse as B

pytestmark = pytest.mark.requires_cpp
ops = torch.ops.imbreg_fast if "cpp" in imbreg_fast.available_backends() else None

# (dtype, rtol, atol) of cpp vs torch for inputs of unit scale
TOLS = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-11, 1e-13)}


def _gmm(k, d, dtype):
    w = torch.rand(k, dtype=dtype) + 0.1
    a = torch.randn(k, d, d, dtype=dtype) * 0.5
    return (w / w.sum(), torch.randn(k, d, dtype=dtype), a @ a.mT + 0.3 * torch.eye(d, dtype=dtype))


def _run(loss_fn, backend, pred, target, noise_var, grad_out, **kw):
    p = pred.detach().clone().requires_grad_(True)
    s = noise_var.detach().clone().requires_grad_(True)
    loss = loss_fn(p, target, s, backend=backend, **kw)
    (loss * grad_out).sum().backward()
    return loss.detach(), p.grad, s.grad


def _losses(d, dtype, k=7, cand_dtype=None):
    gmm = _gmm(k, d, dtype)
    centers, weights = torch.randn(k, d, dtype=dtype), gmm[0]
    cands = torch.randn(19, d, dtype=dtype).to(cand_dtype or dtype)
    return {
        "bmc": lambda p, t, s, **kw: F.bmc_loss(p, t, s, **kw),
        "bmc_candidates": lambda p, t, s, **kw: F.bmc_loss(p, t, s, candidates=cands, **kw),
        "gai": lambda p, t, s, **kw: F.gai_loss(p, t, s, gmm, **kw),
        "bni": lambda p, t, s, **kw: F.bni_loss(p, t, s, centers, weights, **kw),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_cpp_matches_torch(dtype, d, reduction, masked):
    rtol, atol = TOLS[dtype]
    n = 37
    pred, target = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    noise_var = torch.tensor(0.7, dtype=dtype)
    mask = torch.rand(n) > 0.3 if masked else None
    grad_out = torch.randn(n, dtype=dtype) if reduction == "none" else torch.tensor(1.7, dtype=dtype)
    for name, fn in _losses(d, dtype).items():
        ref = _run(fn, "torch", pred, target, noise_var, grad_out, mask=mask, reduction=reduction)
        got = _run(fn, "cpp", pred, target, noise_var, grad_out, mask=mask, reduction=reduction)
        for what, r, g in zip(("loss", "grad pred", "grad noise_var"), ref, got):
            assert g.dtype == r.dtype and g.shape == r.shape, (name, what)
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()),
                                       msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 3, 7])
def test_bmc_single_row_is_exactly_zero(dtype, d):
    # one kept row among NaN rows that are masked out: loss and gradients exactly 0, NaN never read
    pred = torch.cat([torch.randn(1, d, dtype=dtype), torch.full((3, d), float("nan"), dtype=dtype)])
    target = torch.cat([torch.randn(1, d, dtype=dtype), torch.full((3, d), float("nan"), dtype=dtype)])
    mask = torch.tensor([True, False, False, False])
    for reduction in (0, 1, 2):
        for out in ops.bmc_fwd(pred, target, None, mask, torch.tensor(0.3, dtype=dtype), reduction, True):
            assert torch.equal(out, torch.zeros_like(out)), (reduction, out)
        for out in ops.bmc_fwd(pred[:1], target[:1], None, None, torch.tensor(0.3, dtype=dtype), reduction, True):
            assert torch.equal(out, torch.zeros_like(out)), (reduction, out)


def test_no_kept_row_and_empty():
    pred, target = torch.randn(5, 2), torch.randn(5, 2)
    mask = torch.zeros(5, dtype=torch.bool)
    tables = B.bni_tables(torch.tensor(1.0), torch.randn(3, 2), torch.full((3,), 1 / 3), torch.float32)
    for reduction in (0, 1, 2):
        for out in (*ops.bmc_fwd(pred, target, None, mask, torch.tensor(1.0), reduction, True),
                    *ops.mixture_nll_fwd(pred, target, mask, torch.tensor(1.0), *tables, reduction, True)):
            assert torch.equal(out, torch.zeros_like(out))
        empty = torch.empty(0, 2)
        loss, gp, gv = ops.bmc_fwd(empty, empty, None, None, torch.tensor(1.0), reduction, True)
        assert gp.shape == (0, 2) and loss.shape == ((0,) if reduction == 0 else ())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise_var", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_extremes_stay_finite(dtype, noise_var, offset):
    # predictions 1e4 away from every target and candidate with sigma^2 = 1e-8: logits ~ -1e16, every
    # non-max exp underflows
    for d in (1, 3):
        pred = torch.randn(50, d, dtype=dtype) + offset
        target = torch.randn(50, d, dtype=dtype)
        s = torch.tensor(noise_var, dtype=dtype)
        for name, fn in _losses(d, dtype, k=6).items():
            loss, gp, gv = _run(fn, "cpp", pred, target, s, torch.tensor(1.0, dtype=dtype))
            assert torch.isfinite(loss) and torch.isfinite(gp).all() and torch.isfinite(gv), (name, d)


def test_bit_identical_across_thread_counts():
    n, d = 1000, 1
    pred, target = torch.randn(n, d), torch.randn(n, d)
    s = torch.tensor(0.5)
    cands = torch.randn(333, d)
    tables = B.gai_tables(s, *_gmm(16, d, torch.float32), torch.float32)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([*ops.bmc_fwd(pred, target, None, None, s, 1, True),
                            *ops.bmc_fwd(pred, target, cands, None, s, 2, True),
                            *ops.mixture_nll_fwd(pred, target, None, s, *tables, 1, True)])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_compute_in_fp32(dtype):
    n, d = 40, 2
    pred, target = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    s = torch.tensor(0.5)
    for name, fn in _losses(d, torch.float32, cand_dtype=dtype).items():
        ref = _run(fn, "torch", pred, target, s, torch.tensor(1.0))
        got = _run(fn, "cpp", pred, target, s, torch.tensor(1.0))
        assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
        for r, g in zip(ref, got):
            torch.testing.assert_close(g.float(), r.float(), rtol=1e-2, atol=1e-2)


def test_exp_throughput_probe():
    # benchmark-only op, in its own namespace (csrc/bench_probes.cpp), not in the library's
    assert not hasattr(ops, "exp_throughput")
    x = -torch.rand(10000) * 80
    expected = torch.exp(x.double()).sum()
    for variant in (0, 1, 2, 3):
        got = torch.ops.imbreg_fast_bench.exp_throughput(x[:10001 - variant], variant, 2)   # odd tails too
        assert got.dtype == torch.float32 and got.shape == ()
        ref = (torch.exp2 if variant == 3 else torch.exp)(x[:10001 - variant].double()).sum()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match="variant must be"):
        torch.ops.imbreg_fast_bench.exp_throughput(x, 4, 1)


def _kernels_exp(values, variant=1):
    """The kernels' vector exp (exp_shifted; variant 3: exp2_shifted) of each value: the probe sums over x, so
    each value goes in as one full vector of copies (a power-of-two count: the sum is exact)."""
    out = []
    for v in values.tolist():
        x = torch.full((16,), v, dtype=torch.float32)
        out.append(float(torch.ops.imbreg_fast_bench.exp_throughput(x, variant, 1)) / 16)
    return torch.tensor(out, dtype=torch.float64)


def test_kernels_exp2_accuracy_and_edges():
    # the kernels' 2^x for x <= 0 (exp2_shifted, csrc/cpu/fast_exp.h): relative error against 2^x in float64,
    # exactly 1 at 0, 0 from -127 down (and below 2^-126 from -126), NaN kept
    g = torch.Generator().manual_seed(1)
    # (to -125: the DEFAULT library's exp2 is its exp of x ln 2, which flushes from -125.5)
    z = torch.cat([-125.0 * torch.rand(1500, generator=g), -torch.rand(500, generator=g),
                   -1e-6 * torch.rand(100, generator=g), -torch.arange(0, 125.5, 0.5),
                   torch.tensor([-0.0, -0.5, -124.999])]).float()
    got = _kernels_exp(z, 3)
    ref = torch.exp2(z.double())
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < 5e-7, rel
    assert _kernels_exp(torch.tensor([0.0]), 3).item() == 1.0
    assert _kernels_exp(torch.tensor([-127.0, -127.5, -200.0, -1e30, float("-inf")]), 3).tolist() == [0.0] * 5
    assert (_kernels_exp(torch.tensor([-126.5, -126.01]), 3) < 2.0 ** -126).all()
    assert math.isnan(_kernels_exp(torch.tensor([float("nan")]), 3).item())


def test_kernels_exp_accuracy_and_edges():
    # the kernels' exp for z <= 0 (csrc/cpu/fast_exp.h): relative error against exp in float64, exactly 1 at 0,
    # exactly 0 below ln(FLT_MIN), NaN kept
    g = torch.Generator().manual_seed(0)
    z = torch.cat([-87.3 * torch.rand(1500, generator=g), -torch.rand(500, generator=g),
                   -1e-6 * torch.rand(100, generator=g), torch.tensor([-0.0, -87.33, -87.336])]).float()
    if imbreg_fast.cpu_capability() == "default":   # its SSE2 exp flushes 2^(n-1) p below 2^-126: 0 from ~-86.64
        z = z[z > -86.6]
    got = _kernels_exp(z)
    ref = torch.exp(z.double())
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < 5e-7, rel
    assert _kernels_exp(torch.tensor([0.0])).item() == 1.0
    assert _kernels_exp(torch.tensor([-87.35, -100.0, -1e30, float("-inf")])).tolist() == [0.0] * 4
    assert math.isnan(_kernels_exp(torch.tensor([float("nan")])).item())


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(compute_grad, reduction):
    pred = torch.randn(9, 2, dtype=torch.float64, requires_grad=compute_grad)
    target = torch.randn(9, 2, dtype=torch.float64)
    mask = torch.rand(9) > 0.2
    s = torch.tensor(0.6, dtype=torch.float64, requires_grad=compute_grad)
    cands = torch.randn(5, 2, dtype=torch.float64)
    tables = B.gai_tables(s, *_gmm(4, 2, torch.float64), torch.float64)
    torch.library.opcheck(ops.bmc_fwd.default, (pred, target, None, mask, s, reduction, compute_grad))
    torch.library.opcheck(ops.bmc_fwd.default, (pred, target, cands, None, s, reduction, compute_grad))
    torch.library.opcheck(ops.mixture_nll_fwd.default, (pred, target, mask, s, *tables, reduction, compute_grad))


def test_bad_arguments_raise():
    p, t, s = torch.randn(4, 1), torch.randn(4, 1), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="reduction"):
        ops.bmc_fwd(p, t, None, None, s, 3, False)
    with pytest.raises(RuntimeError, match="noise_var must be finite and > 0"):
        ops.bmc_fwd(p, t, None, None, torch.tensor(-1.0), 1, False)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        ops.bmc_fwd(p, t, None, torch.ones(4), s, 1, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.bmc_fwd(torch.randn(4, 2)[:, :1], t, None, None, s, 1, False)
    tables = B.bni_tables(s, torch.randn(3, 1), torch.full((3,), 1 / 3), torch.float32)
    with pytest.raises(RuntimeError, match="compute dtype"):
        ops.mixture_nll_fwd(p, t, None, s, tables[0].double(), *tables[1:], 1, False)
    with pytest.raises(RuntimeError, match="K >= 1"):
        ops.mixture_nll_fwd(p, t, None, s, torch.empty(0), torch.empty(0), torch.empty(0, 1), torch.empty(0, 1, 1),
                            torch.empty(0), 1, False)


_SUBPROCESS_CHECK = r"""
import json, sys, torch
import imbreg_fast
from imbreg_fast import _extension, functional as F
torch.manual_seed(0)
out = {"capability": _extension.cpu_capability()}
worst = 0.0
for d in (1, 3):
    p, t = torch.randn(33, d), torch.randn(33, d)
    mask = torch.rand(33) > 0.2
    w = torch.rand(5) + 0.1; w = w / w.sum()
    mu = torch.randn(5, d); cov = torch.eye(d).expand(5, d, d) * 0.4
    for fn in (lambda p, s, b: F.bmc_loss(p, t, s, mask=mask, backend=b),
               lambda p, s, b: F.bmc_loss(p, t, s, candidates=mu, backend=b),
               lambda p, s, b: F.gai_loss(p, t, s, (w, mu, cov), mask=mask, backend=b),
               lambda p, s, b: F.bni_loss(p, t, s, mu, w, backend=b)):
        res = []
        for b in ("torch", "cpp"):
            pp = p.clone().requires_grad_(); s = torch.tensor(0.8, requires_grad=True)
            loss = fn(pp, s, b); loss.backward()
            res.append(torch.cat([loss.reshape(1), pp.grad.reshape(-1), s.grad.reshape(1)]).double())
        worst = max(worst, ((res[0] - res[1]).abs() / res[0].abs().clamp_min(1e-3)).max().item())
one = torch.randn(1, 2)
out["n1_zero"] = all(bool((o == 0).all()) for o in torch.ops.imbreg_fast.bmc_fwd(
    one, torch.randn(1, 2), None, None, torch.tensor(0.3), 1, True))
out["worst_rel"] = worst
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_capability_library(capability):
    machine = torch.backends.cpu.get_cpu_capability().lower()
    order = ("default", "avx2", "avx512")
    if machine not in order or order.index(capability) > order.index(machine):
        pytest.skip(f"this CPU ({machine}) cannot run the {capability} kernels")
    env = dict(os.environ, IMBREG_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["capability"] != capability:
        pytest.skip(f"the {capability} library was not built (loaded {out['capability']})")
    assert out["n1_zero"]
    assert out["worst_rel"] < 2e-5, out
