"""Bad input to the Balanced MSE losses raises a clear error naming the argument (never a silent NaN or a
crash in a kernel). The checks live in the functional layer, before dispatch; they are run here on the
torch backend and, where the error is backend specific, on every backend."""
import math

import pytest
import torch

import imbreg_fast.functional as F
import imbreg_fast.nn as inn
from conftest import backend_params, fused_backends

N = 6
META = torch.device("meta")
BMC_CPP, MIX_CPP = ("imbreg_fast::bmc_fwd",), ("imbreg_fast::mixture_nll_fwd",)


def _gmm(d=1, k=3, dtype=torch.float32):
    w = torch.full((k,), 1.0 / k, dtype=dtype)
    mu = torch.randn(k, d, dtype=dtype)
    cov = torch.eye(d, dtype=dtype).expand(k, d, d).clone() * 0.5
    return w, mu, cov


def _bins(k=4, dtype=torch.float32):
    return torch.linspace(-1.5, 1.5, k, dtype=dtype), torch.full((k,), 1.0 / k, dtype=dtype)


def call(op, pred, target, noise_var=0.5, **kw):
    kw.setdefault("backend", "torch")
    if op == "bmc":
        return F.bmc_loss(pred, target, noise_var, **kw)
    if op == "gai":
        gmm = kw.pop("gmm", None) or _gmm(pred.shape[1] if getattr(pred, "dim", lambda: 1)() == 2 else 1)
        return F.gai_loss(pred, target, noise_var, gmm, **kw)
    centers, weights = kw.pop("bins", None) or _bins()
    return F.bni_loss(pred, target, noise_var, centers, weights, **kw)


OPS = ["bmc", "gai", "bni"]


