"""Triton backend of Rank-N-Contrast: ``imbreg_fast::triton_rnc_fwd`` (launcher ``imbreg_fast.triton_kernels.rnc``).

Run with ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_rnc.py -q`` on CPU (small n: the
interpreter runs one program after another), or on a CUDA machine. The public-function checks of
tests/test_rnc.py (naive loops, the published formulation, gradcheck-free parity, torch.compile) also run for
the Triton backend when TRITON_INTERPRET=1.
"""
import math

import pytest
import torch

import imbreg_fast.functional as F
from imbreg_fast.experiments.published import rnc_loss_published
from imbreg_fast.ops import rnc as rnc_ops
from naive_rnc import rnc_anchor_losses_naive, rnc_loss_naive
from test_rnc import assert_grad_close, flat, grad_output_for, make_batch, run

pytestmark = pytest.mark.requires_triton

REDUCTIONS = ["none", "mean", "sum"]
RED_CODE = {"none": 0, "mean": 1, "sum": 2}
F64 = dict(rtol=1e-12, atol=1e-13)


def kernels():
    from imbreg_fast.triton_kernels import rnc
    return rnc


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


# (views or None for a flat batch, B or n, d, label_dim, ties)
CASES = {
    "n2": (None, 2, 3, 1, False),
    "n3_tied": (None, 3, 1, 1, True),
    "views_ties_n14": (2, 7, 5, 1, True),
    "flat_L2_n13": (None, 13, 7, 2, True),
    "views3_n15": (3, 5, 3, 1, True),
    "flat_n37_d37": (None, 37, 37, 1, True),     # 3 row blocks / column tiles of 16, 2 feature chunks, BLOCK 64
    "distinct_n11": (None, 11, 4, 2, False),
}


# the interpreter runs flat_n37_d37 slowly (~12-25 s a call): one reduction in the default pass, the others
# with -m slow
_NAIVE_PARAMS = [pytest.param(case, red, marks=[pytest.mark.slow] if case == "flat_n37_d37" and red != "mean" else [],
                              id=f"{case}-{red}") for case in CASES for red in REDUCTIONS]


@pytest.mark.parametrize("case, reduction", _NAIVE_PARAMS)
def test_vs_naive_and_torch(case, reduction, triton_device):
    """Values vs the plain loops (fp64, 1e-12) and the torch backend; gradients vs the torch backend with
    grad_output != 1 (per anchor for 'none')."""
    views, b, d, label_dim, ties = CASES[case]
    f, y = make_batch(b, d, views=views, ties=ties, label_dim=label_dim, seed=len(case))
    y_in = y[:, 0] if label_dim == 1 else y
    go = grad_output_for(reduction, f)
    loss, g = run(f.to(triton_device), y_in.to(triton_device), reduction, "triton", go.to(triton_device))
    loss, g = loss.cpu(), g.cpu()
    ff, yy = flat(f, y)
    expected = torch.tensor(rnc_loss_naive(ff, yy, 2.0, reduction), dtype=torch.float64)
    if reduction == "none" and views is not None:
        expected = expected.reshape(views, b).t()
    torch.testing.assert_close(loss, expected, **F64)
    l_t, g_t = run(f, y_in, reduction, "torch", go)
    torch.testing.assert_close(loss, l_t, **F64)
    if case == "n2":      # one column per anchor: l_i = log e^s - s = 0, the gradient is 0 up to rounding
        assert float(g.abs().max()) < 1e-14 and float(g_t.abs().max()) < 1e-14
    else:
        assert_grad_close(g, g_t, 1e-11)


