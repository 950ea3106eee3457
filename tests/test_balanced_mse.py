"""Balanced MSE family (BMC, GAI, BNI; docs/methods.md §1) on every backend.

Two oracles: the plain-loop reference of tests/naive_reference.py (small problems: it is slow), and the
torch backend run in float64 on the same input values (every size). Every comparison covers the loss and
the gradients w.r.t. pred and a learnable sigma (noise_var = sigma ** 2), with an upstream gradient != 1.

Tolerances are declared once per dtype in ``TOLS``: ``|actual - expected| <= atol * scale + rtol * |expected|``
where ``scale`` is the magnitude of the terms the compared value is made of (see ``error_scales``: a BMC
row loss is a small difference of logits of size |pred - y_j|^2 / (2 sigma^2), a sigma gradient a sum of
mixed signs), so fp32 results are held to a few ulps of what they are computed from.

Backends: 'torch' and every fused backend that can run here (conftest.backend_params: 'cpp' when built,
'triton' under TRITON_INTERPRET=1 or CUDA, where problems are kept small).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch

import imbreg_fast.functional as F
from conftest import backend_params, interpreted, op_kernel_registered
from imbreg_fast import nn as inn
from imbreg_fast.ops.balanced_mse import bni_tables, gai_tables
from naive_reference import NaiveResult, bmc_naive, bni_naive, gai_naive


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float  # times the error scale of the compared quantity


TOLS = {torch.float32: Tol(rtol=1e-5, atol=1e-6), torch.float64: Tol(rtol=1e-10, atol=1e-10)}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
REDUCTIONS = ("mean", "sum", "none")
SCALAR_GRAD_OUTPUT = 0.37

PUBLIC_OP = {"bmc": "bmc_loss", "gai": "gai_loss", "bni": "bni_loss"}
CPP_OPS = {"bmc": ("imbreg_fast::bmc_fwd",), "gai": ("imbreg_fast::mixture_nll_fwd",),
           "bni": ("imbreg_fast::mixture_nll_fwd",)}


def op_backend_params(ops=("bmc", "gai", "bni"), include_torch=True):
    """(op, backend) params: every op of the family on every backend that can run it here."""
    out = []
    for op in ops:
        for p in backend_params(PUBLIC_OP[op], CPP_OPS[op], include_torch=include_torch):
            out.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}"))
    return out


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    pred: torch.Tensor          # as passed to the loss (possibly a non-contiguous view of a leaf)
    target: torch.Tensor
    sigma: torch.Tensor         # leaf, requires grad; noise_var = sigma * sigma
    mask: torch.Tensor | None
    prior: dict = field(default_factory=dict)  # candidates | (weights, means, covariances) | (centers, weights)
    cache: dict = field(default_factory=dict)  # per-row oracle terms, computed once per case

    @property
    def dtype(self):
        return self.pred.dtype

    @property
    def rows(self):
        """(N, d) of the flattened rows."""
        return (self.pred.shape[0], self.pred.shape[1]) if self.pred.dim() == 2 else (self.pred.numel(), 1)

    def noise_var(self):
        return self.sigma * self.sigma


def _placed(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` that is contiguous, or a non-contiguous view of a larger buffer."""
    if layout == "contiguous":
        return values.clone()
    assert layout == "strided"
    if values.dim() == 1:                         # [N] -> every other element
        buf = torch.zeros(2 * values.shape[0], dtype=values.dtype)
        buf[::2] = values
        return buf[::2]
    if values.dim() == 2:                         # [N, d] -> transposed view of a strided [d, 2N] buffer
        n, d = values.shape
        buf = torch.zeros(d, 2 * n, dtype=values.dtype)
        buf[:, ::2] = values.t()
        return buf[:, ::2].t()
    b, _, h, w = values.shape                     # [B, 1, H, W] -> channel 1 of [B, 3, H, W + 1]
    buf = torch.zeros(b, 3, h, w + 1, dtype=values.dtype)
    buf[:, 1:2, :, :w] = values
    return buf[:, 1:2, :, :w]


def _leaf_view(values: torch.Tensor, layout: str) -> torch.Tensor:
    """Differentiable input equal to ``values``: a leaf (contiguous) or a non-contiguous view of one."""
    if layout == "contiguous":
        return values.clone().requires_grad_()
    view = _placed(values, layout)
    base = view._base.detach().requires_grad_()
    return base.as_strided(view.shape, view.stride(), view.storage_offset())


def make_prior(op, d, dtype, *, k=5, m=None, vector=False):
    if op == "bmc":
        if m is None:
            return {"candidates": None}
        cands = torch.randn(m, d, dtype=torch.float64)
        return {"candidates": (cands.reshape(m) if vector else cands).to(dtype)}
    phi = torch.rand(k, dtype=torch.float64) + 0.2
    phi = (phi / phi.sum()).to(dtype)
    if op == "gai":
        means = 1.2 * torch.randn(k, d, dtype=torch.float64)
        a = torch.randn(k, d, d, dtype=torch.float64)
        cov = a @ a.mT / d + 0.2 * torch.eye(d, dtype=torch.float64)
        return {"gmm": (phi, means.to(dtype), cov.to(dtype))}
    if d == 1:
        centers = torch.linspace(-2.5, 2.5, k, dtype=torch.float64).reshape(k, 1)
    else:
        centers = 1.5 * torch.randn(k, d, dtype=torch.float64)
    centers = centers.reshape(k) if vector else centers
    return {"bin_centers": centers.to(dtype), "bin_weights": phi}


