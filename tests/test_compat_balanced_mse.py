"""imbreg_fast.compat.balanced_mse: the jiawei-ren/BalancedMSE API on the mainline ops.

Oracle: the published definitions, restated below in plain float64 torch (``ref_*``: the formulas of the
published ``balanaced_mse.py`` / ``synthetic_benchmark/loss.py``, written here from their maths, raw
weights and all), evaluated on the same input values; a second oracle is the literal formulation of
imbreg_fast.experiments.published. Every entry is compared on the torch and cpp backends, fp64 to 1e-10 and
fp32 to 1e-5: the loss, d loss / d pred and d loss / d sigma (noise_var = sigma ** 2).
"""
from __future__ import annotations

import copy
import importlib.util
import io
import math
import pathlib
import pickle

import numpy as np
import pytest
import torch
from torch.nn.modules.loss import _Loss

import imbreg_fast.functional as mainline
from conftest import backend_params
from imbreg_fast.compat import balanced_mse as C
from imbreg_fast.experiments import published

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
OPS = {"bmc": ("bmc_loss", ("imbreg_fast::bmc_fwd",)), "gai": ("gai_loss", ("imbreg_fast::mixture_nll_fwd",)),
       "bni": ("bni_loss", ("imbreg_fast::mixture_nll_fwd",))}


def backends(op):
    name, cpp_ops = OPS[op]
    return backend_params(name, cpp_ops)


def params(entries, op_of):
    """(entry, backend, dtype) params: every entry on every backend of its op, fp64 and fp32."""
    out = []
    for entry in entries:
        for b in backends(op_of(entry)):
            for dt in DTYPES:
                out.append(pytest.param(entry, b.values[0], dt.values[0], marks=b.marks,
                                        id=f"{entry}-{b.id}-{dt.id}"))
    return out


# ----------------------------------------------------------------------------------------------------
# The published definitions (float64 reference)
# ----------------------------------------------------------------------------------------------------


def _log_normal(x, mean, cov):
    """log N(x; mean, cov), full normalising constant; batch dims broadcast."""
    d = x.shape[-1]
    diff = (x - mean).unsqueeze(-1)
    sol = torch.linalg.solve(cov, diff)
    return (-0.5 * (diff * sol).sum((-2, -1)) - 0.5 * torch.logdet(cov).expand(diff.shape[:-2])
            - 0.5 * d * math.log(2 * math.pi))


def ref_bmc(pred, target, v):
    """Cross-entropy of the logits log N(y_j; p_i, v I) with row i's own target as the class, times sg(2v)."""
    d = pred.shape[1]
    sq = (pred.unsqueeze(1) - target.unsqueeze(0)).pow(2).sum(-1)                # [N, N]
    logits = -sq / (2 * v) - 0.5 * d * torch.log(2 * math.pi * v)
    ce = torch.logsumexp(logits, dim=1) - logits.diagonal()
    return (ce * (2 * v).detach()).mean()


def ref_gai(pred, target, gmm, v):
    """1-D GAI: (p-y)^2/(2v) + log(v)/2 + LSE_k(log w_k - log(s_k)/2 - (p-mu_k)^2/(2 s_k)), s_k = var_k + v."""
    w, mu, var = (torch.as_tensor(np.asarray(gmm[k]), dtype=torch.float64).reshape(1, -1)
                  for k in ("weights", "means", "variances"))
    s = var + v
    first = (pred - target).pow(2) / (2 * v) + 0.5 * torch.log(v)                 # [N, 1]
    second = torch.logsumexp(torch.log(w) - 0.5 * torch.log(s) - (pred - mu).pow(2) / (2 * s), dim=1, keepdim=True)
    return ((first + second) * (2 * v).detach()).mean()