def _xy(n=N, dtype=torch.float32):
    return torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# pred / target / mask
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_shape_mismatch(op):
    with pytest.raises(ValueError, match=r"pred and target must have the same shape.*\(6,\).*\(7,\)"):
        call(op, torch.randn(6), torch.randn(7))
    with pytest.raises(ValueError, match=r"pred must be \[N\], \[N, d\] or dense \[B, 1, H, W\]"):
        call(op, torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"pred must be"):
        call(op, torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3))  # 2 channels: not a dense map
    with pytest.raises(ValueError, match="pred must be"):
        call(op, torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("op", OPS)
def test_non_float_and_mixed_dtypes(op):
    x = torch.randn(N)
    with pytest.raises(TypeError, match=r"pred must have a floating dtype, got torch.int64"):
        call(op, torch.arange(N), x)
    with pytest.raises(TypeError, match=r"target must have a floating dtype, got torch.int32"):
        call(op, x, torch.arange(N, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"pred must be a torch.Tensor, got list"):
        call(op, [0.0] * N, x)
    with pytest.raises(TypeError, match=r"pred and target must have the same dtype"):
        call(op, x, x.double())


@pytest.mark.parametrize("op", OPS)
def test_mask_checks(op):
    pred, target = _xy()
    with pytest.raises(ValueError, match=r"mask must have shape \(6,\) for pred/target of shape \(6,\), got \(5,\)"):
        call(op, pred, target, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch.float32"):
        call(op, pred, target, mask=torch.ones(N))
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor or None"):
        call(op, pred, target, mask=[True] * N)
    # [N, d]: the mask is per row
    rows = torch.randn(N, 2)
    with pytest.raises(ValueError, match=r"mask must have shape \(6,\) for pred/target of shape \(6, 2\)"):
        call(op, rows, rows.clone(), mask=torch.ones(N, 2, dtype=torch.bool))
    # dense: the mask has the target's shape
    dense = torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 1, 3, 4\)"):
        call(op, dense, dense.clone(), mask=torch.ones(2, 3, 4, dtype=torch.bool))


@pytest.mark.parametrize("op", OPS)
def test_mixed_devices(op):
    pred, target = _xy()
    with pytest.raises(ValueError, match=r"target is on meta but pred is on cpu"):
        call(op, pred, target.to(META))
    with pytest.raises(ValueError, match=r"mask is on meta but pred is on cpu"):
        call(op, pred, target, mask=torch.ones(N, dtype=torch.bool, device=META))
    with pytest.raises(ValueError, match=r"noise_var is on meta but pred is on cpu"):
        call(op, pred, target, noise_var=torch.tensor(0.5, device=META))


def test_mixed_devices_of_priors():
    pred, target = _xy()
    with pytest.raises(ValueError, match=r"candidates is on meta but pred is on cpu"):
        F.bmc_loss(pred, target, 0.5, candidates=torch.randn(4, device=META))
    w, mu, cov = _gmm()
    with pytest.raises(ValueError, match=r"gmm weights is on meta"):
        F.gai_loss(pred, target, 0.5, (w.to(META), mu, cov))
    with pytest.raises(ValueError, match=r"gmm covariances is on meta"):
        F.gai_loss(pred, target, 0.5, (w, mu, cov.to(META)))
    centers, weights = _bins()
    with pytest.raises(ValueError, match=r"bin_centers is on meta"):
        F.bni_loss(pred, target, 0.5, centers.to(META), weights)
    with pytest.raises(ValueError, match=r"bin_weights is on meta"):
        F.bni_loss(pred, target, 0.5, centers, weights.to(META))


@pytest.mark.parametrize("op", OPS)
def test_bad_reduction(op):
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'none', 'sum'\], got 'avg'"):
        call(op, *_xy(), reduction="avg")


# ---------------------------------------------------------------------------------------------------
# noise_var
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_noise_var_must_be_positive_and_finite(op, bad, as_tensor):
    noise_var = torch.tensor(bad) if as_tensor else bad
    with pytest.raises(ValueError, match=r"noise_var must be finite and > 0"):
        call(op, *_xy(), noise_var=noise_var)


@pytest.mark.parametrize("op", OPS)
def test_noise_var_type_and_shape(op):
    with pytest.raises(TypeError, match=r"noise_var must have a floating dtype, got torch.int64"):
        call(op, *_xy(), noise_var=torch.tensor(1))
    with pytest.raises(ValueError, match=r"noise_var must be a scalar \(one element\), got shape \(2,\)"):
        call(op, *_xy(), noise_var=torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match=r"noise_var must be a float or a scalar tensor, got str"):
        call(op, *_xy(), noise_var="0.5")
    with pytest.raises(TypeError, match=r"noise_var must be a float or a scalar tensor, got bool"):
        call(op, *_xy(), noise_var=True)
    # one-element tensors of any shape and Python ints are accepted
    call(op, *_xy(), noise_var=torch.tensor([[0.5]]))
    call(op, *_xy(), noise_var=1)


# ---------------------------------------------------------------------------------------------------
# NaN / inf values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", ["pred", "target"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_in_pred_or_target(op, which, bad):
    pred, target = _xy()
    (pred if which == "pred" else target)[2] = bad
    with pytest.raises(ValueError, match=rf"^{which} contains NaN or inf \(pass check_finite=False"):
        call(op, pred, target)
    mask = torch.ones(N, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"^{which} contains NaN or inf at kept positions"):
        call(op, pred, target, mask=mask)
    mask[2] = False
    assert torch.isfinite(call(op, pred, target, mask=mask))   # masked out: ignored
    # check_finite=False skips the check: no error (the value is garbage, by the caller's choice)
    out = call(op, pred, target, check_finite=False)
    assert out.shape == ()


def test_nan_in_candidates():
    cands = torch.randn(4)
    cands[1] = math.nan
    with pytest.raises(ValueError, match=r"^candidates contains NaN or inf"):
        F.bmc_loss(*_xy(), 0.5, candidates=cands)
    F.bmc_loss(*_xy(), 0.5, candidates=cands, check_finite=False)


# ---------------------------------------------------------------------------------------------------
# BMC candidates, GAI mixture, BNI bins
# ---------------------------------------------------------------------------------------------------


def test_candidates_checks():
    rows = torch.randn(N, 2)
    with pytest.raises(ValueError, match=r"candidates must be \[M, 2\] for targets of dimension 2, got shape \(5, 3\)"):
        F.bmc_loss(rows, rows.clone(), 0.5, candidates=torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"candidates must be \[M, 2\].*got shape \(5,\)"):
        F.bmc_loss(rows, rows.clone(), 0.5, candidates=torch.randn(5))
    with pytest.raises(ValueError, match=r"candidates must be \[M, 1\] or \[M\].*got shape \(5, 2\)"):
        F.bmc_loss(*_xy(), 0.5, candidates=torch.randn(5, 2))
    with pytest.raises(TypeError, match=r"candidates must have pred's dtype torch.float32, got torch.float64"):
        F.bmc_loss(*_xy(), 0.5, candidates=torch.randn(5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"candidates must have a floating dtype"):
        F.bmc_loss(*_xy(), 0.5, candidates=torch.arange(5))


def test_gmm_checks():
    pred, target = _xy()
    w, mu, cov = _gmm()
    with pytest.raises(ValueError, match=r"gmm weights must sum to 1, got 1\.5"):
        F.gai_loss(pred, target, 0.5, (w * 1.5, mu, cov))
    with pytest.raises(ValueError, match=r"gmm weights must be finite and > 0"):
        F.gai_loss(pred, target, 0.5, (torch.tensor([0.5, 0.5, 0.0]), mu, cov))
    with pytest.raises(ValueError, match=r"gmm weights must be finite and > 0"):
        F.gai_loss(pred, target, 0.5, (torch.tensor([0.5, 0.7, -0.2]), mu, cov))
    with pytest.raises(TypeError, match=r"gmm must be \(weights \[K\], means \[K, d\], covariances \[K, d, d\]\)"):
        F.gai_loss(pred, target, 0.5, (w, mu))
    with pytest.raises(TypeError, match=r"gmm must be"):
        F.gai_loss(pred, target, 0.5, None)
    with pytest.raises(TypeError, match=r"gmm means must have a floating dtype"):
        F.gai_loss(pred, target, 0.5, (w, torch.arange(3), cov))
    with pytest.raises(ValueError, match=r"gmm means must be \[K, d\] = \[3, 1\], got \(4, 1\)"):
        F.gai_loss(pred, target, 0.5, (w, torch.randn(4, 1), cov))
    with pytest.raises(ValueError, match=r"gmm covariances must be \[K, d, d\] = \[3, 1, 1\]"):
        F.gai_loss(pred, target, 0.5, (w, mu, torch.ones(3, 2, 2)))
    with pytest.raises(ValueError, match=r"gmm weights must be \[K\] with K >= 1"):
        F.gai_loss(pred, target, 0.5, (w.reshape(1, 3), mu, cov))
    nan_mu = mu.clone()
    nan_mu[0] = math.nan
    with pytest.raises(ValueError, match=r"gmm means contain NaN or inf"):
        F.gai_loss(pred, target, 0.5, (w, nan_mu, cov))


def test_gmm_covariance_must_be_spd():
    rows = torch.randn(N, 2)
    w = torch.tensor([0.5, 0.5])
    mu = torch.randn(2, 2)
    not_spd = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])])   # eigenvalues 3, -1
    with pytest.raises(ValueError, match=r"gmm covariances must be symmetric positive definite; component 1 is not"):
        F.gai_loss(rows, rows.clone(), 0.5, (w, mu, not_spd))
    not_sym = torch.stack([torch.eye(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]])])
    with pytest.raises(ValueError, match=r"gmm covariances must be finite and symmetric"):
        F.gai_loss(rows, rows.clone(), 0.5, (w, mu, not_sym))
    with pytest.raises(ValueError, match=r"component 0 is not"):
        F.gai_loss(*_xy(), 0.5, (w, torch.randn(2), torch.tensor([-0.1, 0.3])))   # d = 1: negative variance