def make_case(op, n, d, dtype, *, shape="rows", masked=False, layout="contiguous", sigma=0.8, k=5, m=None,
              dense=None, keep=0.7, offset=0.0) -> Case:
    """Random case. shape: 'vec' ([N], d = 1), 'rows' ([N, d]) or 'dense' ([B, 1, H, W], dense=(B, H, W))."""
    if shape == "vec":
        assert d == 1
        row_shape = (n,)
    elif shape == "rows":
        row_shape = (n, d)
    else:
        b, h, w = dense
        n, d, row_shape = b * h * w, 1, (b, 1, h, w)
    target = torch.randn(row_shape, dtype=torch.float64)
    pred = target + 0.6 * torch.randn(row_shape, dtype=torch.float64) + offset
    mask = None
    if masked:
        mshape = row_shape if shape != "rows" else (n,)
        mask = _placed(torch.rand(mshape) < keep, layout)
    return Case(op=op, pred=_leaf_view(pred.to(dtype), layout), target=_placed(target.to(dtype), layout),
                sigma=torch.tensor(sigma, dtype=dtype, requires_grad=True), mask=mask,
                prior=make_prior(op, d, dtype, k=k, m=m, vector=shape == "vec"))


def call_loss(op, pred, target, noise_var, prior, mask, reduction, backend, **kw):
    if op == "bmc":
        return F.bmc_loss(pred, target, noise_var, candidates=prior["candidates"], mask=mask, reduction=reduction,
                          backend=backend, **kw)
    if op == "gai":
        return F.gai_loss(pred, target, noise_var, prior["gmm"], mask=mask, reduction=reduction, backend=backend, **kw)
    return F.bni_loss(pred, target, noise_var, prior["bin_centers"], prior["bin_weights"], mask=mask,
                      reduction=reduction, backend=backend, **kw)


def make_grad_output(case: Case, reduction: str, loss_shape) -> torch.Tensor:
    if reduction == "none":
        return torch.empty(loss_shape, dtype=case.dtype).uniform_(-1.5, 1.5)
    return torch.tensor(SCALAR_GRAD_OUTPUT, dtype=case.dtype)


def run(case: Case, backend: str, reduction: str, grad_output=None, **kw):
    """(loss, d/dpred, d/dsigma) of sum(grad_output * loss) on ``backend``; grad_output made if None."""
    loss = call_loss(case.op, case.pred, case.target, case.noise_var(), case.prior, case.mask, reduction, backend, **kw)
    if grad_output is None:
        grad_output = make_grad_output(case, reduction, loss.shape)
    grad_pred, grad_sigma = torch.autograd.grad(loss, (case.pred, case.sigma), grad_outputs=grad_output)
    return loss.detach(), grad_pred, grad_sigma, grad_output


# ----------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------


def naive_expected(case: Case, reduction: str, grad_output: torch.Tensor) -> NaiveResult:
    s2 = case.noise_var().detach()   # exactly the value the backends see
    g = grad_output.detach().double().reshape(-1).tolist() if reduction == "none" else float(grad_output)
    kw = dict(mask=case.mask, reduction=reduction, grad_output=g)
    if case.op == "bmc":
        return bmc_naive(case.pred, case.target, s2, candidates=case.prior["candidates"], **kw)
    if case.op == "gai":
        return gai_naive(case.pred, case.target, s2, *case.prior["gmm"], **kw)
    return bni_naive(case.pred, case.target, s2, case.prior["bin_centers"], case.prior["bin_weights"], **kw)


def _flat_rows(case: Case):
    n, d = case.rows
    p = case.pred.detach().double().reshape(n, d)
    t = case.target.detach().double().reshape(n, d)
    kept = torch.ones(n, dtype=torch.bool) if case.mask is None else case.mask.reshape(n)
    return p, t, kept


def _row_weights(case: Case, reduction: str, grad_output: torch.Tensor) -> torch.Tensor:
    """w_i such that d sum(g * loss) = sum_i w_i dL_i (0 on dropped rows)."""
    n, _ = case.rows
    _, _, kept = _flat_rows(case)
    if reduction == "none":
        w = grad_output.detach().double().reshape(n)
    else:
        count = int(kept.sum())
        unit = (1.0 / count if count else 0.0) if reduction == "mean" else 1.0
        w = torch.full((n,), unit * float(grad_output), dtype=torch.float64)
    return torch.where(kept, w, torch.zeros_like(w))


def torch64_expected(case: Case, reduction: str, grad_output: torch.Tensor) -> NaiveResult:
    """The torch backend in float64 on the same input values, as per-row terms reduced here.

    Row i's loss depends on pred_i only (for all three losses), so d L_i / d pred_i comes from one backward
    of sum_i L_i, and the per-row d L_i / d sigma^2 from one forward-mode product.
    """
    def up(x):
        return None if x is None else x.detach().double()

    n, d = case.rows
    if "rows64" not in case.cache:
        p, t, s2 = up(case.pred), up(case.target), up(case.noise_var())
        prior = {key: (tuple(up(x) for x in val) if isinstance(val, tuple) else up(val))
                 for key, val in case.prior.items()}

        def rows_loss(pv, vv):
            return call_loss(case.op, pv, t, vv, prior, case.mask, "none", "torch", check_finite=False).reshape(n)

        p_req = p.clone().requires_grad_()
        losses = rows_loss(p_req, s2)
        (dl_dp,) = torch.autograd.grad(losses.sum(), p_req)
        _, dl_ds2 = torch.func.jvp(lambda vv: rows_loss(p, vv), (s2,), (torch.ones_like(s2),))
        case.cache["rows64"] = (losses.detach(), dl_dp.reshape(n, d), dl_ds2)
    losses, dl_dp, dl_ds2 = case.cache["rows64"]
    w = _row_weights(case, reduction, grad_output)
    if reduction == "none":
        loss = losses.tolist()
    else:
        count = int(_flat_rows(case)[2].sum())
        loss = float(losses.sum()) / (count if reduction == "mean" and count else 1)
    return NaiveResult(loss=loss, grad_pred=(w.unsqueeze(1) * dl_dp).tolist(), grad_var=float((w * dl_ds2).sum()))


@dataclass
class Scales:
    loss: float
    grad_pred: float
    grad_var: float


