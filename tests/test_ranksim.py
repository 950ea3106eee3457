"""RankSim: every backend against the plain-loop oracle (tests/naive_ranksim.py), the torch backend and the
published formulation (imbreg_fast.experiments.published.ranksim_loss_published); ties (integer labels, a
zero feature row), every reduction, grad_output != 1 (the gradient is not linear in it), lambda, the
subsample rules, the module's gamma, non-contiguous / expanded / [n, ...] inputs, half types, opcheck,
torch.compile, determinism across thread counts, second-order errors, bad inputs.

The Triton backend joins the backend-parametrised tests when TRITON_INTERPRET=1 (sizes kept tiny); its
launcher-level checks are in tests/test_triton_ranksim.py. No gradcheck: RankSim's loss is piecewise
constant in the features and its gradient is the blackbox-solver surrogate, so finite differences do not
apply; the surrogate is checked against the naive loops and the published code instead.
"""
import random

import pytest
import torch

import imbreg_fast.experiments.published as pub
import imbreg_fast.functional as F
import imbreg_fast.nn as N
from conftest import backend_params
from naive_ranksim import naive_rank, ranksim_naive

OP = "ranksim_loss"
CPP_OPS = ("imbreg_fast::ranksim_fwd", "imbreg_fast::ranksim_bwd")
BACKENDS = backend_params(OP, CPP_OPS)
FUSED = backend_params(OP, CPP_OPS, include_torch=False)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
REDUCTIONS = ["none", "mean", "sum"]