def test_gradient_vs_naive_finite_differences(triton_device):
    """d (sum_i w_i l_i) / d f against central differences of the plain loops (fp64, ties, L = 2)."""
    n, d = 7, 3
    f, y = make_batch(n, d, views=None, label_dim=2, seed=41)
    w = torch.linspace(-0.5, 1.5, n, dtype=torch.float64)
    _, g = run(f.to(triton_device), y.to(triton_device), "none", "triton", w.to(triton_device))

    def objective(x):
        per = rnc_anchor_losses_naive(x.tolist(), y.tolist(), 2.0)
        return sum(wi * li for wi, li in zip(w.tolist(), per))

    h = 1e-5
    fd = torch.zeros_like(f)
    for i in range(n):
        for c in range(d):
            xp, xm = f.clone(), f.clone()
            xp[i, c] += h
            xm[i, c] -= h
            fd[i, c] = (objective(xp) - objective(xm)) / (2 * h)
    assert_grad_close(g.cpu(), fd, 1e-8)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_fp32_vs_torch(reduction, ties, triton_device):
    """fp32 (computed in fp32 on the Triton side): odd n and d, grad_output != 1."""
    f, y = make_batch(9, 13, views=2, ties=ties, dtype=torch.float32, seed=43, scale=3.0)
    go = grad_output_for(reduction, f)
    loss, g = run(f.to(triton_device), y.to(triton_device), reduction, "triton", go.to(triton_device))
    l_t, g_t = run(f, y, reduction, "torch", go)
    torch.testing.assert_close(loss.cpu(), l_t, rtol=1e-5, atol=1e-6)
    assert_grad_close(g.cpu(), g_t, 1e-5)


@pytest.mark.slow       # ~50 s under the interpreter
def test_row_block_128_vs_torch(triton_device):
    """n = 70: the row program's block is 128 (7-level hypercube sort, 58 padding lanes); five row blocks."""
    f, y = make_batch(35, 6, views=2, ties=True, seed=47)
    go = torch.tensor(0.3, dtype=torch.float64)
    loss, g = run(f.to(triton_device), y.to(triton_device), "sum", "triton", go.to(triton_device))
    l_t, g_t = run(f, y, "sum", "torch", go)
    torch.testing.assert_close(loss.cpu(), l_t, **F64)
    assert_grad_close(g.cpu(), g_t, 1e-11)