def error_scales(case: Case, reduction: str, grad_output: torch.Tensor) -> Scales:
    """Magnitude of the terms each compared value is made of (fp64, vectorised).

    A result can be a small difference of large terms (BMC: -l_ii + LSE_j l_ij; sigma^2 gradients: sums of
    mixed signs), so a floating-point result is accurate to a few ulps of these magnitudes, not of itself.
    Per row: T (loss terms), GP (pred-gradient terms), GS (sigma^2-gradient terms), then weighted like the
    reduction: sum for reduced values, max for per-row ones.
    """
    _, _, kept = _flat_rows(case)
    if not bool(kept.any()):
        return Scales(0.0, 0.0, 0.0)
    if "scale_rows" not in case.cache:
        case.cache["scale_rows"] = _scale_rows(case)
    T, GP, GS = case.cache["scale_rows"]
    w = _row_weights(case, reduction, grad_output)[kept].abs()
    if reduction == "none":
        loss = float(T.max())
    else:
        loss = float((T * w).sum() / abs(float(grad_output)))
    return Scales(loss=loss, grad_pred=float((w * GP).max()), grad_var=float((w * GS).sum()))


def _scale_rows(case: Case):
    """(T, GP, GS) [n_kept] of error_scales."""
    p, t, kept = _flat_rows(case)
    n, d = case.rows
    s2 = float(case.noise_var().detach())
    p, t = p[kept], t[kept]
    e = (p - t).pow(2).sum(-1)                                                 # [n]
    if case.op == "bmc":
        cands = case.prior["candidates"]
        dist = torch.cdist(p, t).pow(2) if cands is None else torch.cat(
            [e.unsqueeze(1), torch.cdist(p, cands.detach().double().reshape(-1, d)).pow(2)], dim=1)
        big = dist.max(1).values
        T, GP, GS = big, 2 * big.sqrt(), big / s2
    elif case.op == "bni":
        centers = case.prior["bin_centers"].detach().double().reshape(-1, d)
        logw = case.prior["bin_weights"].detach().double().log().abs()
        dist = torch.cdist(p, centers).pow(2)
        T = e + (2 * s2 * logw + dist).max(1).values
        GP = 2 * e.sqrt() + 2 * dist.max(1).values.sqrt()
        GS = (e + dist.max(1).values) / s2
    else:
        w_, mu, cov = (x.detach().double() for x in case.prior["gmm"])
        k = w_.shape[0]
        cov = cov.reshape(k, d, d) + s2 * torch.eye(d, dtype=torch.float64)
        prec = torch.linalg.inv(cov)
        delta = p.unsqueeze(1) - mu.reshape(1, k, d)                            # [n, K, d]
        alpha = torch.einsum("kij,nkj->nki", prec, delta)
        maha = (delta * alpha).sum(-1)
        consts = w_.log().abs() + 0.5 * torch.logdet(cov).abs() + 0.5 * d * math.log(2 * math.pi)
        T = e + s2 * d * (abs(math.log(s2)) + math.log(2 * math.pi)) + 2 * s2 * (consts + 0.5 * maha).max(1).values
        GP = 2 * e.sqrt() + 2 * s2 * alpha.norm(dim=-1).max(1).values
        trace = torch.diagonal(prec, dim1=-2, dim2=-1).sum(-1)
        GS = e / s2 + d + s2 * (alpha.pow(2).sum(-1) + trace).max(1).values
    return T, GP, GS


def assert_close(name, actual, expected, scale, tol: Tol):
    actual = torch.as_tensor(actual).detach().double().reshape(-1)
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(-1)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = tol.atol * scale + tol.rtol * expected.abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} values off; first at {i}: actual "
                             f"{actual[i].item():.12g} expected {expected[i].item():.12g} (err {err[i].item():.3g}, "
                             f"bound {bound[i].item():.3g}, scale {scale:.3g})")


def check_result(case: Case, out, ref: NaiveResult, reduction: str, tol: Tol | None = None, oracle: str = ""):
    loss, grad_pred, grad_sigma, grad_output = out
    tol = tol or TOLS[case.dtype]
    scales = error_scales(case, reduction, grad_output)
    where = f"[{reduction}{', vs ' + oracle if oracle else ''}] "
    n, d = case.rows
    assert loss.dtype == case.dtype, f"{where}loss dtype {loss.dtype} != input dtype {case.dtype}"
    if reduction == "none":
        expected_shape = tuple(case.pred.shape) if case.pred.dim() != 2 else (n,)
        assert tuple(loss.shape) == expected_shape, f"{where}'none' loss shape {tuple(loss.shape)} != {expected_shape}"
    else:
        assert loss.dim() == 0
    assert grad_pred.shape == case.pred.shape and grad_pred.dtype == case.dtype
    sigma = float(case.sigma)
    assert_close(where + "loss", loss, ref.loss, scales.loss, tol)
    assert_close(where + "grad pred", grad_pred.reshape(n, d), ref.grad_pred, scales.grad_pred, tol)
    # d/dsigma = d/dsigma^2 * 2 sigma
    assert_close(where + "grad sigma", grad_sigma, ref.grad_var * 2 * sigma, scales.grad_var * 2 * abs(sigma), tol)


def check_backend(case: Case, backend: str, *, naive: bool, reductions=REDUCTIONS, tol: Tol | None = None):
    """Run ``backend`` on ``case`` for each reduction (random upstream gradients) and compare with the fp64
    torch backend, and with the naive reference when ``naive``."""
    for reduction in reductions:
        out = run(case, backend, reduction)
        if naive:
            check_result(case, out, naive_expected(case, reduction, out[3]), reduction, tol, "naive")
        check_result(case, out, torch64_expected(case, reduction, out[3]), reduction, tol, "torch fp64")


