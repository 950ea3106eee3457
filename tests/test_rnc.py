"""Rank-N-Contrast: every backend against the plain-loop oracle (tests/naive_rnc.py), the published O(n^3)
formulation (imbreg_fast.experiments.published) and the torch backend; ties, views, every reduction,
grad_output != 1, close and coincident pairs, large distances, half types, gradcheck, opcheck, torch.compile,
determinism across thread counts, bad inputs.

The Triton backend joins the backend-parametrised tests when TRITON_INTERPRET=1 (sizes kept tiny); its op-level
checks are in tests/test_triton_rnc.py.
"""
import pytest
import torch

import imbreg_fast.functional as F
import imbreg_fast.nn as N
from conftest import assert_compiled_step_matches_eager, backend_params, interpreted, op_kernel_registered
from imbreg_fast.experiments.published import rnc_loss_published
from naive_rnc import rnc_loss_naive

OP = "rnc_loss"
CPP_OP = "imbreg_fast::rnc_fwd"
BACKENDS = backend_params(OP, (CPP_OP,))
FUSED = backend_params(OP, (CPP_OP,), include_torch=False)
GRADCHECK_BACKENDS = [p for p in BACKENDS if not interpreted(p.values[0])]
REDUCTIONS = ["none", "mean", "sum"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-13)}

requires_cpp_op = pytest.mark.skipif(not op_kernel_registered(CPP_OP), reason="C++ CPU kernel of rnc_fwd not built")