@pytest.mark.parametrize("scale", [400.0, 4000.0])
def test_large_distances_stay_finite(scale, triton_device):
    """distance / tau ~ 1e3 and ~1e4 in fp32: every e^s underflows without the running max (the published
    computation returns inf / NaN); ours is finite and equals the fp64 computation of the same inputs."""
    f, y = make_batch(6, 8, dtype=torch.float32, seed=7, scale=scale)
    with torch.no_grad():
        assert not torch.isfinite(rnc_loss_published(f, y, 2.0))
    go = torch.tensor(1.3)
    loss, g = run(f.to(triton_device), y.to(triton_device), "mean", "triton", go.to(triton_device))
    loss, g = loss.cpu(), g.cpu()
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    ref, g_ref = run(f.double(), y.double(), "mean", "torch", go.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    assert_grad_close(g, g_ref, 1e-4 * scale / 400.0)
    l32, g32 = run(f, y, "mean", "torch", go)
    torch.testing.assert_close(loss, l32, rtol=1e-5, atol=0)
    assert_grad_close(g, g32, 1e-4 * scale / 400.0)


def test_close_pairs(triton_device):
    """Twin views 1e-4 apart at |f| ~ 10 in fp32: distances and gradients from the differences themselves."""
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(6, 1, 33, generator=gen, dtype=torch.float64) * 10
    f = torch.cat([base, base + 1e-4 * torch.randn(6, 1, 33, generator=gen, dtype=torch.float64)], 1).float()
    y = torch.rand(6, generator=gen, dtype=torch.float64).float()
    loss, g = run(f.to(triton_device), y.to(triton_device), "mean", "triton")
    ref, g_ref = run(f.double(), y.double(), "mean", "torch")
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=0)
    assert_grad_close(g.cpu(), g_ref, 1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_coincident_features(reduction, triton_device):
    """Distance 0 (identical views, identical samples): subgradient 0, no NaN, equal to the torch backend."""
    f, y = make_batch(5, 4, seed=13)
    f[:, 1] = f[:, 0]
    f[3, 0] = f[1, 0]
    go = grad_output_for(reduction, f)
    loss, g = run(f.to(triton_device), y.to(triton_device), reduction, "triton", go.to(triton_device))
    l_t, g_t = run(f, y, reduction, "torch", go)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(loss.cpu(), l_t, **F64)
    torch.testing.assert_close(g.cpu(), g_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(dtype, triton_device):
    """Computed in fp32, returned in the input dtype: one rounding away from the fp32 torch backend."""
    f, y = make_batch(6, 9, seed=19, scale=30.0)
    fh, yh = f.to(dtype), y.to(dtype)
    loss, g = run(fh.to(triton_device), yh.to(triton_device), "mean", "triton")
    assert loss.dtype == dtype and g.dtype == dtype
    ref, g_ref = run(fh.float(), yh.float(), "mean", "torch")
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.cpu().float(), ref, rtol=eps, atol=0)
    torch.testing.assert_close(g.cpu().float(), g_ref, rtol=eps, atol=eps * float(g_ref.abs().max()))


def test_non_contiguous_and_expanded(triton_device):
    f, y = make_batch(6, 5, seed=17)
    big = torch.randn(6, 2, 10, dtype=torch.float64)
    big[..., ::2] = f
    nc = big[..., ::2].to(triton_device)
    assert not nc.is_contiguous()
    y_nc = torch.stack([y[:, 0], y[:, 0]], 1)[:, 1].to(triton_device)
    l1, g1 = run(nc, y_nc, "mean", "triton")
    l2, g2 = run(f.contiguous().to(triton_device), y[:, 0].contiguous().to(triton_device), "mean", "triton")
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    # expanded labels (stride 0: every pair tied) and features (the views are the same row)
    ye = torch.tensor([3.0], dtype=torch.float64).expand(6).to(triton_device)
    fe = torch.randn(6, 1, 5, dtype=torch.float64).expand(6, 2, 5).to(triton_device)
    l3, g3 = run(fe, ye, "sum", "triton")
    l4, g4 = run(fe.cpu().contiguous(), ye.cpu().contiguous(), "sum", "torch")
    torch.testing.assert_close(l3.cpu(), l4, **F64)
    torch.testing.assert_close(g3.cpu(), g4, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", [pytest.param("none", marks=pytest.mark.slow), "mean",
                                       pytest.param("sum", marks=pytest.mark.slow)])
def test_deterministic(reduction, triton_device):
    """Run to run bit-identical (fixed sort network, fixed-order sums, no atomics)."""
    f, y = make_batch(11, 7, dtype=torch.float32, seed=53)
    f, y = on(triton_device, f, y)
    go = grad_output_for(reduction, f)
    a = run(f, y, reduction, "triton", go)
    b = run(f, y, reduction, "triton", go)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 2, 3), (1, 4), (0, 4), (1, 2, 3)], ids=str)
def test_fewer_than_two_anchors(shape, reduction, triton_device):
    """n < 2: loss 0 and gradient 0 (no launch); n = 2 from one two-view sample is a real pair."""
    f = torch.randn(shape, dtype=torch.float64, device=triton_device)
    y = torch.zeros(shape[0], dtype=torch.float64, device=triton_device)
    loss, g = run(f, y, reduction, "triton")
    n = shape[0] * (shape[1] if len(shape) == 3 else 1)
    if n < 2:
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(g, torch.zeros_like(g))
    else:
        l_t, g_t = run(f.cpu(), y.cpu(), reduction, "torch")
        torch.testing.assert_close(loss.cpu(), l_t, **F64)
        torch.testing.assert_close(g.cpu(), g_t, rtol=1e-10, atol=1e-12)
    for n_rows in (0, 1):
        out = kernels().rnc_fwd(torch.ones(n_rows, 3, device=triton_device),
                                torch.ones(n_rows, 1, device=triton_device), None, 2.0, RED_CODE[reduction], True)
        assert out[0].shape == ((n_rows,) if reduction == "none" else ()) and not out[0].any()
        assert out[1].shape == (n_rows, 3) and not out[1].any()