# ----------------------------------------------------------------------------------------------------
# The oracle itself: its analytic gradients against central differences of its own loss (fp64).
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["bmc", "bmc_candidates", "gai", "bni"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_naive_reference_gradients_match_finite_differences(op, d):
    base = "bmc" if op.startswith("bmc") else op
    case = make_case(base, 5, d, torch.float64, masked=True, keep=0.8, m=4 if op == "bmc_candidates" else None)
    case.mask[0] = True
    g = [0.3, -1.2, 0.7, 2.0, -0.4]

    def naive(p, s2):
        return naive_expected(Case(base, p, case.target, torch.tensor(math.sqrt(s2), dtype=torch.float64),
                                   case.mask, case.prior), "none", torch.tensor(g))

    p0, s20 = case.pred.detach().double(), float(case.noise_var().detach())
    ref = naive(p0, s20)

    def weighted(res):
        return sum(gi * li for gi, li in zip(g, res.loss))

    h = 1e-6
    for i in range(5):
        for c in range(d):
            dp = torch.zeros_like(p0)
            dp[i, c] = h
            fd = (weighted(naive(p0 + dp, s20)) - weighted(naive(p0 - dp, s20))) / (2 * h)
            assert abs(fd - ref.grad_pred[i][c]) <= 1e-6 * (1 + abs(fd)), (i, c, fd, ref.grad_pred[i][c])
    # sigma^2 derivative of the loss with the sg(2 sigma^2) factor held fixed: L / (2 s2) differentiated,
    # then times 2 s2 (the factor is a constant for autograd).
    def nll(s2):
        res = naive(p0, s2)
        return sum(gi * li for gi, li in zip(g, res.loss)) / (2 * s2)

    fd = (nll(s20 + h) - nll(s20 - h)) / (2 * h) * 2 * s20
    assert abs(fd - ref.grad_var) <= 1e-6 * (1 + abs(fd)), (fd, ref.grad_var)


# ----------------------------------------------------------------------------------------------------
# Every backend vs the naive reference (small) and the fp64 torch backend (all sizes)
# ----------------------------------------------------------------------------------------------------

SHAPES = [pytest.param("vec", 1, id="vec"), pytest.param("rows", 1, id="rows1"),
          pytest.param("rows", 2, id="rows2"), pytest.param("rows", 3, id="rows3")]


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("shape,d", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 7, 37])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_matches_naive_and_torch(op, backend, shape, d, n, masked, dtype):
    layout = "strided" if (n + d + masked) % 2 else "contiguous"
    case = make_case(op, n, d, dtype, shape=shape, masked=masked, layout=layout)
    check_backend(case, backend, naive=True)


LARGE_SHAPES = [pytest.param("vec", 1, id="vec"), pytest.param("rows", 2, id="rows2"),
                pytest.param("rows", 3, id="rows3")]


