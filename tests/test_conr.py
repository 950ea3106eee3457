"""ConR (imbreg_fast.functional.conr_loss, imbreg_fast.nn.ConRLoss): every backend against the plain-loop
reference (tests/naive_conr.py) and the published formulation (imbreg_fast.experiments.published), the
published quirks (extra ones in the denominator, NaN without positives, fp16 overflow, ignored t),
gradcheck, opcheck, torch.compile, determinism across thread counts, bad inputs.

Triton runs here too under TRITON_INTERPRET=1 (small n); tests/test_triton_conr.py tests its launcher.
"""
import math

import pytest
import torch

import imbreg_fast.functional as F
import imbreg_fast.nn as N
from conftest import CPP_OK, backend_params, interpreted
from imbreg_fast.experiments.published import conr_loss_published
from naive_conr import conr_naive

CPP_OPS = ("imbreg_fast::conr_fwd", "imbreg_fast::conr_bwd")
BACKENDS = backend_params("conr_loss", CPP_OPS)
FUSED = backend_params("conr_loss", CPP_OPS, include_torch=False)
REDUCTIONS = ["mean", "sum", "none"]


def batch(n, d, dtype=torch.float64, ties=True, seed=0, weights=True, spread=8.0):
    """Features [n, d], targets (integer ages with ties, or continuous), preds near the targets, weights."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    if ties:
        y = torch.randint(0, int(spread), (n,), generator=g).to(torch.float64)
    else:
        y = torch.rand(n, generator=g, dtype=torch.float64) * spread
    p = y + torch.randn(n, generator=g, dtype=torch.float64) * 2.0
    w = torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.25 if weights else None
    return f.to(dtype), y.to(dtype), p.to(dtype), None if w is None else w.to(dtype)


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def run(backend, f, y, p, w, reduction="mean", grad_out=None, **kw):
    f = f.detach().clone().requires_grad_(True)
    loss = F.conr_loss(f, y, p, weights=w, reduction=reduction, backend=backend, **kw)
    if grad_out is None:
        grad_out = torch.full_like(loss, 3.0) if loss.dim() == 0 else torch.linspace(-1, 2, loss.numel(),
                                                                                     dtype=loss.dtype)
    (g,) = torch.autograd.grad(loss, f, grad_out)
    return loss, g, grad_out


# --------------------------------------------------------------------------------------------------
# Values and gradients against the references
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("published_denominator", [True, False])
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vs_naive(backend, reduction, published_denominator, ties, with_weights, dtype):
    n, d = 11, 5   # odd sizes
    f, y, p, w = batch(n, d, dtype, ties=ties, weights=with_weights, spread=4.0, seed=n + ties)
    kw = dict(window=1.0, temperature=0.3, pushing=0.2, published_denominator=published_denominator)
    loss, g, g_out = run(backend, f, y, p, w, reduction, **kw)
    ref, ref_grad = conr_naive(f.double(), y.double(), p.double(), None if w is None else w.double(),
                               reduction=reduction, grad_rows=g_out.double().tolist() if reduction == "none" else None,
                               **kw)
    scale = 1.0 if reduction == "none" else 3.0
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64), **tol(dtype))
    torch.testing.assert_close(g.double(), scale * torch.tensor(ref_grad, dtype=torch.float64), **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vs_published(backend, ties, dtype):
    """The published AgeDB computation (two views stacked, [n, 1] labels and weights): value and gradient,
    fp64 <= 1e-10 relative, fp32 <= 1e-5."""
    b = 16 if interpreted(backend) else 48
    f, y, p, w = batch(b, 16, dtype, ties=ties, seed=3, spread=12.0)
    f = torch.cat([f, f + 0.3 * torch.randn_like(f)])              # two views
    y, p, w = torch.cat([y, y])[:, None], torch.cat([p, p + 0.5])[:, None], torch.cat([w, w])[:, None]
    ours, g, _ = run(backend, f, y, p, w, grad_out=torch.tensor(1.0, dtype=dtype))
    fr = f.clone().requires_grad_(True)
    ref = conr_loss_published(fr, y, p, w=1.0, weights=w, t=0.2, e=0.01)
    (ref_g,) = torch.autograd.grad(ref, fr)
    assert torch.isfinite(ref)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=0)
    scale = ref_g.abs().max()
    torch.testing.assert_close(g / scale, ref_g / scale, rtol=0, atol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional(backend):
    f, y, p, w = batch(10, 4, torch.float64)
    m = N.ConRLoss(backend=backend)
    assert "window=1.0" in repr(m)
    torch.testing.assert_close(m(f, y, p, w), F.conr_loss(f, y, p, weights=w, backend="torch"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_large(backend):
    """n not a multiple of any vector width, d odd, fp32 vs the torch backend in fp64."""
    n = 13 if interpreted(backend) else 203
    f, y, p, w = batch(n, 37, torch.float32, seed=5, spread=30.0)
    ours, g, _ = run(backend, f, y, p, w)
    ref, ref_g, _ = run("torch", f.double(), y.double(), p.double(), w.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["sparse", "dense", "mixed"])
def test_sparse_and_dense_rows(backend, layout):
    """The C++ kernel computes S only on the rows' positives and negatives (one dot product each) where they are
    few, and by dense tiles where a group of rows has many (docs/methods.md, ConR): both, and batches mixing
    them, against the torch backend in fp64."""
    n = 24 if interpreted(backend) else 160
    f, y, p, w = batch(n, 19, torch.float64, seed=11, spread=100.0 if layout == "sparse" else 3.0)
    if layout == "mixed":   # the first half spread out (few active columns per row), the second clustered
        y[: n // 2] = torch.arange(n // 2, dtype=y.dtype) * 50.0
        p[: n // 2] = y[: n // 2] + 0.3
    for reduction in REDUCTIONS:
        ours, g, _ = run(backend, f, y, p, w, reduction)
        ref, ref_g, _ = run("torch", f, y, p, w, reduction)
        torch.testing.assert_close(ours, ref, **tol(torch.float64))
        torch.testing.assert_close(g, ref_g, **tol(torch.float64))


# --------------------------------------------------------------------------------------------------
# The published code's quirks and our definitions where it fails
# --------------------------------------------------------------------------------------------------


def test_published_denominator_changes_the_value():
    f, y, p, w = batch(12, 4, torch.float64)
    a = F.conr_loss(f, y, p, weights=w, backend="torch")
    b = F.conr_loss(f, y, p, weights=w, published_denominator=False, backend="torch")
    assert (a - b).abs() > 1e-3


def test_published_ignores_t():
    f, y, p, w = batch(12, 4, torch.float64)
    a = conr_loss_published(f, y[:, None], p[:, None], weights=w[:, None], t=0.2)
    b = conr_loss_published(f, y[:, None], p[:, None], weights=w[:, None], t=5.0)
    assert a == b
    torch.testing.assert_close(F.conr_loss(f, y, p, weights=w, backend="torch"), a, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_without_positive_contributes_zero(backend):
    """Target 100 has no positive: the published loss is NaN; ours drops that anchor (0) and still divides
    by all n anchors for 'mean'."""
    f, y, p, w = batch(9, 4, torch.float64, spread=3.0)
    y[0], p[0] = 100.0, 1.0
    pub = conr_loss_published(f, y[:, None], p[:, None], weights=w[:, None])
    assert torch.isnan(pub)
    rows, g, _ = run(backend, f, y, p, w, "none")
    assert rows[0] == 0 and torch.isfinite(g).all()
    mean, _, _ = run(backend, f, y, p, w)
    torch.testing.assert_close(mean, rows.sum() / 9, rtol=1e-12, atol=0)
    ref, _ = conr_naive(f, y, p, w, reduction="none")
    torch.testing.assert_close(rows, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_without_negative_contributes_zero(backend):
    f = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0.0, 0.5, 10.0, 10.5], dtype=torch.float64)
    p = torch.tensor([0.0, 0.5, 20.0, 20.5], dtype=torch.float64)   # predictions far apart: no negative
    rows, g, _ = run(backend, f, y, p, None, "none")
    assert torch.equal(rows, torch.zeros(4, dtype=torch.float64)) and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_overflow(backend, dtype):
    """fp16: the published code overflows e^{S} (S up to 1/0.07 = 14.3: e^14.3 * n > 65504) and returns
    NaN / inf; ours accumulates in fp32 log space and matches fp32 on the same rounded inputs."""
    f, y, p, w = batch(8 if interpreted(backend) else 64, 8, torch.float64, spread=5.0)
    f = torch.cat([f, f])                                          # twin views: S_ii' = 1/tau
    y, p, w = torch.cat([y, y]), torch.cat([p, p]), torch.cat([w, w])
    fh = f.to(dtype)
    if dtype == torch.float16:
        pub = conr_loss_published(fh, y.to(dtype)[:, None], p.to(dtype)[:, None], weights=w.to(dtype)[:, None])
        assert not torch.isfinite(pub)
    ours, g, _ = run(backend, fh, y.to(dtype), p.to(dtype), w.to(dtype), grad_out=torch.tensor(1.0, dtype=dtype))
    assert ours.dtype == dtype and g.dtype == dtype
    ref, ref_g, _ = run("torch", fh.float(), y.to(dtype).float(), p.to(dtype).float(), w.to(dtype).float(),
                        grad_out=torch.tensor(1.0))
    torch.testing.assert_close(ours.float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g.float(), ref_g, rtol=5e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_row(backend):
    """A zero feature row normalises to 0 (F.normalize's eps): finite loss, gradient g / eps as torch's."""
    f, y, p, w = batch(7, 3, torch.float64, spread=3.0)
    f[2] = 0.0
    loss, g, _ = run(backend, f, y, p, w)
    ref, ref_g, _ = run("torch", f, y, p, w)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g, ref_g, rtol=1e-8, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights(backend):
    f, y, p, w = batch(9, 3, torch.float64, spread=3.0)
    w[::2] = 0.0
    loss, g, _ = run(backend, f, y, p, w, "none")
    ref, ref_g = conr_naive(f, y, p, w, reduction="none", grad_rows=torch.linspace(-1, 2, 9).tolist())
    torch.testing.assert_close(loss, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, torch.tensor(ref_grad := ref_g, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded(backend):
    f, y, p, w = batch(10, 6, torch.float64)
    ft = f.T.contiguous().T                         # column-major
    y2 = y[:, None].expand(10, 1)
    pw = torch.stack([p, p], 1)[:, 0]               # strided
    wexp = torch.tensor(0.7, dtype=torch.float64).expand(10)
    a, ga, _ = run(backend, ft, y2, pw, wexp)
    b, gb, _ = run("torch", f, y, p, torch.full((10,), 0.7, dtype=torch.float64))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single(backend):
    for n in (0, 1):
        f = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
        y = torch.zeros(n, dtype=torch.float64)
        for red in REDUCTIONS:
            loss = F.conr_loss(f, y, y, reduction=red, backend=backend)
            assert loss.shape == ((n,) if red == "none" else ()) and torch.all(loss == 0)
            loss.sum().backward()
            assert torch.equal(f.grad, torch.zeros_like(f))
            f.grad = None


def test_preds_and_weights_detached():
    f, y, p, w = batch(8, 3, torch.float64, spread=3.0)
    p.requires_grad_(True)
    w.requires_grad_(True)
    f.requires_grad_(True)
    F.conr_loss(f, y, p, weights=w, backend="torch").backward()
    assert p.grad is None and w.grad is None and f.grad is not None


# --------------------------------------------------------------------------------------------------
# Autograd machinery
# --------------------------------------------------------------------------------------------------


def test_gradcheck_torch():
    f, y, p, w = batch(7, 3, torch.float64, spread=3.0)
    f.requires_grad_(True)
    for red in REDUCTIONS:
        for pub in (True, False):
            assert torch.autograd.gradcheck(
                lambda x: F.conr_loss(x, y, p, weights=w, reduction=red, published_denominator=pub,
                                      temperature=0.5, backend="torch"), (f,))


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_fused(backend):
    f, y, p, w = batch(7, 3, torch.float64, spread=3.0)
    f.requires_grad_(True)
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: F.conr_loss(x, y, p, weights=w, reduction=red, temperature=0.5, backend=backend), (f,))


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises(backend):
    f, y, p, w = batch(7, 3, torch.float64, spread=3.0)
    f.requires_grad_(True)
    (g,) = torch.autograd.grad(F.conr_loss(f, y, p, weights=w, backend=backend), f, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        g.sum().backward()


@pytest.mark.requires_cpp
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cpp(reduction, dtype):
    f, y, p, w = batch(9, 5, dtype, spread=3.0)
    f.requires_grad_(True)
    for weights, pub in ((w, True), (None, False)):
        args = (f, y, p, weights, 1.0, 0.2, 0.05, pub, reduction, True, True)
        torch.library.opcheck(torch.ops.imbreg_fast.conr_fwd.default, args)
    torch.library.opcheck(torch.ops.imbreg_fast.conr_bwd.default, (f.detach(), y, p, w, torch.rand(9, dtype=dtype),
                                                                  1.0, 0.2, 0.05, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    f, y, p, w = batch(8 if interpreted(backend) else 32, 6, torch.float32, spread=4.0)
    lin = torch.nn.Linear(6, 6)

    def step(x):
        feats = lin(x)
        return F.conr_loss(feats, y, p, weights=w, backend=backend, check_finite=False)

    eager = step(f)
    eager.backward()
    g_eager = lin.weight.grad.clone()
    lin.weight.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(f)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, g_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.requires_cpp
@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_bit_identical_across_threads(reduction, dtype):
    f, y, p, w = batch(301, 33, dtype, spread=20.0, seed=7)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(run("cpp", f, y, p, w, reduction))
    finally:
        torch.set_num_threads(old)
    for loss, g, _ in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(g, outs[0][1])


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["features", "targets", "preds", "weights"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_named(backend, name, value):
    f, y, p, w = batch(6, 3, torch.float64)
    args = dict(features=f, targets=y, preds=p, weights=w)
    args[name] = args[name].clone()
    args[name].view(-1)[1] = value
    with pytest.raises(ValueError, match=name):
        F.conr_loss(args["features"], args["targets"], args["preds"], weights=args["weights"], backend=backend)
    # check_finite=False: no check, no crash
    F.conr_loss(args["features"], args["targets"], args["preds"], weights=args["weights"], backend=backend,
                check_finite=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_weight(backend):
    f, y, p, w = batch(6, 3, torch.float64)
    w[0] = -1.0
    with pytest.raises(ValueError, match="weights"):
        F.conr_loss(f, y, p, weights=w, backend=backend)


def test_bad_arguments():
    f, y, p, w = batch(6, 3, torch.float64)
    with pytest.raises(TypeError, match="targets"):
        F.conr_loss(f, y.long(), p)
    with pytest.raises(TypeError, match="preds"):
        F.conr_loss(f, y, p.int())
    with pytest.raises(TypeError, match="features"):
        F.conr_loss(f.long(), y, p)
    with pytest.raises(TypeError, match="features"):
        F.conr_loss([[1.0]], y, p)
    with pytest.raises(ValueError, match="features"):
        F.conr_loss(f[None], y, p)
    with pytest.raises(ValueError, match="targets"):
        F.conr_loss(f, y[:5], p)
    with pytest.raises(ValueError, match="weights"):
        F.conr_loss(f, y, p, weights=w[:, None, None])
    with pytest.raises(ValueError, match="targets"):
        F.conr_loss(f, y.clone().requires_grad_(True), p)
    with pytest.raises(ValueError, match="temperature"):
        F.conr_loss(f, y, p, temperature=0.0)
    with pytest.raises(ValueError, match="window"):
        F.conr_loss(f, y, p, window=-1.0)
    with pytest.raises(ValueError, match="pushing"):
        F.conr_loss(f, y, p, pushing=math.inf)
    with pytest.raises(TypeError, match="published_denominator"):
        F.conr_loss(f, y, p, published_denominator=1)
    with pytest.raises(ValueError, match="reduction"):
        F.conr_loss(f, y, p, reduction="batchmean")
    with pytest.raises(ValueError, match="backend"):
        F.conr_loss(f, y, p, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        N.ConRLoss(temperature=-1)