def test_row_limit_is_explicit(triton_device):
    """A row must fit one block: n <= MAX_N, beyond it a ValueError naming n (launcher and dispatcher), never a
    silent truncation; 'auto' passes the Triton backend over."""
    k = kernels()
    assert k.MAX_N == rnc_ops.TRITON_MAX_N
    assert k.row_block(k.MAX_N) == k.MAX_N and k.row_block(37) == 64 and k.row_block(2) == 2
    with pytest.raises(ValueError, match=f"n = {k.MAX_N + 1}"):
        k.row_block(k.MAX_N + 1)
    big = torch.zeros(k.MAX_N + 1, 1, device=triton_device)
    with pytest.raises(ValueError, match=f"n = {k.MAX_N + 1}"):
        k.rnc_fwd(big, big, None, 2.0, 1, False)
    with pytest.raises(ValueError, match=f"n = {k.MAX_N + 1}"):
        F.rnc_loss(big, big[:, 0], backend="triton", check_finite=False)


def test_unchecked_nan_label_gives_nan(triton_device):
    """check_finite=False and a NaN label: NaN loss and gradient, no crash and no undefined sort."""
    f, y = make_batch(5, 3, seed=59)
    y[2, 0] = float("nan")
    loss, g = run(f.to(triton_device), y.to(triton_device), "mean", "triton", check_finite=False)
    assert torch.isnan(loss) and torch.isnan(g).any()
    none = F.rnc_loss(f.to(triton_device), y.to(triton_device), reduction="none", backend="triton",
                      check_finite=False)
    assert torch.isnan(none).all()


def test_op_contract(triton_device):
    """Direct calls: anchor weights (the 'none' backward), no-grad outputs empty, fp32 labels with fp64 features."""
    f, y = make_batch(8, 5, views=None, seed=61)
    f, y = on(triton_device, f, y)
    w = torch.linspace(0.2, 2.0, 8, dtype=torch.float64, device=triton_device)
    op = torch.ops.imbreg_fast.triton_rnc_fwd
    per, empty = op(f, y, None, 1.5, 0, False)
    assert per.shape == (8,) and empty.numel() == 0
    total, grad = op(f, y, w, 1.5, 2, True)
    torch.testing.assert_close(total, (w * per).sum(), **F64)
    x = f.cpu().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F.rnc_loss(x, y.cpu(), temperature=1.5, reduction="none", backend="torch"), x,
                                   w.cpu())
    assert_grad_close(grad.cpu(), g_ref, 1e-11)
    mean, _ = op(f, y.float(), None, 1.5, 1, False)
    torch.testing.assert_close(mean, per.mean(), **F64)


@pytest.mark.parametrize("reduction", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_opcheck(reduction, triton_device):
    f = torch.randn(9, 5, dtype=torch.float64, device=triton_device, requires_grad=True)
    y = torch.randint(0, 3, (9, 1)).double().to(triton_device)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.imbreg_fast.triton_rnc_fwd.default, (f, y, None, 2.0, reduction, reduction != 0),
                          test_utils=utils)
    w = torch.rand(9, dtype=torch.float64, device=triton_device)
    torch.library.opcheck(torch.ops.imbreg_fast.triton_rnc_fwd.default, (f.detach(), y, w, 0.7, 2, False),
                          test_utils=utils)


def test_published_value_and_gradient(triton_device):
    """The published O(n^3) computation (mean): fp32 within 1e-5, values and gradients."""
    f, y = make_batch(6, 16, ties=True, dtype=torch.float32, seed=3)
    loss, g = run(f.to(triton_device), y.to(triton_device), "mean", "triton")
    x = f.clone().requires_grad_(True)
    ref = rnc_loss_published(x, y, 2.0)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss.cpu(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert_grad_close(g.cpu(), g_ref, 1e-5)
    assert math.isfinite(float(loss))