@pytest.mark.parametrize("op,backend", op_backend_params(include_torch=False))
@pytest.mark.parametrize("shape,d", LARGE_SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_matches_torch(op, backend, shape, d, masked, dtype):
    """Fused backends at N = 1031 (several blocks, odd tail) against the fp64 torch backend."""
    if interpreted(backend):
        pytest.skip("too large for the Triton interpreter")
    layout = "strided" if (d + masked) % 2 else "contiguous"
    case = make_case(op, 1031, d, dtype, shape=shape, masked=masked, layout=layout, k=16)
    check_backend(case, backend, naive=False)


@pytest.mark.parametrize("op", ["bmc", "gai", "bni"])
@pytest.mark.parametrize("d", [1, 3])
def test_large_torch_backend_fp32_accuracy(op, d):
    """The torch backend itself in fp32 at N = 1031 against its fp64 run (the naive covers small N)."""
    case = make_case(op, 1031, d, torch.float32, masked=True, k=16)
    check_backend(case, "torch", naive=False)


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_dense_with_mask(op, backend, dtype, layout):
    small = make_case(op, 0, 1, dtype, shape="dense", dense=(2, 5, 7), masked=True, layout=layout)
    check_backend(small, backend, naive=True)
    if backend != "torch" and not interpreted(backend):
        big = make_case(op, 0, 1, dtype, shape="dense", dense=(2, 23, 23), masked=True, layout=layout, k=16)
        check_backend(big, backend, naive=False)


@pytest.mark.parametrize("backend", backend_params("bmc_loss", CPP_OPS["bmc"]))
@pytest.mark.parametrize("shape,d", SHAPES)
@pytest.mark.parametrize("n,m", [(1, 1), (7, 5), (37, 19)])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bmc_candidates(backend, shape, d, n, m, masked, dtype):
    layout = "strided" if (n + d + masked) % 2 else "contiguous"
    case = make_case("bmc", n, d, dtype, shape=shape, masked=masked, layout=layout, m=m)
    check_backend(case, backend, naive=True)


@pytest.mark.parametrize("backend", backend_params("bmc_loss", CPP_OPS["bmc"], include_torch=False))
@pytest.mark.parametrize("shape,d", [pytest.param("vec", 1, id="vec"), pytest.param("rows", 3, id="rows3")])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bmc_candidates_large(backend, shape, d, masked, dtype):
    if interpreted(backend):
        pytest.skip("too large for the Triton interpreter")
    layout = "strided" if (d + masked) % 2 else "contiguous"
    case = make_case("bmc", 1031, d, dtype, shape=shape, masked=masked, layout=layout, m=300)
    check_backend(case, backend, naive=False)


@pytest.mark.parametrize("backend", backend_params("bmc_loss", CPP_OPS["bmc"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bmc_dense_with_sampled_candidates(backend, dtype):
    """The dense use: candidates = a random subset of the batch's valid pixels."""
    case = make_case("bmc", 0, 1, dtype, shape="dense", dense=(2, 6, 5), masked=True)
    valid = case.target[case.mask]
    case.prior["candidates"] = valid[torch.randperm(valid.numel())[:11]]
    check_backend(case, backend, naive=True)


@pytest.mark.parametrize("backend", backend_params("gai_loss", CPP_OPS["gai"]))
def test_gai_1d_prior_layouts_agree(backend):
    """For d = 1 the GMM may be given as ([K], [K], [K]) or ([K], [K, 1], [K, 1, 1])."""
    case = make_case("gai", 9, 1, torch.float64, shape="vec")
    w, mu, cov = case.prior["gmm"]
    flat = F.gai_loss(case.pred, case.target, 0.5, (w, mu.reshape(-1), cov.reshape(-1)), backend=backend)
    full = F.gai_loss(case.pred, case.target, 0.5, (w, mu, cov), backend=backend)
    col = F.gai_loss(case.pred, case.target, 0.5, (w, mu, cov.reshape(-1, 1)), backend=backend)
    assert float(flat) == float(full) == float(col)


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_backend_and_no_grad_agree(op, backend, dtype):
    """Loss without gradients (no_grad, inputs not requiring grad) equals the loss with gradients."""
    case = make_case(op, 37, 2, dtype, masked=True)
    for reduction in REDUCTIONS:
        with_grad = run(case, backend, reduction)[0]
        with torch.no_grad():
            no_grad = call_loss(op, case.pred, case.target, case.noise_var(), case.prior, case.mask, reduction, backend)
        plain = call_loss(op, case.pred.detach(), case.target, case.noise_var().detach(), case.prior, case.mask,
                          reduction, backend)
        assert not plain.requires_grad and not no_grad.requires_grad
        assert torch.equal(with_grad, no_grad) and torch.equal(with_grad, plain)


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_compute_in_fp32(op, backend, dtype):
    """Half inputs are upcast: loss and gradients match the fp32 computation on the same values, rounded."""
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("bf16 is not supported by the Triton interpreter")
    case = make_case(op, 37, 1, torch.float32, shape="vec", masked=True)
    half = Case(op, case.pred.detach().to(dtype).requires_grad_(), case.target.to(dtype), case.sigma, case.mask,
                case.prior)
    up = Case(op, half.pred.detach().float().requires_grad_(), half.target.float(), case.sigma, case.mask, case.prior)
    for reduction in REDUCTIONS:
        loss, gp, gs, g = run(half, backend, reduction)
        ref = run(up, backend, reduction, g.float())
        assert loss.dtype == dtype and gp.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss.float(), ref[0], rtol=2 * eps, atol=2 * eps * float(ref[0].abs().max()))
        torch.testing.assert_close(gp.float(), ref[1], rtol=2 * eps, atol=2 * eps * float(ref[1].abs().max()))
        torch.testing.assert_close(gs, ref[2], rtol=1e-5, atol=1e-6 * float(ref[2].abs()))


# ----------------------------------------------------------------------------------------------------
# gradcheck (fp64), opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------


GRADCHECK_PARAMS = op_backend_params() + [
    pytest.param("bmc_candidates", p.values[1], marks=p.marks, id=p.id.replace("bmc", "bmc_candidates"))
    for p in op_backend_params(("bmc",))]


@pytest.mark.parametrize("op,backend", GRADCHECK_PARAMS)
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(op, backend, d, reduction):
    """fp64 gradcheck w.r.t. pred and noise_var.

    The loss carries the factor sg(2 sigma^2): finite differences see it change, autograd does not. Dividing
    by 2 * noise_var.detach() removes it on both sides (numerically it cancels the factor, analytically it
    is a constant), so the checked function is the NLL, whose noise_var derivative autograd must get right.
    """
    base = "bmc" if op.startswith("bmc") else op
    case = make_case(base, 5, d, torch.float64, masked=True, keep=0.75, m=4 if op == "bmc_candidates" else None)
    case.mask[:2] = True
    pred = case.pred.detach().clone().requires_grad_()
    noise_var = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def fn(p, v):
        return call_loss(base, p, case.target, v, case.prior, case.mask, reduction, backend) / (2 * v.detach())

    assert torch.autograd.gradcheck(fn, (pred, noise_var), eps=1e-6, atol=1e-7, rtol=1e-6)


def _opcheck_cases():
    for op in ("bmc", "bmc_candidates", "gai", "bni"):
        qual = CPP_OPS["bmc" if op.startswith("bmc") else op][0]
        for compute_grad in (True, False):
            for reduction in (0, 1, 2):
                for masked in (False, True):
                    marks = [pytest.mark.requires_cpp]
                    if not op_kernel_registered(qual):
                        marks.append(pytest.mark.skip(reason=f"C++ CPU kernel not registered: {qual}"))
                    tag = "mask" if masked else "nomask"
                    yield pytest.param(op, compute_grad, reduction, masked, marks=marks,
                                       id=f"{op}-grad{int(compute_grad)}-red{reduction}-{tag}")


@pytest.mark.parametrize("op,compute_grad,reduction,masked", list(_opcheck_cases()))
@pytest.mark.parametrize("d", [1, 2])
def test_opcheck_cpp(op, compute_grad, reduction, masked, d):
    base = "bmc" if op.startswith("bmc") else op
    case = make_case(base, 9, d, torch.float32, masked=masked, m=5 if op == "bmc_candidates" else None)
    pred = case.pred.detach().contiguous().requires_grad_(compute_grad)
    noise_var = torch.tensor(0.64, requires_grad=compute_grad)
    if base == "bmc":
        args = (pred, case.target.contiguous(), case.prior["candidates"], case.mask, noise_var, reduction, compute_grad)
        torch.library.opcheck(torch.ops.imbreg_fast.bmc_fwd.default, args)
        return
    if base == "gai":
        tables = gai_tables(noise_var, *case.prior["gmm"], torch.float32)
    else:
        tables = bni_tables(noise_var, case.prior["bin_centers"], case.prior["bin_weights"], torch.float32)
    args = (pred, case.target.contiguous(), case.mask, noise_var, *tables, reduction, compute_grad)
    torch.library.opcheck(torch.ops.imbreg_fast.mixture_nll_fwd.default, args)


def _make_criterion(op, d, backend):
    prior = make_prior(op, d, torch.float32, k=6)
    if op == "bmc":
        return inn.BMCLoss(0.9, backend=backend)
    if op == "gai":
        return inn.GAILoss(prior["gmm"], 0.9, backend=backend)
    return inn.BNILoss(prior["bin_centers"], prior["bin_weights"], 0.9, backend=backend)


def _compiled_vs_eager(step, modules, inputs, compile_backend):
    """Run ``step(*modules, *inputs)`` eagerly and compiled (fullgraph), each on fresh copies of the
    modules, backward the loss, and compare loss and every parameter gradient."""
    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compile_backend)):
        mods = copy.deepcopy(modules)
        loss = fn(*mods, *inputs)
        loss.backward()
        results.append((loss.detach(), [(n, p.grad) for m in mods for n, p in m.named_parameters()]))
    (eager_loss, eager_grads), (comp_loss, comp_grads) = results
    assert_close("compiled loss", comp_loss, eager_loss, float(eager_loss.abs()), Tol(1e-5, 1e-6))
    for (name, a), (_, e) in zip(comp_grads, eager_grads):
        assert a is not None, f"no gradient for {name} in the compiled step"
        assert_close(f"compiled grad of {name}", a, e, float(e.abs().max()), Tol(1e-5, 1e-5))


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_compile_fullgraph_training_step(op, backend, d, masked, request):
    """torch.compile(fullgraph=True) of model forward + loss module, then backward: equals eager.

    Dynamo + AOTAutograd ('aot_eager': fake kernels, registered autograd, dynamic shapes); the inductor
    code generation is covered once per backend by test_compile_inductor_training_step.
    """
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, d))
    criterion = _make_criterion(op, d, backend)
    x, y = torch.randn(33, 4), torch.randn(33, d)
    mask = torch.rand(33) < 0.8 if masked else None

    def step(model, criterion, x, y, mask):
        return criterion(model(x), y, mask=mask)

    _compiled_vs_eager(step, (model, criterion), (x, y, mask), "aot_eager")