def ref_gai_md(pred, target, gmm, v):
    """-log N(y; p, vI) + LSE_k(log w_k + log N(p; mu_k, Sigma_k + vI)), times sg(2v), mean."""
    d = pred.shape[1]
    w = torch.as_tensor(np.asarray(gmm["weights"]), dtype=torch.float64).reshape(-1)
    mu = torch.as_tensor(np.asarray(gmm["means"]), dtype=torch.float64).reshape(-1, d)
    cov = torch.as_tensor(np.asarray(gmm["variances"]), dtype=torch.float64).reshape(-1, d, d)
    eye = torch.eye(d, dtype=torch.float64)
    first = -_log_normal(target, pred, v * eye)                                    # [N]
    second = torch.logsumexp(torch.log(w) + _log_normal(pred.unsqueeze(1), mu, cov + v * eye), dim=1)
    return ((first + second) * (2 * v).detach()).mean()


def ref_bni(pred, target, centers, weights, v):
    """(p-y)^2/(2v) + LSE_k(log w_k - (p-c_k)^2/(2v)), times sg(2v), mean (raw weights: log 0 = -inf)."""
    c = torch.as_tensor(np.asarray(centers)).to(torch.float64).reshape(1, -1)
    w = torch.as_tensor(np.asarray(weights)).to(torch.float64).reshape(1, -1)
    first = (pred - target).pow(2) / (2 * v)
    second = torch.logsumexp(torch.log(w) - (pred - c).pow(2) / (2 * v), dim=1, keepdim=True)
    return ((first + second) * (2 * v).detach()).mean()


# ----------------------------------------------------------------------------------------------------
# Data as the published scripts produce it
# ----------------------------------------------------------------------------------------------------