def make_batch(m, d, dtype, *, int_labels=True, zero_row=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    if zero_row:
        x[m // 2] = 0.0                # S row and column exactly 0: ties in the feature ranks, the eps branch
    if int_labels:
        y = torch.randint(0, max(2, m // 2), (m,), generator=g).double()   # repeated ages: ties
    else:
        y = torch.rand(m, generator=g, dtype=torch.float64) * 10
    return x.to(dtype), y.to(dtype)


def grad_out_for(reduction, m, dtype, scale=1.7):
    if reduction == "none":
        return torch.linspace(-1.5, 2.0, m, dtype=dtype) * scale
    return torch.tensor(scale, dtype=dtype)


def run(x, y, reduction, backend, grad_out, **kw):
    xr = x.detach().clone().requires_grad_(True)
    loss = F.ranksim_loss(xr, y, subsample=None, reduction=reduction, backend=backend, **kw)
    (grad,) = torch.autograd.grad((loss * grad_out).sum(), [xr])
    return loss.detach(), grad


def naive_of(x, y, lam, reduction, grad_out):
    go = grad_out.tolist()
    loss, gx = ranksim_naive(x.double().tolist(), y.double().tolist(), lam, reduction, go)
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(gx, dtype=torch.float64).reshape(x.shape)


def assert_close(a, b, dtype, scale=None):
    tol = TOL[dtype]
    if scale is None:
        torch.testing.assert_close(a.double(), b.double(), **tol)
    else:   # relative to the largest entry (a gradient with 1/eps rows)
        err = (a.double() - b.double()).abs().max()
        assert err <= tol["rtol"] * scale + tol["atol"], (err, scale)


# --------------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------------


def test_naive_rank_by_hand():
    # descending; equal values: the later index first
    assert naive_rank([0.1, 0.5, 0.5, -1.0]) == [3 / 4, 2 / 4, 1 / 4, 4 / 4]


def test_stable_rank_matches_published_stable_rule():
    from imbreg_fast.ops.ranksim import rank_normalised
    g = torch.Generator().manual_seed(3)
    v = torch.randint(0, 4, (6, 11), generator=g).double()     # many ties
    ours = rank_normalised(v, torch.float64)
    published = pub._published_rank_normalised(v, stable=True)
    assert torch.equal(ours, published)
    assert torch.equal(ours, torch.tensor([naive_rank(r) for r in v.tolist()], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("int_labels", [True, False], ids=["ties", "distinct"])
def test_vs_naive(backend, reduction, dtype, int_labels):
    m, d, lam = 21, 5, 2.0
    # fp32: no zero row (its perturbed row S_i + lam G_i = lam G_i has exact ties whose outcome depends on
    # fp32 rounding, which the float64 loops do not reproduce)
    x, y = make_batch(m, d, dtype, int_labels=int_labels, zero_row=dtype == torch.float64)
    go = grad_out_for(reduction, m, dtype)
    loss, grad = run(x, y, reduction, backend, go, interpolation_lambda=lam)
    ref_loss, ref_grad = naive_of(x, y, lam, reduction, go)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(grad, ref_grad, dtype, scale=ref_grad.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.3, 2.0, 50.0])
@pytest.mark.parametrize("grad_scale", [1.0, 100.0])
def test_lambda_and_incoming_gradient(backend, lam, grad_scale):
    m, d = 17, 7
    x, y = make_batch(m, d, torch.float64, zero_row=False, seed=5)
    go = torch.tensor(grad_scale, dtype=torch.float64)
    loss, grad = run(x, y, "sum", backend, go, interpolation_lambda=lam)
    ref_loss, ref_grad = naive_of(x, y, lam, "sum", go)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64, scale=ref_grad.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_not_linear_in_incoming_gradient(backend):
    """The documented property: gamma * loss does not give gamma * grad(loss)."""
    x, y = make_batch(24, 6, torch.float64, zero_row=False, seed=2)
    _, g1 = run(x, y, "sum", backend, torch.tensor(1.0, dtype=torch.float64))
    _, g100 = run(x, y, "sum", backend, torch.tensor(100.0, dtype=torch.float64))
    assert not torch.allclose(g100, 100 * g1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("int_labels", [True, False], ids=["ages", "continuous"])
def test_vs_published(backend, dtype, int_labels):
    """The published regulariser (stable rule) with its subsample, times gamma = 100, as its training code."""
    n, d = 48, 16
    x, y = make_batch(n, d, dtype, int_labels=int_labels, zero_row=False, seed=11)
    y = y.reshape(n, 1)
    indices = pub.published_unique_label_indices(y, random.Random(0))
    index = None if indices is None else torch.tensor(indices)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ours = N.RankSimLoss(gamma=100.0, interpolation_lambda=2.0, backend=backend)
    la = 100.0 * F.ranksim_loss(a, y, subsample=index, backend=backend) if index is not None else ours(a, y)
    lb = 100 * pub.ranksim_loss_published(b, y, 2.0, indices=indices, eps=0.0)
    la.backward()
    lb.backward()
    assert_close(la.detach(), lb.detach(), dtype)
    assert_close(a.grad, b.grad, dtype, scale=b.grad.abs().max())


def test_published_eps_is_the_only_gradient_difference():
    x, y = make_batch(20, 4, torch.float64, zero_row=False, int_labels=False, seed=4)
    y = y.reshape(-1, 1)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    F.ranksim_loss(a, y, backend="torch").backward()
    pub.ranksim_loss_published(b, y, 2.0).backward()              # divides by lambda + 1e-8
    torch.testing.assert_close(a.grad * (2.0 / (2.0 + 1e-8)), b.grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_vs_torch_larger(backend, reduction):
    from conftest import interpreted
    m = 40 if interpreted(backend) else 150
    x, y = make_batch(m, 33, torch.float64, seed=9)
    go = grad_out_for(reduction, m, torch.float64, scale=30.0)
    loss, grad = run(x, y, reduction, backend, go)
    ref_loss, ref_grad = run(x, y, reduction, "torch", go)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64, scale=ref_grad.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_sizes(backend):
    for m in (0, 1, 2):
        x = torch.randn(m, 3, dtype=torch.float64, requires_grad=True)
        y = torch.arange(m, dtype=torch.float64)
        for reduction in REDUCTIONS:
            loss = F.ranksim_loss(x, y, reduction=reduction, backend=backend)
            assert loss.shape == ((m,) if reduction == "none" else ())
            (g,) = torch.autograd.grad(loss.sum(), [x], allow_unused=False) if m else (torch.zeros(0, 3),)
            assert g.shape == (m, 3) and torch.isfinite(g).all()
            if m == 1:
                assert float(loss.sum()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_non_contiguous_expanded(backend):
    """[n, ...] features flattened per sample, a transposed (non-contiguous) view, [n, 1] expanded targets."""
    x4, y = make_batch(12, 12, torch.float64, seed=6)
    x3 = x4.reshape(12, 3, 4)
    base = run(x4, y, "sum", "torch", torch.tensor(2.0, dtype=torch.float64))
    xt = x4.t().contiguous().t()                                    # same values, column-major
    assert not xt.is_contiguous()
    y_exp = y.reshape(12, 1, 1).expand(12, 1, 1)[:, :, 0]            # [n, 1] through an expanded view
    for xi in (x3, xt):
        loss, grad = run(xi, y_exp, "sum", backend, torch.tensor(2.0, dtype=torch.float64))
        assert_close(loss, base[0], torch.float64)
        assert_close(grad.reshape(12, 12), base[1], torch.float64, scale=base[1].abs().max())
    yc = torch.full((1,), 3.0, dtype=torch.float64).expand(12)      # all labels equal (expanded, stride 0)
    loss, _ = run(x4, yc, "sum", backend, torch.tensor(1.0, dtype=torch.float64))
    ref, _ = naive_of(x4, yc, 2.0, "sum", torch.tensor(1.0))
    assert_close(loss, ref, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(backend, dtype):
    """Half inputs are computed in fp32: the same as the fp32 computation on the rounded inputs."""
    x, y = make_batch(20, 8, torch.float32, zero_row=False, seed=8)
    xh = x.to(dtype)
    loss, grad = run(xh, y, "sum", backend, torch.tensor(1.0, dtype=dtype))
    ref_loss, ref_grad = run(xh.float(), y, "sum", "torch", torch.tensor(1.0))
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.float(), ref_loss.to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_labels_and_label_dtype(backend):
    x, y = make_batch(15, 4, torch.float64, seed=12)
    a = run(x, y.long(), "sum", backend, torch.tensor(1.0, dtype=torch.float64))
    b = run(x, y, "sum", backend, torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# Subsample
# --------------------------------------------------------------------------------------------------


def test_unique_label_subsample_rule():
    y = torch.tensor([5.0, 3.0, 5.0, 1.0, 3.0, 3.0, 9.0])
    for seed in range(20):
        idx = F.unique_label_subsample(y, torch.Generator().manual_seed(seed))
        assert y[idx].tolist() == [1.0, 3.0, 5.0, 9.0]              # one per label, ascending
    picks = {int(F.unique_label_subsample(y, torch.Generator().manual_seed(s))[1]) for s in range(60)}
    assert picks == {1, 4, 5}                                       # every member of label 3 is drawn
    assert F.unique_label_subsample(torch.tensor([2.0, 1.0, 3.0])) is None   # all distinct: batch as is


@pytest.mark.parametrize("backend", BACKENDS)
def test_subsample_generator_reproducible_and_index(backend):
    x, y = make_batch(30, 5, torch.float64, seed=13)
    l1 = F.ranksim_loss(x, y, generator=torch.Generator().manual_seed(7), backend=backend)
    l2 = F.ranksim_loss(x, y, generator=torch.Generator().manual_seed(7), backend=backend)
    assert torch.equal(l1, l2)
    idx = F.unique_label_subsample(y, torch.Generator().manual_seed(7))
    l3 = F.ranksim_loss(x, y, subsample=idx, backend=backend)
    assert torch.equal(l1, l3)
    ref, _ = naive_of(x[idx], y[idx], 2.0, "sum", torch.tensor(1.0))
    assert_close(l3, ref, torch.float64)
    # the gradient reaches only the kept rows
    xr = x.clone().requires_grad_(True)
    F.ranksim_loss(xr, y, subsample=idx, backend=backend).backward()
    dropped = torch.ones(30, dtype=torch.bool)
    dropped[idx] = False
    assert torch.all(xr.grad[dropped] == 0) and xr.grad[idx].abs().sum() > 0


def test_unique_label_layout():
    """The kept rows first (ascending labels), then the others; the count on the device; the same draw as
    unique_label_subsample; all labels distinct: the batch as is."""
    y = torch.tensor([5.0, 3.0, 5.0, 1.0, 3.0, 3.0, 9.0])
    for seed in range(10):
        index, count = F.unique_label_layout(y, torch.Generator().manual_seed(seed))
        assert count.dtype == torch.int64 and count.shape == () and int(count) == 4
        assert sorted(index.tolist()) == list(range(7))                 # a permutation of the rows
        assert y[index[:4]].tolist() == [1.0, 3.0, 5.0, 9.0]
        assert torch.equal(index[:4], F.unique_label_subsample(y, torch.Generator().manual_seed(seed)))
    index, count = F.unique_label_layout(torch.tensor([2.0, 1.0, 3.0]))
    assert index.tolist() == [0, 1, 2] and int(count) == 3
    index, count = F.unique_label_layout(torch.zeros(0))
    assert index.numel() == 0 and int(count) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_default_subsample_vs_naive_on_the_kept_rows(backend, reduction):
    """The default subsample keeps every row in place (the kept ones first, a count on the device): loss and
    gradient equal the naive loops on the kept rows alone, the explicit-index path, and zero gradient on the
    rows not kept."""
    x, y = make_batch(23, 5, torch.float64, seed=21)          # labels repeat (ties), a zero row
    idx = F.unique_label_subsample(y, torch.Generator().manual_seed(3))
    m = idx.numel()
    assert 1 < m < 23
    grad_out = grad_out_for(reduction, m, torch.float64)
    xr = x.clone().requires_grad_(True)
    loss = F.ranksim_loss(xr, y, generator=torch.Generator().manual_seed(3), reduction=reduction, backend=backend)
    (grad,) = torch.autograd.grad((loss * grad_out).sum(), [xr])
    ref_loss, ref_grad = naive_of(x[idx], y[idx], 2.0, reduction, grad_out)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad[idx], ref_grad, torch.float64, scale=ref_grad.abs().max())
    dropped = torch.ones(23, dtype=torch.bool)
    dropped[idx] = False
    assert torch.all(grad[dropped] == 0)
    xi = x.clone().requires_grad_(True)
    loss_i = F.ranksim_loss(xi, y, subsample=idx, reduction=reduction, backend=backend)
    (grad_i,) = torch.autograd.grad((loss_i * grad_out).sum(), [xi])
    assert_close(loss, loss_i, torch.float64)
    assert_close(grad, grad_i, torch.float64, scale=grad_i.abs().max())


def _fused_ops(backend):
    prefix = "triton_" if backend == "triton" else ""
    return (getattr(torch.ops.imbreg_fast, f"{prefix}ranksim_fwd"), getattr(torch.ops.imbreg_fast, f"{prefix}ranksim_bwd"))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_fused_count_keeps_the_first_rows(backend, reduction):
    """The ops with count c: the kept c x c block equals the ops on the first c rows alone (bit for bit),
    every other entry of S / ranks / row losses and the gradient rows not kept are 0."""
    fwd, bwd = _fused_ops(backend)
    x, y = make_batch(13, 4, torch.float64, seed=24)
    c = 8
    loss, z, n, s, rf, ry = fwd(x, y, torch.tensor(c), 2.0, reduction, True)
    loss_c, _, _, s_c, rf_c, ry_c = fwd(x[:c].contiguous(), y[:c].contiguous(), None, 2.0, reduction, True)
    assert torch.equal(loss[:c] if reduction == 0 else loss, loss_c)
    for full, part in ((s, s_c), (rf, rf_c), (ry, ry_c)):
        assert torch.equal(full[:c, :c], part)
        assert torch.all(full[c:] == 0) and torch.all(full[:, c:] == 0)
    if reduction == 0:
        assert torch.all(loss[c:] == 0)
    g = torch.linspace(0.5, 2.0, 13, dtype=torch.float64) if reduction == 0 else torch.tensor(1.3, dtype=torch.float64)
    gx = bwd(g, z, n, s, rf, ry, torch.tensor(c), 2.0, reduction)
    gx_c = bwd(g[:c] if reduction == 0 else g, z[:c].contiguous(), n[:c].contiguous(), s_c, rf_c, ry_c, None, 2.0,
               reduction)
    assert torch.equal(gx[:c], gx_c) and torch.all(gx[c:] == 0)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_count_bad_values(backend):
    fwd, _ = _fused_ops(backend)
    x, y = make_batch(6, 3, torch.float32, seed=25)
    for bad, clamped in ((torch.tensor(7), 6), (torch.tensor(-1), 0)):
        if backend == "triton":   # read on the device, no host check: clamped to [0, m] in the kernels
            assert torch.equal(fwd(x, y, bad, 2.0, 0, False)[0], fwd(x, y, torch.tensor(clamped), 2.0, 0, False)[0])
        else:
            with pytest.raises(RuntimeError, match="count must be in"):
                fwd(x, y, bad, 2.0, 2, False)
    with pytest.raises((RuntimeError, TypeError), match="count must be a one-element int64"):
        fwd(x, y, torch.tensor(3.0), 2.0, 2, False)


class _NoHostRead(torch.overrides.TorchFunctionMode):
    """Fails on any Python-level read of a tensor's value (what synchronises with a GPU)."""
    READS = {torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read: {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_subsample_reads_nothing_on_the_host(backend):
    """The default path (one sample per distinct label) forward and backward with 'sum' and 'mean' reads no
    tensor value in Python (on a GPU: no host sync); 'none' returns the kept rows only and reads their
    number (documented), which the detector sees — so it would see a read on the other paths too."""
    x, y = make_batch(19, 4, torch.float32, seed=22)
    for reduction in ("sum", "mean"):
        xr = x.clone().requires_grad_(True)
        with _NoHostRead():
            loss = F.ranksim_loss(xr, y, reduction=reduction, backend=backend, check_finite=False)
            loss.backward()
        assert xr.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="host read"), _NoHostRead():
        F.ranksim_loss(x, y, reduction="none", backend=backend, check_finite=False)


# --------------------------------------------------------------------------------------------------
# Module, second order, compile, determinism, opcheck
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_gamma(backend):
    x, y = make_batch(16, 5, torch.float64, int_labels=False, seed=14)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    module = N.RankSimLoss(gamma=100.0, backend=backend)
    la = module(a, y)
    lb = 100.0 * F.ranksim_loss(b, y, backend=backend)
    la.backward()
    lb.backward()
    assert torch.equal(la.detach(), lb.detach()) and torch.equal(a.grad, b.grad)
    assert "gamma=100.0" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_raises(backend):
    x, y = make_batch(10, 3, torch.float64, seed=15)
    x.requires_grad_(True)
    loss = F.ranksim_loss(x, y, backend=backend)
    (g,) = torch.autograd.grad(loss, [x], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    from conftest import interpreted
    x, y = make_batch(14, 6, torch.float32, seed=16)
    idx = torch.arange(0, 14, 2)

    def step(xx, yy):
        return F.ranksim_loss(xx, yy, subsample=idx, backend=backend, check_finite=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if interpreted(backend) else "inductor")
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    la, lb = compiled(a, y), step(b, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_default_subsample(backend):
    """The default subsample compiles into one graph (no data-dependent size, no host read); the draw of
    the compiled step equals eager's under the same seed (inductor's fallback_random)."""
    from conftest import interpreted
    import torch._inductor.config as inductor_config
    x, y = make_batch(14, 6, torch.float32, seed=23)

    def step(xx, yy):
        return F.ranksim_loss(xx, yy, reduction="mean", backend=backend, check_finite=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if interpreted(backend) else "inductor")
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    with inductor_config.patch(fallback_random=True):
        la = compiled(a, y)
    torch.manual_seed(5)
    lb = step(b, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.requires_cpp
def test_cpp_bit_identical_across_threads():
    if "cpp" not in [p.values[0] for p in FUSED]:
        pytest.skip("cpp backend not available")
    x, y = make_batch(203, 19, torch.float32, seed=17)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(run(x, y, "sum", "cpp", torch.tensor(100.0)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.requires_cpp
def test_opcheck_cpp():
    if "cpp" not in [p.values[0] for p in FUSED]:
        pytest.skip("cpp backend not available")
    x, y = make_batch(9, 4, torch.float64, seed=18)
    fwd = torch.ops.imbreg_fast.ranksim_fwd
    for reduction in (0, 1, 2):
        for count in (None, torch.tensor(6)):
            torch.library.opcheck(fwd.default, (x.clone().requires_grad_(True), y, count, 2.0, reduction, True),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        for count in (None, torch.tensor(6)):
            _, z, n, s, rf, ry = fwd(x, y, count, 2.0, reduction, True)
            g = torch.rand(9 if reduction == 0 else (), dtype=torch.float64)
            torch.library.opcheck(torch.ops.imbreg_fast.ranksim_bwd.default,
                                  (g, z, n, s, rf, ry, count, 2.0, reduction))
    # without compute_grad: five distinct empty tensors (outputs may not alias)
    torch.library.opcheck(fwd.default, (x, y, None, 2.0, 2, False), test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x, y = make_batch(8, 3, torch.float32, seed=19)
    call = lambda xx, yy, **kw: F.ranksim_loss(xx, yy, backend=backend, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="features"):
        call(x.long(), y)
    with pytest.raises(TypeError, match="features"):
        call(x.numpy(), y)
    with pytest.raises(TypeError, match="targets"):
        call(x, y > 0)
    with pytest.raises(ValueError, match="targets"):
        call(x, y[:5])
    with pytest.raises(ValueError, match="targets"):
        call(x, torch.stack([y, y], 1))
    with pytest.raises(ValueError, match="features"):
        call(x[:, 0], y)
    with pytest.raises(ValueError, match="interpolation_lambda"):
        call(x, y, interpolation_lambda=0.0)
    with pytest.raises(ValueError, match="reduction"):
        call(x, y, reduction="avg")
    with pytest.raises(ValueError, match="subsample"):
        call(x, y, subsample="random")
    with pytest.raises(TypeError, match="subsample"):
        call(x, y, subsample=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="subsample"):
        call(x, y, subsample=torch.tensor([0, 8]))
    with pytest.raises(TypeError, match="generator"):
        call(x, y, generator=3)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        call(bad, y)
    bad_y = y.clone()
    bad_y[3] = float("inf")
    with pytest.raises(ValueError, match="targets contains NaN"):
        call(x, bad_y)
    # unchecked NaN: a value, never a crash
    out = call(bad, y, check_finite=False, subsample=None)
    assert out.shape == ()
    with pytest.raises(ValueError, match="gamma"):
        N.RankSimLoss(gamma=float("nan"))


@pytest.mark.requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_ranks_two_index_bytes_nan_signed_zero(dtype):
    """m = 300 > 256 (two index bytes in the radix keys); NaN, +-0 and repeated values in S and the labels:
    the C++ ranks equal the torch backend's sort-based ranks (the stable rule) exactly."""
    if "cpp" not in [p.values[0] for p in FUSED]:
        pytest.skip("cpp backend not available")
    from imbreg_fast.ops.ranksim import label_keys, rank_normalised
    m = 300
    x, y = make_batch(m, 6, dtype, seed=20)
    x[7] = -0.0                                      # S entries +-0
    x[11] = x[12]                                    # repeated rows: repeated S values
    x[40, 2] = float("nan")                          # unchecked NaN row and column
    y[::3] = -y[::3]
    _, z, n, s, rf, ry = torch.ops.imbreg_fast.ranksim_fwd(x, y, None, 2.0, 2, True)
    assert torch.equal(rf, rank_normalised(s, dtype))
    assert torch.equal(ry, rank_normalised(label_keys(y), dtype))