@pytest.mark.parametrize("backend", backend_params("bmc_loss", CPP_OPS["bmc"] + CPP_OPS["gai"]))
def test_compile_inductor_training_step(backend):
    """One inductor-compiled training step using the three losses (fullgraph), against eager."""
    if interpreted(backend):
        pytest.skip("inductor compilation of a Triton-interpreter op is covered by the triton tests")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    criteria = [_make_criterion(op, 1, backend) for op in ("bmc", "gai", "bni")]
    x, y = torch.randn(33, 4), torch.randn(33, 1)
    mask = None if backend == "torch" else torch.rand(33) < 0.8

    def step(model, bmc, gai, bni, x, y, mask):
        pred = model(x)
        return bmc(pred, y, mask=mask) + 0.5 * gai(pred, y, mask=mask) + 0.25 * bni(pred, y, mask=mask)

    _compiled_vs_eager(step, (model, *criteria), (x, y, mask), "inductor")


# ----------------------------------------------------------------------------------------------------
# Determinism across thread counts (fused backends)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,backend", op_backend_params(include_torch=False) + [
    pytest.param("bmc_candidates", p.values[1], marks=p.marks, id=p.id.replace("bmc", "bmc_candidates"))
    for p in op_backend_params(("bmc",), include_torch=False)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bit_identical_across_thread_counts(op, backend, reduction):
    """Same inputs, 1 vs 2 threads (and a repeat): bit-identical loss and gradients (several blocks)."""
    if interpreted(backend):
        pytest.skip("thread count does not apply to the Triton interpreter")
    base = "bmc" if op.startswith("bmc") else op
    n = 3000 if base == "bmc" else 50000
    case = make_case(base, n, 1, torch.float32, shape="vec", masked=True, keep=0.9, k=16,
                     m=2000 if op == "bmc_candidates" else None)
    g = make_grad_output(case, reduction, (n,))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            outs.append(run(case, backend, reduction, g)[:3])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for name, a, b in zip(("loss", "grad pred", "grad sigma"), outs[0], other):
            assert torch.equal(a, b), f"{name} differs between 1 and 2 threads (max diff {(a - b).abs().max()})"


# ----------------------------------------------------------------------------------------------------
# Agreement with the published formulation (imbreg_fast/experiments/published.py, materialising N x N / N x K)
# ----------------------------------------------------------------------------------------------------


PUBLISHED_VARIANTS = [("bmc", 1, None), ("bmc", 2, None), ("bmc", 3, None), ("bmc", 1, 40), ("bmc", 2, 40),
                      ("gai", 1, None), ("bni", 1, None)]


def _published_params():
    out = []
    for op, d, m in PUBLISHED_VARIANTS:
        for p in op_backend_params((op,)):
            out.append(pytest.param(op, d, m, p.values[1], marks=p.marks, id=f"{p.id}-d{d}{'-cands' if m else ''}"))
    return out


@pytest.mark.parametrize("op,d,m,backend", _published_params())
def test_agrees_with_published_reference(op, d, m, backend):
    """fp32, random inputs: loss and gradients (pred, noise_var) agree with the published formulation
    (imbreg_fast/experiments/published.py: N x N logits and cross-entropy, MVN.log_prob for d > 1, [N, K] terms)."""
    import imbreg_fast.experiments.published as pub

    n = 64
    case = make_case(op, n, d, torch.float32, k=8, m=m)
    p, t = case.pred.detach(), case.target
    noise_var = torch.tensor(0.7, requires_grad=True)

    def published(pred, v):
        if op == "bmc" and m is not None:
            return pub.bmc_loss_candidates_published(pred, t, case.prior["candidates"], v)
        if op == "bmc":
            return (pub.bmc_loss_published if d == 1 else pub.bmc_loss_md_published)(pred, t, v)
        if op == "gai":
            w, mu, cov = case.prior["gmm"]
            return pub.gai_loss_published(pred, t, v, w, mu.reshape(-1), cov.reshape(-1))
        return pub.bni_loss_published(pred, t, v, case.prior["bin_centers"].reshape(-1), case.prior["bin_weights"])

    results = []
    for fn in (published, lambda pred, v: call_loss(op, pred, t, v, case.prior, None, "mean", backend)):
        pred = p.clone().requires_grad_()
        loss = fn(pred, noise_var)
        gp, gv = torch.autograd.grad(loss, (pred, noise_var))
        results.append((loss.detach(), gp, gv))
    (ref_loss, ref_gp, ref_gv), (loss, gp, gv) = results
    assert loss.dtype == torch.float32
    scales = error_scales(Case(op, p, t, torch.tensor(math.sqrt(0.7)), None, case.prior), "mean", torch.tensor(1.0))
    tol = Tol(rtol=1e-5, atol=1e-6)
    assert_close("loss vs published", loss, ref_loss, scales.loss, tol)
    assert_close("grad pred vs published", gp, ref_gp, scales.grad_pred, tol)
    assert_close("grad noise_var vs published", gv, ref_gv, scales.grad_var, tol)