def make_batch(b, d, *, views=2, ties=True, label_dim=1, dtype=torch.float64, seed=0, scale=1.0):
    """features [b, views, d] (views=None: flat [b, d]), labels [b, label_dim] (integer ages with ties, or
    continuous)."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, d) if views is None else (b, views, d)
    f = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if ties:
        y = torch.randint(0, max(2, b // 3), (b, label_dim), generator=g).to(torch.float64)
    else:
        y = torch.rand((b, label_dim), generator=g, dtype=torch.float64) * 50
    return f, y.to(dtype)


def flat(f, y):
    """The published flattening: view-major features, labels repeated per view."""
    if f.dim() == 2:
        return f, y
    return torch.cat([f[:, v] for v in range(f.shape[1])]), y.reshape(y.shape[0], -1).repeat(f.shape[1], 1)


def run(f, y, reduction, backend, grad_out=None, **kw):
    x = f.detach().clone().requires_grad_(True)
    loss = F.rnc_loss(x, y, reduction=reduction, backend=backend, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    (g,) = torch.autograd.grad(loss, x, grad_out)
    return loss.detach(), g


def assert_grad_close(got, expected, rtol):
    """Relative error in the 2-norm (a gradient entry is a sum of O(n) terms of both signs, so entry-wise
    relative errors are meaningless where it nearly cancels)."""
    err = float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300))
    assert err <= rtol, f"relative gradient error {err:.3g} > {rtol:.3g}"


def grad_output_for(reduction, f, seed=1):
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        shape = f.shape[:-1]
        return torch.rand(shape, generator=g, dtype=torch.float64).to(f.dtype) * 2 - 0.5
    return torch.tensor(1.7, dtype=f.dtype)


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["views_ties", "views_distinct", "flat_ties", "flat_label_dim2", "views3"])
def test_matches_naive(backend, reduction, case):
    kw = dict(views=2, ties=True)
    if case == "views_distinct":
        kw["ties"] = False
    elif case == "flat_ties":
        kw["views"] = None
    elif case == "flat_label_dim2":
        kw.update(views=None, label_dim=2)
    elif case == "views3":
        kw["views"] = 3
    b = 9 if kw["views"] is None else 5
    f, y = make_batch(b, 3, seed=hash(case) % 1000, **kw)
    y_in = y[:, 0] if kw.get("label_dim", 1) == 1 else y
    loss, _ = run(f, y_in, reduction, backend)
    ff, yy = flat(f, y)
    expected = torch.tensor(rnc_loss_naive(ff, yy, 2.0, reduction), dtype=torch.float64)
    if reduction == "none":
        expected = expected if f.dim() == 2 else expected.reshape(f.shape[1], b).t()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_matches_published(backend, dtype, ties):
    """The published computation (mean): fp64 <= 1e-10 relative, fp32 <= 1e-5, values and gradients."""
    b = 6 if interpreted(backend) else 24
    f, y = make_batch(b, 16, ties=ties, dtype=dtype, seed=3)
    loss, g = run(f, y, "mean", backend)
    x = f.detach().clone().requires_grad_(True)
    ref = rnc_loss_published(x, y, 2.0)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref.detach(), **TOL[dtype])
    assert_grad_close(g, g_ref, TOL[dtype]["rtol"])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_fused_matches_torch(backend, reduction, dtype, ties):
    """Odd sizes, grad_output != 1 (per anchor for 'none')."""
    b, d = (5, 3) if interpreted(backend) else (37, 19)
    f, y = make_batch(b, d, ties=ties, dtype=dtype, seed=11, scale=3.0)
    go = grad_output_for(reduction, f)
    l_t, g_t = run(f, y, reduction, "torch", go)
    l_f, g_f = run(f, y, reduction, backend, go)
    torch.testing.assert_close(l_f, l_t, **TOL[dtype])
    assert_grad_close(g_f, g_t, TOL[dtype]["rtol"])


def test_reductions_consistent():
    """'mean' and 'sum' are the mean and sum of 'none'; 'none' of views is [B, V] with [b, v] = anchor v B + b."""
    f, y = make_batch(7, 4, seed=5)
    none = F.rnc_loss(f, y, reduction="none", backend="torch")
    assert none.shape == (7, 2)
    torch.testing.assert_close(F.rnc_loss(f, y, backend="torch"), none.mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(F.rnc_loss(f, y, reduction="sum", backend="torch"), none.sum(), rtol=1e-14, atol=0)
    ff, yy = flat(f, y)
    flat_none = F.rnc_loss(ff, yy, reduction="none", backend="torch")
    assert torch.equal(flat_none, none.t().reshape(-1))
    # labels [B] and [B, 1] are the same
    assert torch.equal(F.rnc_loss(f, y[:, 0], backend="torch"), F.rnc_loss(f, y, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [400.0, 4000.0])
def test_large_distances_stay_finite(backend, scale):
    """distance / tau ~ 1e3 and 1e4 in fp32 (a row's spread below and beyond the cpp kernel's one-shift range):
    the published computation underflows (e^s = 0 -> log 0) and returns inf / NaN; ours equals the fp64
    computation of the same fp32 inputs."""
    b = 5 if interpreted(backend) else 16
    f, y = make_batch(b, 8, dtype=torch.float32, seed=7, scale=scale)
    with torch.no_grad():
        pub = rnc_loss_published(f, y, 2.0)
    assert not torch.isfinite(pub)
    loss, g = run(f, y, "mean", backend)
    ref, g_ref = run(f.double(), y.double(), "mean", "torch")
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    # s ~ -500 carries an fp32 rounding of ~3e-5 absolute (10x more at 10x the scale), which the softmax
    # weights pass on to the gradient
    assert_grad_close(g, g_ref, 1e-4 * scale / 400.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_pairs(backend):
    """Twin views 1e-4 apart at |f| ~ 10 (fp32): distances from the differences themselves, not from
    ||a||^2 + ||b||^2 - 2 a.b (which would give 0 or noise); values and gradients within 1e-5 of fp64."""
    b = 5 if interpreted(backend) else 16
    g = torch.Generator().manual_seed(9)
    base = torch.randn(b, 1, 32, generator=g, dtype=torch.float64) * 10
    f = torch.cat([base, base + 1e-4 * torch.randn(b, 1, 32, generator=g, dtype=torch.float64)], 1).float()
    y = torch.rand(b, generator=g, dtype=torch.float64).float()
    loss, gr = run(f, y, "mean", backend)
    ref, g_ref = run(f.double(), y.double(), "mean", "torch")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    assert_grad_close(gr, g_ref, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_coincident_features(backend, reduction):
    """f_i = f_j (distance 0): the gradient of that distance is defined as 0 (subgradient); no NaN, and the
    other pairs' gradients are unchanged: equal to the published computation (torch's norm, same convention)."""
    f, y = make_batch(5, 4, seed=13)
    f[:, 1] = f[:, 0]                 # identical views
    f[3, 0] = f[1, 0]                 # and two samples with identical features
    loss, g = run(f, y, reduction, backend, grad_output_for(reduction, f))
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    l_t, g_t = run(f, y, reduction, "torch", grad_output_for(reduction, f))
    torch.testing.assert_close(loss, l_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_t, rtol=1e-10, atol=1e-12)
    if reduction == "mean":
        x = f.clone().requires_grad_(True)
        (g_pub,) = torch.autograd.grad(rnc_loss_published(x, y, 2.0), x, grad_output_for(reduction, f))
        torch.testing.assert_close(g, g_pub, rtol=1e-10, atol=1e-12)
    # n = 2 with identical features: one pair per anchor, -log(e^s / e^s) = 0, gradient 0
    l2, g2 = run(torch.ones(1, 2, 3, dtype=torch.float64), torch.zeros(1), reduction, backend)
    assert torch.equal(l2, torch.zeros_like(l2)) and torch.equal(g2, torch.zeros_like(g2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 2, 3), (1, 4), (0, 4), (1, 2, 3)], ids=str)
def test_fewer_than_two_anchors(backend, reduction, shape):
    """n < 2: no pair, loss 0 (not NaN), gradient 0 — except n = 2 from one two-view sample, a real pair."""
    f = torch.randn(shape, dtype=torch.float64)
    y = torch.zeros(shape[0])
    loss, g = run(f, y, reduction, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    n = shape[0] * (shape[1] if len(shape) == 3 else 1)
    if n < 2:
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(g, torch.zeros_like(g))
        assert loss.shape == (() if reduction != "none" else shape[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded(backend):
    f, y = make_batch(6, 5, seed=17)
    big = torch.randn(6, 2, 10, dtype=torch.float64)
    big[..., ::2] = f
    nc = big[..., ::2]
    assert not nc.is_contiguous()
    y_nc = torch.stack([y[:, 0], y[:, 0]], 1)[:, 1]
    l1, g1 = run(nc, y_nc, "mean", backend)
    l2, g2 = run(f.contiguous(), y[:, 0], "mean", backend)
    torch.testing.assert_close(l1, l2, rtol=1e-14, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=0)
    # expanded labels (stride 0) and features (all views the same row)
    ye = torch.tensor([3.0], dtype=torch.float64).expand(6)
    fe = torch.randn(6, 1, 5, dtype=torch.float64).expand(6, 2, 5)
    l3, g3 = run(fe, ye, "sum", backend)
    l4, g4 = run(fe.contiguous(), ye.contiguous(), "sum", backend)
    torch.testing.assert_close(l3, l4, rtol=1e-14, atol=0)
    torch.testing.assert_close(g3, g4, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(backend, dtype):
    """Computed in fp32 (the fp32 result of the rounded inputs), returned in the input dtype."""
    f, y = make_batch(6, 8, dtype=torch.float64, seed=19, scale=30.0)
    fh, yh = f.to(dtype), y.to(dtype)
    loss, g = run(fh, yh, "mean", backend)
    assert loss.dtype == dtype and g.dtype == dtype
    ref, g_ref = run(fh.float(), yh.float(), "mean", "torch")
    eps = torch.finfo(dtype).eps     # one rounding to the half type (fp32 results may differ in the last bits)
    torch.testing.assert_close(loss.float(), ref, rtol=eps, atol=0)
    torch.testing.assert_close(g.float(), g_ref, rtol=eps, atol=eps * float(g_ref.abs().max()))


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    f, y = make_batch(4, 3, seed=23)
    x = f.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: F.rnc_loss(t, y, reduction=reduction, backend=backend), (x,))


@requires_cpp_op
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cpp(reduction, dtype):
    f = torch.randn(11, 5, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 4, (11, 1)).to(dtype)
    torch.library.opcheck(torch.ops.imbreg_fast.rnc_fwd.default, (f, y, None, 2.0, reduction, reduction != 0))
    w = torch.rand(11, dtype=dtype)
    torch.library.opcheck(torch.ops.imbreg_fast.rnc_fwd.default, (f.detach(), y, w, 0.7, 2, False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_training_step(backend, compile_backend):
    """torch.compile(fullgraph=True) of encoder + RnC + a regression head loss, then backward: equals eager."""
    if compile_backend == "inductor" and backend != "cpp":
        pytest.skip("inductor code generation around the opaque op: once, with the cpp backend")
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,)).double()

    def step(model):
        z = model(x)
        return (F.rnc_loss(z, y, backend=backend) + F.rnc_loss(z, y, reduction="none", backend=backend).sum()
                + (z.sum(-1).mean(1) - y).pow(2).mean())

    assert_compiled_step_matches_eager(
        step, lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double(), compile_backend)


@requires_cpp_op
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpp_deterministic_across_threads(reduction):
    f, y = make_batch(150, 33, dtype=torch.float32, seed=29)
    go = grad_output_for(reduction, f)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(f, y, reduction, "cpp", go))
    finally:
        torch.set_num_threads(old)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_labels_not_differentiated(backend):
    f, y = make_batch(5, 3, seed=31)
    with torch.no_grad():
        l1 = F.rnc_loss(f, y, backend=backend)
    yr = y.clone().requires_grad_(True)
    l2 = F.rnc_loss(f, yr, backend=backend)
    assert not l2.requires_grad
    torch.testing.assert_close(l1, l2, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    f, y = torch.randn(4, 2, 3), torch.rand(4)
    with pytest.raises(TypeError, match="labels must have a floating dtype"):
        F.rnc_loss(f, torch.arange(4), backend=backend)
    with pytest.raises(TypeError, match="features must have a floating dtype"):
        F.rnc_loss(torch.ones(4, 2, 3, dtype=torch.int64), y, backend=backend)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        F.rnc_loss(f, [1.0, 2.0, 3.0, 4.0], backend=backend)
    with pytest.raises(ValueError, match="labels must be"):
        F.rnc_loss(f, torch.rand(5), backend=backend)
    with pytest.raises(ValueError, match="labels must be"):
        F.rnc_loss(f, torch.rand(4, 2, 1), backend=backend)
    with pytest.raises(ValueError, match="features must be"):
        F.rnc_loss(torch.randn(4), y, backend=backend)
    with pytest.raises(ValueError, match="feature dimension"):
        F.rnc_loss(torch.randn(4, 0), y, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        F.rnc_loss(f, y, temperature=0.0, backend=backend)
    with pytest.raises(TypeError, match="temperature"):
        F.rnc_loss(f, y, temperature="2", backend=backend)
    with pytest.raises(ValueError, match="label_distance"):
        F.rnc_loss(f, y, label_distance="l2", backend=backend)
    with pytest.raises(ValueError, match="feature_similarity"):
        F.rnc_loss(f, y, feature_similarity="cosine", backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        F.rnc_loss(f, y, reduction="batchmean", backend=backend)
    bad = f.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        F.rnc_loss(bad, y, backend=backend)
    bad_y = y.clone()
    bad_y[1] = float("inf")
    with pytest.raises(ValueError, match="labels contains NaN or inf"):
        F.rnc_loss(f, bad_y, backend=backend)
    F.rnc_loss(f, y, backend=backend, check_finite=False)   # finite inputs: runs without the check too


def test_modules_match_functional():
    f, y = make_batch(5, 4, seed=37)
    m = N.RnCLoss(temperature=1.5, reduction="sum", backend="torch")
    assert "temperature=1.5" in repr(m)
    torch.testing.assert_close(m(f, y), F.rnc_loss(f, y, temperature=1.5, reduction="sum", backend="torch"))
    with pytest.raises(ValueError, match="temperature"):
        N.RnCLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        N.RnCLoss(reduction="avg")