def sklearn_gmm(k=4, d=1, seed=0):
    """The dict preprocess_gmm.py dumps: sklearn's means_ [K, d], covariances_ [K, d, d], weights_ [K]."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d))
    weights = rng.uniform(0.2, 1.0, size=k)
    return {"means": rng.normal(scale=1.5, size=(k, d)), "variances": a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d),
            "weights": weights / weights.sum()}


def age_buckets():
    """get_bucket_info of the age datasets: int64 centres (empty buckets dropped), float64 weights."""
    counts = np.array([3, 7, 0, 12, 20, 9, 0, 4, 2, 1], dtype=np.int64)
    centers = np.arange(18, 28)[counts > 0]
    weights = counts[counts > 0] / counts[counts > 0].sum()
    return centers, weights


def rows(n, d, dtype, loc=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = loc + scale * torch.randn(n, d, dtype=torch.float64, generator=g)
    pred = target + 0.7 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return pred.to(dtype).requires_grad_(), target.to(dtype)


def grads_of(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def assert_matches(actual, expected, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


def check_entry(compat_fn, ref_fn, pred, target, sigma_value, dtype):
    """compat_fn(pred, target, noise_var) and ref_fn (float64) agree: loss, d/d pred, d/d sigma."""
    sigma = torch.tensor(sigma_value, dtype=dtype, requires_grad=True)
    loss = compat_fn(pred, target, sigma ** 2)
    assert loss.shape == () and loss.dtype == dtype
    gp, gs = grads_of(loss, pred, sigma)
    p64 = pred.detach().double().requires_grad_()
    s64 = sigma.detach().double().requires_grad_()
    ref = ref_fn(p64, target.double(), s64 ** 2)
    rp, rs = grads_of(ref, p64, s64)
    assert_matches(loss, ref, dtype, "loss")
    assert_matches(gp, rp, dtype, "d/d pred")
    assert_matches(gs, rs, dtype, "d/d sigma")
    return loss


# ----------------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------------

GMM1, GMM2 = sklearn_gmm(4, 1), sklearn_gmm(3, 2, seed=1)
CENTERS, WEIGHTS = age_buckets()
FUNCTIONS = {
    # name: (op, d, label location, compat(pred, target, v, backend), reference(pred, target, v))
    "bmc_loss": ("bmc", 1, 0.0, lambda p, t, v, b: C.bmc_loss(p, t, v, backend=b), ref_bmc),
    "bmc_loss_md-d1": ("bmc", 1, 0.0, lambda p, t, v, b: C.bmc_loss_md(p, t, v, backend=b), ref_bmc),
    "bmc_loss_md-d3": ("bmc", 3, 0.0, lambda p, t, v, b: C.bmc_loss_md(p, t, v, backend=b), ref_bmc),
    "gai_loss": ("gai", 1, 0.0, lambda p, t, v, b: C.gai_loss(p, t, GMM1, v, backend=b),
                 lambda p, t, v: ref_gai(p, t, GMM1, v)),
    "gai_loss_md-d1": ("gai", 1, 0.0, lambda p, t, v, b: C.gai_loss_md(p, t, GMM1, v, backend=b),
                       lambda p, t, v: ref_gai_md(p, t, GMM1, v)),
    "gai_loss_md-d2": ("gai", 2, 0.0, lambda p, t, v, b: C.gai_loss_md(p, t, GMM2, v, backend=b),
                       lambda p, t, v: ref_gai_md(p, t, GMM2, v)),
    "bni_loss": ("bni", 1, 22.0, lambda p, t, v, b: C.bni_loss(p, t, v, CENTERS, WEIGHTS, backend=b),
                 lambda p, t, v: ref_bni(p, t, CENTERS, WEIGHTS, v)),
}


class TestFunctions:
    @pytest.mark.parametrize("name,backend,dtype", params(FUNCTIONS, lambda e: FUNCTIONS[e][0]))
    def test_matches_published_definition(self, name, backend, dtype):
        op, d, loc, fn, ref = FUNCTIONS[name]
        pred, target = rows(9, d, dtype, loc=loc, scale=2.0 if op == "bni" else 1.0)
        check_entry(lambda p, t, v: fn(p, t, v, backend), ref, pred, target, 0.8, dtype)

    @pytest.mark.parametrize("backend", backends("gai") + backends("bni"))
    def test_matches_literal_published_formulation(self, backend):
        """The second oracle: the literal published torch code (experiments.published), float64."""
        pred, target = rows(8, 1, torch.float64)
        v = torch.tensor(0.6, dtype=torch.float64)
        g = {k: torch.as_tensor(x) for k, x in GMM1.items()}
        assert_matches(C.gai_loss(pred, target, GMM1, v, backend=backend),
                       published.gai_loss_published(pred, target, v, g["weights"], g["means"], g["variances"]),
                       torch.float64, "gai")
        assert_matches(C.bmc_loss(pred, target, v, backend=backend),
                       published.bmc_loss_published(pred, target, v), torch.float64, "bmc")
        pred, target = rows(8, 1, torch.float64, loc=22.0, scale=2.0)
        assert_matches(C.bni_loss(pred, target, v, CENTERS, WEIGHTS, backend=backend),
                       published.bni_loss_published(pred, target, v, torch.as_tensor(CENTERS),
                                                    torch.as_tensor(WEIGHTS)),
                       torch.float64, "bni")

    @pytest.mark.parametrize("backend", backends("gai"))
    def test_gmm_dict_value_types(self, backend):
        """numpy float64 (as dumped), tensors of either float dtype, lists, flat [K] arrays: one value."""
        pred, target = rows(7, 1, torch.float64)
        v = torch.tensor(0.7, dtype=torch.float64)
        expected = ref_gai(pred, target, GMM1, v)
        forms = [GMM1, {k: torch.as_tensor(x) for k, x in GMM1.items()}, {k: x.tolist() for k, x in GMM1.items()},
                 {k: np.asarray(x).reshape(-1) for k, x in GMM1.items()}, dict(GMM1, extra="ignored")]
        for gmm in forms:
            assert_matches(C.gai_loss(pred, target, gmm, v, backend=backend), expected, torch.float64, "gai")
            assert_matches(C.gai_loss_md(pred, target, gmm, v, backend=backend), expected, torch.float64, "gai md")
        gmm32 = {k: torch.as_tensor(x, dtype=torch.float32) for k, x in GMM1.items()}
        assert_matches(C.gai_loss(pred.float(), target.float(), gmm32, v.float(), backend=backend), expected,
                       torch.float32, "fp32 gai with fp32 gmm")

    @pytest.mark.parametrize("backend", backends("bni"))
    def test_bucket_value_types(self, backend):
        """int64 centres (age get_bucket_info), float centres, tensors, lists, [K, 1]: one value."""
        pred, target = rows(7, 1, torch.float64, loc=22.0, scale=2.0)
        v = torch.tensor(1.1, dtype=torch.float64)
        expected = ref_bni(pred, target, CENTERS, WEIGHTS, v)
        assert CENTERS.dtype == np.int64 and WEIGHTS.dtype == np.float64
        for centers in (CENTERS, CENTERS.astype(np.float64), torch.as_tensor(CENTERS), CENTERS.tolist(),
                        torch.as_tensor(CENTERS).reshape(-1, 1), CENTERS.astype(np.int32)):
            for weights in (WEIGHTS, torch.as_tensor(WEIGHTS), WEIGHTS.tolist(), torch.as_tensor(WEIGHTS).float()):
                fp32 = isinstance(weights, torch.Tensor) and weights.dtype == torch.float32
                tol = torch.float32 if fp32 else torch.float64
                assert_matches(C.bni_loss(pred, target, v, centers, weights, backend=backend), expected, tol,
                               f"{type(centers).__name__} centres, {type(weights).__name__} weights")

    @pytest.mark.parametrize("backend", backends("gai") + backends("bni"))
    def test_unnormalised_and_zero_weights_as_published(self, backend):
        """The published log(weights): a zero weight drops its term, a sum != 1 shifts the loss by
        2 v log(sum); loss and both gradients as the raw-weight definition."""
        gmm = dict(GMM1, weights=np.array([0.6, 0.0, 1.2, 0.9]))
        centers = np.arange(18, 26)
        counts = np.array([3.0, 0.0, 12.0, 20.0, 9.0, 0.0, 4.0, 2.0])       # raw counts, zeros kept
        for dtype in (torch.float64, torch.float32):
            pred, target = rows(7, 1, dtype)
            check_entry(lambda p, t, v: C.gai_loss(p, t, gmm, v, backend=backend),
                        lambda p, t, v: ref_gai(p, t, gmm, v), pred, target, 0.9, dtype)
            pred, target = rows(7, 1, dtype, loc=21.0, scale=2.0)
            check_entry(lambda p, t, v: C.bni_loss(p, t, v, centers, counts, backend=backend),
                        lambda p, t, v: ref_bni(p, t, centers, counts, v), pred, target, 1.3, dtype)

    @pytest.mark.parametrize("backend", backends("bmc"))
    def test_noise_var_number_and_flat_bmc_target(self, backend):
        pred, target = rows(6, 1, torch.float64)
        v = torch.tensor(0.5, dtype=torch.float64)
        expected = C.bmc_loss(pred, target, v, backend=backend)
        assert_matches(C.bmc_loss(pred, target, 0.5, backend=backend), expected, torch.float64, "float noise_var")
        assert_matches(C.bmc_loss(pred, target, np.float32(0.5), backend=backend), expected, torch.float64,
                       "numpy noise_var")
        # the published pred - target.T also accepts a [N] target with a [N, 1] pred
        assert_matches(C.bmc_loss(pred, target.reshape(-1), v, backend=backend), expected, torch.float64, "[N] target")
        assert_matches(C.gai_loss(pred, target, GMM1, 0.5, backend=backend),
                       C.gai_loss(pred, target, GMM1, v, backend=backend), torch.float64, "gai float noise_var")

    @pytest.mark.parametrize("backend", backends("bmc"))
    def test_bmc_single_row_is_zero_and_empty_batch_is_zero(self, backend):
        pred, target = rows(1, 1, torch.float32)
        assert C.bmc_loss(pred, target, 0.3, backend=backend).item() == 0.0
        empty = torch.zeros(0, 1)
        assert float(C.bmc_loss(empty, empty, 0.3, backend=backend)) == 0.0   # published: NaN (not copied)

    def test_calls_the_mainline_op_once(self, monkeypatch):
        """No second implementation: each compat function is one call of imbreg_fast.functional."""
        calls = []
        for name in ("bmc_loss", "gai_loss", "bni_loss"):
            original = getattr(mainline, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls.append((_name, kwargs.get("backend")))
                return _original(*args, **kwargs)
            monkeypatch.setattr(mainline, name, spy)
        pred, target = rows(5, 1, torch.float64)
        p2, t2 = rows(5, 2, torch.float64)
        C.bmc_loss(pred, target, 0.5, backend="torch")
        C.bmc_loss_md(p2, t2, 0.5)
        C.gai_loss(pred, target, GMM1, 0.5)
        C.gai_loss_md(p2, t2, GMM2, 0.5)
        C.bni_loss(pred + 22, target + 22, 0.5, CENTERS, WEIGHTS)
        assert calls == [("bmc_loss", "torch"), ("bmc_loss", "auto"), ("gai_loss", "auto"), ("gai_loss", "auto"),
                         ("bni_loss", "auto")]


# ----------------------------------------------------------------------------------------------------
# Errors of the functions
# ----------------------------------------------------------------------------------------------------


class TestFunctionErrors:
    def test_shapes(self):
        p, t = rows(5, 1, torch.float32)
        p2, t2 = rows(5, 2, torch.float32)
        with pytest.raises(ValueError, match=r"pred must be \[N, 1\].*unsqueeze"):
            C.bmc_loss(p.reshape(-1), t.reshape(-1), 0.5)
        with pytest.raises(ValueError, match="use bmc_loss_md"):
            C.bmc_loss(p2, t2, 0.5)
        with pytest.raises(ValueError, match="use gai_loss_md"):
            C.gai_loss(p2, t2, GMM1, 0.5)
        with pytest.raises(ValueError, match=r"published BNI is 1-D"):
            C.bni_loss(p2, t2, 0.5, CENTERS, WEIGHTS)
        with pytest.raises(ValueError, match=r"pred must be \[N, d\]"):
            C.bmc_loss_md(p.reshape(-1), t.reshape(-1), 0.5)
        with pytest.raises(ValueError, match="target must have pred's shape"):
            C.gai_loss(p, t.reshape(-1), GMM1, 0.5)   # published: broadcasts to [N, N] and averages it
        with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
            C.bmc_loss(p.detach().numpy(), t, 0.5)

    def test_gmm(self, tmp_path):
        p, t = rows(5, 1, torch.float64)
        p2, t2 = rows(5, 2, torch.float64)
        with pytest.raises(ValueError, match=r"missing key\(s\) \['variances'\]"):
            C.gai_loss(p, t, {"means": GMM1["means"], "weights": GMM1["weights"]}, 0.5)
        with pytest.raises(TypeError, match="gmm must be a dict"):
            C.gai_loss(p, t, (GMM1["weights"], GMM1["means"], GMM1["variances"]), 0.5)
        with pytest.raises(TypeError, match="got a path.*load_gmm"):
            C.gai_loss(p, t, str(tmp_path / "gmm.pkl"), 0.5)
        with pytest.raises(ValueError, match=r"gmm\['means'\] must hold one value per component.*gai_loss_md"):
            C.gai_loss(p, t, GMM2, 0.5)
        with pytest.raises(ValueError, match=r"gmm\['variances'\] must be the full covariances \[K, d, d\]"):
            C.gai_loss_md(p2, t2, dict(GMM2, variances=np.ones((3, 2))), 0.5)
        with pytest.raises(ValueError, match=r"gmm\['means'\] must be \[K, d\] = \[3, 2\]"):
            C.gai_loss_md(p2, t2, dict(GMM2, means=np.ones((3, 3))), 0.5)
        with pytest.raises(ValueError, match=r"gmm\['weights'\] must be finite and >= 0"):
            C.gai_loss(p, t, dict(GMM1, weights=np.array([0.5, -0.1, 0.3, 0.3])), 0.5)
        with pytest.raises(ValueError, match=r"gmm\['weights'\] must be finite and >= 0, with at least one > 0"):
            C.gai_loss(p, t, dict(GMM1, weights=np.zeros(4)), 0.5)
        with pytest.raises(TypeError, match=r"gmm\['means'\] must be a tensor, numpy array or list"):
            C.gai_loss(p, t, dict(GMM1, means="0 1 2 3"), 0.5)

    def test_buckets(self):
        p, t = rows(5, 1, torch.float64, loc=22.0)
        with pytest.raises(ValueError, match=r"bucket_centers must be \[K\] = \[8\]"):
            C.bni_loss(p, t, 0.5, CENTERS[:-1], WEIGHTS)
        with pytest.raises(ValueError, match=r"bucket_weights must be \[K\]"):
            C.bni_loss(p, t, 0.5, CENTERS, WEIGHTS.reshape(2, 4))
        with pytest.raises(ValueError, match="bucket_weights must be finite and >= 0"):
            C.bni_loss(p, t, 0.5, CENTERS, -WEIGHTS)
        with pytest.raises(TypeError, match="bucket_centers must be a tensor, numpy array or list, got dict"):
            C.bni_loss(p, t, 0.5, {"centers": CENTERS}, WEIGHTS)
        with pytest.raises(TypeError, match="bucket_centers must hold real numbers"):
            C.bni_loss(p, t, 0.5, CENTERS > 20, WEIGHTS)


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


def write_gmm(path, gmm):
    with open(path, "wb") as f:
        pickle.dump(gmm, f)
    return path


MODULES = {
    # name: (op, d, label location, build(tmp_path), reference(pred, target, v))
    "BMCLoss": ("bmc", 1, 0.0, lambda tmp, s: C.BMCLoss(s), ref_bmc),
    "BMCLossMD": ("bmc", 2, 0.0, lambda tmp, s: C.BMCLossMD(s), ref_bmc),
    "GAILoss-path": ("gai", 1, 0.0, lambda tmp, s: C.GAILoss(s, str(write_gmm(tmp / "gmm.pkl", GMM1))),
                     lambda p, t, v: ref_gai(p, t, GMM1, v)),
    "GAILoss-dict": ("gai", 1, 0.0, lambda tmp, s: C.GAILoss(s, GMM1), lambda p, t, v: ref_gai(p, t, GMM1, v)),
    "GAILossMD": ("gai", 2, 0.0, lambda tmp, s: C.GAILossMD(s, GMM2), lambda p, t, v: ref_gai_md(p, t, GMM2, v)),
    "BNILoss": ("bni", 1, 22.0, lambda tmp, s: C.BNILoss(s, CENTERS, WEIGHTS),
                lambda p, t, v: ref_bni(p, t, CENTERS, WEIGHTS, v)),
}


def set_backend(module, backend):
    module.backend = backend
    return module


class TestModules:
    @pytest.mark.parametrize("name,backend,dtype", params(MODULES, lambda e: MODULES[e][0]))
    def test_matches_published_definition(self, name, backend, dtype, tmp_path):
        """The module as the published training script builds and calls it: loss, d/d pred, d/d noise_sigma."""
        op, d, loc, build, ref = MODULES[name]
        module = set_backend(build(tmp_path, 0.9), backend)
        if dtype == torch.float64:
            module = module.double()
        assert module.noise_sigma.dtype == dtype
        pred, target = rows(8, d, dtype, loc=loc, scale=2.0 if op == "bni" else 1.0)
        loss = module(pred, target)
        gp, gs = grads_of(loss, pred, module.noise_sigma)
        p64 = pred.detach().double().requires_grad_()
        s64 = module.noise_sigma.detach().double().requires_grad_()   # float32(0.9), as the published module
        expected = ref(p64, target.double(), s64 ** 2)
        rp, rs = grads_of(expected, p64, s64)
        assert_matches(loss, expected, dtype, "loss")
        assert_matches(gp, rp, dtype, "d/d pred")
        assert_matches(gs, rs, dtype, "d/d noise_sigma")

    @pytest.mark.parametrize("name", MODULES)
    def test_noise_sigma_and_the_published_param_group(self, name, tmp_path):
        op, d, loc, build, _ = MODULES[name]
        module = build(tmp_path, 1.0)
        assert isinstance(module, _Loss) and module.reduction == "mean"
        assert [n for n, _ in module.named_parameters()] == ["noise_sigma"]
        assert isinstance(module.noise_sigma, torch.nn.Parameter) and module.noise_sigma.dtype == torch.float32
        model = torch.nn.Linear(d, d)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.add_param_group({"params": module.noise_sigma, "lr": 0.5, "name": "noise_sigma"})
        pred, target = rows(6, d, torch.float32, loc=loc)
        module(model(pred.detach()), target).backward()
        assert module.noise_sigma.grad is not None
        optimizer.step()
        assert module.noise_sigma.item() != 1.0

    @pytest.mark.parametrize("name", MODULES)
    def test_buffers_state_dict_and_device_moves(self, name, tmp_path):
        op, d, loc, build, _ = MODULES[name]
        src = build(tmp_path, 0.7)
        buffers = dict(src.named_buffers())
        expected_buffers = {"bmc": set(), "gai": {"gmm_means", "gmm_variances", "gmm_weights"},
                            "bni": {"bucket_centers", "bucket_weights"}}[op]
        assert set(buffers) == expected_buffers and set(src.state_dict()) == {"noise_sigma"} | expected_buffers
        with torch.no_grad():
            src.noise_sigma.mul_(1.5)
        blob = io.BytesIO()
        torch.save(src.state_dict(), blob)
        blob.seek(0)
        dst = build(tmp_path, 3.0)
        dst.load_state_dict(torch.load(blob))
        pred, target = rows(6, d, torch.float32, loc=loc)
        assert torch.equal(dst(pred, target), src(pred, target))
        assert torch.equal(copy.deepcopy(src)(pred, target), src(pred, target))
        wide = copy.deepcopy(src).to(torch.float64)
        assert wide.noise_sigma.dtype == torch.float64 and isinstance(wide.noise_sigma, torch.nn.Parameter)
        assert all(b.dtype in (torch.float64, torch.int64) for b in wide.buffers())
        assert_matches(wide(pred.double(), target.double()), src(pred, target), torch.float32, "float64 module")
        if op == "bni":
            assert src.bucket_centers.dtype == torch.int64 and wide.bucket_centers.dtype == torch.int64
            assert src.bucket_weights.dtype == torch.float64
        if op == "gai":
            gmm = src.gmm
            assert sorted(gmm) == ["means", "variances", "weights"] and gmm["weights"].dtype == torch.float64
            assert gmm["variances"].shape == np.shape(GMM1["variances"] if d == 1 else GMM2["variances"])
        assert "noise_sigma=1.05" in repr(src)

    def test_gmm_file_forms(self, tmp_path):
        path = write_gmm(tmp_path / "gmm.pkl", GMM1)
        pred, target = rows(6, 1, torch.float64)
        expected = C.GAILoss(1.0, GMM1).double()(pred, target)
        for source in (str(path), pathlib.Path(path), {k: torch.as_tensor(x) for k, x in GMM1.items()}):
            assert torch.equal(C.GAILoss(1.0, source).double()(pred, target), expected)
        assert C.load_gmm(path).keys() == GMM1.keys()
        md = write_gmm(tmp_path / "gmm2.pkl", GMM2)
        p2, t2 = rows(6, 2, torch.float64)
        assert torch.equal(C.GAILossMD(1.0, str(md)).double()(p2, t2), C.GAILossMD(1.0, GMM2).double()(p2, t2))

    def test_joblib_file(self, tmp_path):
        joblib = pytest.importorskip("joblib")
        path = tmp_path / "gmm.pkl"
        joblib.dump(GMM1, path)                   # what preprocess_gmm.py does
        pred, target = rows(6, 1, torch.float64)
        assert torch.equal(C.GAILoss(1.0, str(path))(pred, target), C.GAILoss(1.0, GMM1)(pred, target))

    def test_init_noise_sigma_forms(self):
        """torch.tensor(init_noise_sigma) semantics: a float in the default dtype, a numpy float64 in float64;
        an int becomes a float (the published Parameter of an int64 tensor fails)."""
        assert C.BMCLoss(1).noise_sigma.dtype == torch.float32 and C.BMCLoss(1).noise_sigma.item() == 1.0
        assert C.BMCLoss(np.float64(0.5)).noise_sigma.dtype == torch.float64
        assert C.BMCLoss(torch.tensor(0.5, dtype=torch.float64)).noise_sigma.dtype == torch.float64
        assert C.BMCLoss(-0.5).noise_sigma.item() == -0.5           # as published: sigma enters as sigma ** 2

    def test_module_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="gmm: no such file .*missing.pkl"):
            C.GAILoss(1.0, str(tmp_path / "missing.pkl"))
        with pytest.raises(TypeError, match="holds a list, expected the dict"):
            C.GAILoss(1.0, str(write_gmm(tmp_path / "list.pkl", [1, 2, 3])))
        with pytest.raises(ValueError, match=r"GAILoss: gmm is missing key\(s\) \['weights'\]"):
            C.GAILoss(1.0, {"means": GMM1["means"], "variances": GMM1["variances"]})
        with pytest.raises(ValueError, match=r"GAILossMD: gmm\['variances'\] must be the full covariances"):
            C.GAILossMD(1.0, dict(GMM2, variances=np.ones(3)))
        with pytest.raises(TypeError, match=r"GAILoss: init_noise_sigma must be a number, got tuple.*nn\.GAILoss"):
            C.GAILoss((GMM1["weights"], GMM1["means"], GMM1["variances"]), 1.0)     # the mainline order
        with pytest.raises(TypeError, match=r"BNILoss: init_noise_sigma must be a number.*imbreg_fast\.nn\.BNILoss"):
            C.BNILoss(CENTERS, WEIGHTS, 1.0)
        with pytest.raises(ValueError, match="for d > 1 use GAILossMD"):
            C.GAILoss(1.0, GMM2)
        p2, t2 = rows(4, 2, torch.float32)
        with pytest.raises(ValueError, match=r"GAILoss: pred must be \[N, 1\].*use GAILossMD"):
            C.GAILoss(1.0, GMM1)(p2, t2)
        with pytest.raises(ValueError, match="init_noise_sigma must be finite and nonzero"):
            C.BMCLoss(0.0)
        with pytest.raises(ValueError, match=r"bucket_centers must be \[K\]"):
            C.BNILoss(1.0, CENTERS[:3], WEIGHTS)
        with pytest.raises(ValueError, match="bucket_weights must be finite and >= 0"):
            C.BNILoss(1.0, CENTERS, np.full(len(CENTERS), np.nan))
        with pytest.raises(ValueError, match="bucket_centers contain NaN or inf"):
            C.BNILoss(1.0, np.full(len(CENTERS), np.inf), WEIGHTS)

    def test_unreadable_gmm_file(self, tmp_path):
        if importlib.util.find_spec("joblib") is not None:
            pytest.skip("joblib installed: it reads the file")
        bad = tmp_path / "bad.pkl"
        bad.write_bytes(b"not a pickle at all")
        with pytest.raises(ValueError, match="is not a pickle file"):
            C.GAILoss(1.0, str(bad))
        # a joblib dump of numpy arrays refers to joblib's array wrapper, which pickle cannot import
        wrapped = tmp_path / "joblib.pkl"
        wrapped.write_bytes(b"cjoblib.numpy_pickle\nNumpyArrayWrapper\n.")
        with pytest.raises(ImportError, match="was written by joblib .* install joblib"):
            C.GAILoss(1.0, str(wrapped))