# ----------------------------------------------------------------------------------------------------
# Edge cases with defined results
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params("bmc_loss", CPP_OPS["bmc"]))
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("single", ["n1", "one_kept"])
def test_bmc_single_row_loss_is_exactly_zero(backend, d, reduction, dtype, single):
    if single == "n1":
        case = make_case("bmc", 1, d, dtype)
    else:
        case = make_case("bmc", 6, d, dtype, masked=True)
        case.mask.zero_()
        case.mask[3] = True
    loss, gp, gs, _ = run(case, backend, reduction)
    assert bool((loss == 0).all()), loss
    assert bool((gp == 0).all()) and bool(gs == 0), (gp, gs)


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prediction_far_from_every_target(op, backend, d, dtype):
    case = make_case(op, 7, d, dtype, masked=True, offset=1e4)
    for reduction in REDUCTIONS:
        out = run(case, backend, reduction)
        for name, x in zip(("loss", "grad pred", "grad sigma"), out[:3]):
            assert bool(torch.isfinite(x).all()), f"{name} not finite: {x}"
        if dtype == torch.float64:
            # |pred - mu|^2 ~ 1e8: fp64 keeps ~8 significant digits of the cancellation
            check_result(case, out, naive_expected(case, reduction, out[3]), reduction, Tol(rtol=1e-7, atol=1e-7),
                         "naive")


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("sigma", [1e-4, 1e4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2])
def test_extreme_sigma_matches_fp64_torch(op, backend, sigma, dtype, d):
    case = make_case(op, 37, d, dtype, masked=True, sigma=sigma)
    check_backend(case, backend, naive=False)


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["rows", "dense"])
def test_empty_mask(op, backend, dtype, shape):
    case = make_case(op, 9, 2 if shape == "rows" else 1, dtype, shape=shape, dense=(2, 3, 4), masked=True)
    case.mask.zero_()
    for reduction in REDUCTIONS:
        loss, gp, gs, _ = run(case, backend, reduction)
        assert bool((loss == 0).all()), f"{reduction}: loss {loss}"
        assert bool((gp == 0).all()) and bool(gs == 0), f"{reduction}: gradients not zero"
        if reduction == "none":
            assert loss.shape == (case.pred.shape if shape == "dense" else case.pred.shape[:1])


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_masked_out_pixels_is_ignored(op, backend, dtype):
    case = make_case(op, 0, 1, dtype, shape="dense", dense=(2, 6, 5), masked=True, keep=0.6)
    clean = Case(op, case.pred.detach().clone().requires_grad_(), case.target.clone(), case.sigma, case.mask,
                 case.prior)
    dirty_pred = clean.pred.detach().clone()
    dirty_target = clean.target.clone()
    holes = ~case.mask
    assert bool(holes.any())
    dirty_pred[holes] = float("nan")
    dirty_target[holes] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype).repeat(60)[
        : int(holes.sum())]
    dirty = Case(op, dirty_pred.requires_grad_(), dirty_target, case.sigma, case.mask, case.prior)
    for reduction in REDUCTIONS:
        ref = run(clean, backend, reduction)
        out = run(dirty, backend, reduction, ref[3])  # check_finite=True: must not raise
        for name, a, b in zip(("loss", "grad pred", "grad sigma"), out[:3], ref[:3]):
            assert bool(torch.isfinite(a).all()), f"{name} has NaN/inf"
            assert torch.equal(a, b), f"{name} changed by NaN in masked-out pixels"
        assert bool((out[1][holes] == 0).all())


@pytest.mark.parametrize("backend", backend_params("bmc_loss", CPP_OPS["bmc"]))
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bmc_empty_candidate_set(backend, d, dtype):
    """candidates [0, d]: each row's candidate set is its own target alone, so the loss is exactly 0."""
    case = make_case("bmc", 7, d, dtype, masked=True, m=0)
    for reduction in REDUCTIONS:
        loss, gp, gs, _ = run(case, backend, reduction)
        assert bool((loss == 0).all()) and bool((gp == 0).all()) and bool(gs == 0)


@pytest.mark.parametrize("op,backend", op_backend_params())
def test_no_rows(op, backend):
    """N = 0: 'mean' and 'sum' are 0 (not NaN), 'none' is empty, gradients are empty / zero."""
    case = make_case(op, 0, 1, torch.float32, shape="vec")
    for reduction in REDUCTIONS:
        loss, gp, gs, _ = run(case, backend, reduction)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert bool((loss == 0).all()) and gp.shape == (0,) and bool(gs == 0)


# ----------------------------------------------------------------------------------------------------
# Numerical stability regressions (docs/methods.md §1, "Stable forms")
# ----------------------------------------------------------------------------------------------------


def _tied_far_case(op, dtype) -> Case:
    """Targets [1, 1, 0], pred = target + 1e4, sigma^2 = 1: each row's two nearest targets (BMC), bins
    (BNI) or components (GAI) are tied, and the logits are ~ -5e7 (where an fp32 ulp is 4)."""
    target = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    pred = target + 1e4
    centers = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    if op == "bmc":
        prior = {"candidates": None}
    elif op == "bni":
        prior = {"bin_centers": centers.to(dtype), "bin_weights": weights.to(dtype)}
    else:
        prior = {"gmm": (weights.to(dtype), centers.to(dtype), torch.full((3, 1, 1), 0.5, dtype=dtype))}
    return Case(op, pred.to(dtype).requires_grad_(), target.to(dtype),
                torch.tensor(1.0, dtype=dtype, requires_grad=True), None, prior)