def test_bin_checks():
    pred, target = _xy()
    centers, weights = _bins()
    with pytest.raises(ValueError, match=r"bin_weights must be finite and >= 0"):
        F.bni_loss(pred, target, 0.5, centers, torch.tensor([0.5, -0.1, 0.35, 0.25]))   # a negative weight
    F.bni_loss(pred, target, 0.5, centers, torch.tensor([0.5, 0.0, 0.25, 0.25]))   # an empty bin: no term
    with pytest.raises(ValueError, match=r"bin_weights must sum to 1, got 2"):
        F.bni_loss(pred, target, 0.5, centers, weights * 2)
    with pytest.raises(ValueError, match=r"bin_weights must be \[K\] with K >= 1, got shape \(4, 1\)"):
        F.bni_loss(pred, target, 0.5, centers, weights.reshape(4, 1))
    with pytest.raises(ValueError, match=r"bin_centers must be \[K, d\] = \[4, 1\] or \[K\], got \(3,\)"):
        F.bni_loss(pred, target, 0.5, centers[:3], weights)
    rows = torch.randn(N, 2)
    with pytest.raises(ValueError, match=r"bin_centers must be \[K, d\] = \[4, 2\], got \(4,\)"):
        F.bni_loss(rows, rows.clone(), 0.5, centers, weights)
    with pytest.raises(TypeError, match=r"bin_centers must hold real numbers \(a floating or integer dtype\), "
                                        r"got torch.bool"):
        F.bni_loss(pred, target, 0.5, torch.tensor([True, False, True, True]), weights)
    # integer centres (the published get_bucket_info's int64 ages) are cast to pred's dtype
    torch.testing.assert_close(F.bni_loss(pred, target, 0.5, torch.arange(4), weights),
                               F.bni_loss(pred, target, 0.5, torch.arange(4.0), weights), rtol=0, atol=0)
    bad = centers.clone()
    bad[0] = math.inf
    with pytest.raises(ValueError, match=r"bin_centers contain NaN or inf"):
        F.bni_loss(pred, target, 0.5, bad, weights)