@pytest.mark.parametrize("op,backend", op_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_far_prediction_with_tied_nearest_terms(op, backend, dtype):
    """Regression: the torch backend's logsumexp backward, exp(logit - LSE) with the LSE rounded at
    magnitude 5e7, gave pred gradients off by 2e4 in fp32 (BMC: about [-2e4, -2e4, -2e4] instead of
    [0, 0, 2]) and by 4e-5 in fp64."""
    case = _tied_far_case(op, dtype)
    for reduction in REDUCTIONS:
        out = run(case, backend, reduction)
        check_result(case, out, naive_expected(case, reduction, out[3]), reduction, oracle="naive")


SWEEP_NOISE_VARS = [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6]
SWEEP_PRIORS = {"gai_d1": ("gai", 1, 16), "gai_d2": ("gai", 2, 16), "bni_d1": ("bni", 1, 100)}


def _relative_errors(out, ref: NaiveResult, sigma: float):
    """Max relative errors (loss, grad pred as a vector, grad sigma) of a reduced result."""
    loss, grad_pred, grad_sigma, _ = out
    exp_gp = torch.tensor(ref.grad_pred, dtype=torch.float64)
    exp_gs = ref.grad_var * 2 * sigma
    return (abs(float(loss) - ref.loss) / abs(ref.loss),
            float((grad_pred.double().reshape(exp_gp.shape) - exp_gp).abs().max() / exp_gp.abs().max()),
            abs(float(grad_sigma) - exp_gs) / abs(exp_gs))


def _sweep_params():
    out = []
    for prior, (op, _, _) in SWEEP_PRIORS.items():
        for p in op_backend_params((op,)):
            out.append(pytest.param(prior, p.values[1], marks=p.marks, id=f"{prior}-{p.values[1]}"))
    return out


@pytest.mark.parametrize("prior,backend", _sweep_params())
@pytest.mark.parametrize("noise_var", SWEEP_NOISE_VARS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_accurate_over_noise_var_sweep(prior, backend, noise_var, dtype):
    """Regression: GAI / BNI with unit-scale labels, sigma^2 from 1e-3 to 1e6: loss, d/d pred and
    d/d sigma within 1e-4 (fp32; 1e-9 fp64) relative of the float64 naive reference. The fp32 loss was
    14% off at sigma^2 = 1e6 (cancellation of sigma^2 log sigma^2 against 2 sigma^2 LSE, and of
    log sum_k phi_k = 0 against an O(1/sigma^2) LSE)."""
    kind, d, k = SWEEP_PRIORS[prior]
    case = make_case(kind, 48, d, dtype, k=k, sigma=math.sqrt(noise_var))
    bound = 1e-4 if dtype == torch.float32 else 1e-9
    for reduction in ("mean", "sum"):
        out = run(case, backend, reduction)
        errors = _relative_errors(out, naive_expected(case, reduction, out[3]), float(case.sigma.detach()))
        for name, err in zip(("loss", "grad pred", "grad sigma"), errors):
            assert err <= bound, f"[{reduction}] {name}: relative error {err:.3g} > {bound:g}"


@pytest.mark.parametrize("op,backend", op_backend_params(("gai", "bni"), include_torch=False))
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_pass_shift_with_far_rows_in_a_lane_group(op, backend, dtype):
    # d = 1, C++: one pass shifted by a row-independent bound; a group of rows (one vector of lanes) where
    # some prediction is far from every component is redone with the rows' own max. Rows alternate near /
    # far (30 to 300 component widths away) so every vector holds both kinds; each row must equal the torch
    # backend's (and the near rows must not change when the far ones are there).
    g = torch.Generator().manual_seed(5)
    n = 37
    target = 3 + 4 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    far = torch.arange(n) % 3 == 1
    offset = torch.where(far, 30 + 270 * torch.rand(n, generator=g, dtype=torch.float64), 0.3).unsqueeze(1)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64).unsqueeze(1)
    pred = (target + sign * offset).to(dtype).requires_grad_()
    target = target.to(dtype)
    sigma = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    if op == "gai":
        prior = (torch.tensor([0.2, 0.5, 0.3], dtype=dtype), torch.tensor([[3.0], [5.0], [6.5]], dtype=dtype),
                 torch.tensor([[[0.3]], [[0.6]], [[0.2]]], dtype=dtype))
        call = lambda p, t, be: F.gai_loss(p, t, sigma ** 2, prior, reduction="none", backend=be)
    else:
        centers = torch.linspace(2.05, 7.95, 60, dtype=dtype)
        weights = torch.exp(-0.5 * ((centers - 5) / 1.5) ** 2) + 0.01
        call = lambda p, t, be: F.bni_loss(p, t, sigma ** 2, centers, weights / weights.sum(), reduction="none",
                                           backend=be)
    tol = TOLS[dtype]
    outs = {}
    for be in ("torch", backend):
        loss = call(pred, target, be)
        gp, gs = torch.autograd.grad(loss, (pred, sigma), torch.linspace(0.5, 1.5, n, dtype=dtype))
        outs[be] = (loss.detach(), gp, gs)
    for name, got, ref in zip(("loss", "grad pred", "grad sigma"), outs[backend], outs["torch"]):
        torch.testing.assert_close(got, ref, rtol=tol.rtol, atol=tol.atol * float(ref.abs().max()), msg=name)
    # the near rows alone give the same values (the far rows' fallback does not disturb them)
    near = ~far
    loss_near = call(pred[near].detach(), target[near], backend)
    torch.testing.assert_close(loss_near, outs[backend][0][near], rtol=tol.rtol, atol=tol.atol * float(
        loss_near.abs().max()))