def test_checks_of_values_can_be_skipped():
    """check_finite=False skips the value checks (not the free shape/dtype/device ones)."""
    pred, target = _xy()
    w, mu, cov = _gmm()
    F.gai_loss(pred, target, 0.5, (w * 1.5, mu, cov), check_finite=False)
    with pytest.raises(ValueError, match="gmm means must be"):
        F.gai_loss(pred, target, 0.5, (w, torch.randn(4, 1), cov), check_finite=False)


# ---------------------------------------------------------------------------------------------------
# target.requires_grad on the fused path; module arguments
# ---------------------------------------------------------------------------------------------------


def _all_params():
    params = []
    for op, public, cpp in (("bmc", "bmc_loss", BMC_CPP), ("gai", "gai_loss", MIX_CPP), ("bni", "bni_loss", MIX_CPP)):
        for p in backend_params(public, cpp):
            params.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}"))
    return params


@pytest.mark.parametrize("op,backend", _all_params())
def test_target_requiring_grad_is_refused_on_every_backend(op, backend):
    """One policy on every backend (the torch backend used to differentiate the target silently, the fused
    ones to raise): targets are labels, never differentiated; one that requires grad is refused."""
    pred = torch.randn(N, requires_grad=True)
    target = torch.randn(N, requires_grad=True)
    with pytest.raises(ValueError, match=r"^target requires grad.*target\.detach\(\)"):
        call(op, pred, target, backend=backend)
    # fine without autograd, or with the target detached
    with torch.no_grad():
        call(op, pred, target, backend=backend)
    call(op, pred, target.detach(), backend=backend).backward()
    assert target.grad is None


@pytest.mark.parametrize("cls", ["BMCLoss", "GAILoss", "BNILoss"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_module_init_noise_sigma(cls, bad):
    args = {"BMCLoss": (), "GAILoss": (_gmm(),), "BNILoss": _bins()}[cls]
    with pytest.raises(ValueError, match=r"init_noise_sigma must be finite and > 0"):
        getattr(inn, cls)(*args, init_noise_sigma=bad)


def test_fused_backends_listed():
    """Sanity of the test parametrisation: the cpp backend is exercised whenever it is built."""
    from conftest import CPP_OK
    assert ("cpp" in fused_backends()) == CPP_OK
