"""imbreg_fast.nn loss modules: the learnable noise scale and the stored priors."""
import copy
import io

import pytest
import torch
from torch import nn

import imbreg_fast.functional as F
import imbreg_fast.nn as inn
from conftest import backend_params

CPP = {"BMCLoss": ("imbreg_fast::bmc_fwd",), "GAILoss": ("imbreg_fast::mixture_nll_fwd",),
       "BNILoss": ("imbreg_fast::mixture_nll_fwd",)}
PUBLIC = {"BMCLoss": "bmc_loss", "GAILoss": "gai_loss", "BNILoss": "bni_loss"}
PRIOR_BUFFERS = {"BMCLoss": (), "GAILoss": ("gmm_weights", "gmm_means", "gmm_covariances"),
                 "BNILoss": ("bin_centers", "bin_weights")}


def _priors(d=1):
    w = torch.tensor([0.2, 0.5, 0.3])
    mu = torch.tensor([[-1.0], [0.0], [1.5]]) if d == 1 else torch.randn(3, d)
    cov = torch.eye(d).expand(3, d, d) * torch.tensor([0.3, 0.6, 0.2]).reshape(3, 1, 1)
    centers = torch.linspace(-2.0, 2.0, 5).reshape(5, 1) if d == 1 else torch.randn(5, d)
    bin_w = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1])
    return (w, mu, cov), (centers, bin_w)


def make(cls, d=1, **kw):
    gmm, bins = _priors(d)
    if cls == "BMCLoss":
        return inn.BMCLoss(**kw)
    if cls == "GAILoss":
        return inn.GAILoss(gmm, **kw)
    return inn.BNILoss(*bins, **kw)


def functional(cls, module, pred, target, noise_var, **kw):
    """The functional call the module must be equivalent to, with its priors."""
    if cls == "BMCLoss":
        return F.bmc_loss(pred, target, noise_var, **kw)
    if cls == "GAILoss":
        return F.gai_loss(pred, target, noise_var, (module.gmm_weights, module.gmm_means, module.gmm_covariances), **kw)
    return F.bni_loss(pred, target, noise_var, module.bin_centers, module.bin_weights, **kw)


def _params():
    out = []
    for cls in ("BMCLoss", "GAILoss", "BNILoss"):
        for p in backend_params(PUBLIC[cls], CPP[cls]):
            out.append(pytest.param(cls, p.values[0], marks=p.marks, id=f"{cls}-{p.id}"))
    return out


CLASSES = ["BMCLoss", "GAILoss", "BNILoss"]


@pytest.mark.parametrize("cls", CLASSES)
def test_noise_sigma_is_a_parameter_in_state_dict(cls):
    m = make(cls, init_noise_sigma=0.7)
    assert isinstance(m.noise_sigma, nn.Parameter) and m.noise_sigma.requires_grad
    assert m.noise_sigma.shape == () and float(m.noise_sigma) == pytest.approx(0.7)
    assert [n for n, _ in m.named_parameters()] == ["noise_sigma"]
    assert "noise_sigma" in m.state_dict()
    torch.testing.assert_close(m.noise_var, m.noise_sigma.detach() ** 2)
    assert "noise_sigma=0.7" in repr(m) and "learn_noise=True" in repr(m)


@pytest.mark.parametrize("cls", CLASSES)
def test_fixed_noise_is_a_buffer(cls):
    m = make(cls, init_noise_sigma=0.7, learn_noise=False)
    assert not isinstance(m.noise_sigma, nn.Parameter) and not m.noise_sigma.requires_grad
    assert list(m.parameters()) == []
    assert "noise_sigma" in dict(m.named_buffers()) and "noise_sigma" in m.state_dict()
    pred = torch.randn(8, requires_grad=True)
    m(pred, torch.randn(8)).backward()
    assert pred.grad is not None and m.noise_sigma.grad is None


@pytest.mark.parametrize("cls", CLASSES)
def test_priors_are_buffers_copied_from_the_arguments(cls):
    gmm, bins = _priors()
    m = inn.GAILoss(gmm) if cls == "GAILoss" else inn.BNILoss(*bins) if cls == "BNILoss" else inn.BMCLoss()
    buffers = dict(m.named_buffers())
    assert set(PRIOR_BUFFERS[cls]) <= set(buffers) and set(PRIOR_BUFFERS[cls]) <= set(m.state_dict())
    sources = gmm if cls == "GAILoss" else bins if cls == "BNILoss" else ()
    for name, src in zip(PRIOR_BUFFERS[cls], sources):
        assert torch.equal(buffers[name], src) and not buffers[name].requires_grad
        src.add_(1.0)   # the module keeps its own copy
        assert not torch.equal(buffers[name], src)


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip(cls):
    src = make(cls, init_noise_sigma=0.55)
    with torch.no_grad():
        src.noise_sigma.mul_(1.3)
        for name in PRIOR_BUFFERS[cls]:
            getattr(src, name).mul_(1.0)   # unchanged values, but make sure the buffers are what is loaded
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = make(cls, init_noise_sigma=2.0)
    dst.load_state_dict(torch.load(buf))
    assert torch.equal(dst.noise_sigma, src.noise_sigma) and isinstance(dst.noise_sigma, nn.Parameter)
    for name in PRIOR_BUFFERS[cls]:
        assert torch.equal(getattr(dst, name), getattr(src, name))
    pred, target = torch.randn(9), torch.randn(9)
    assert torch.equal(dst(pred, target), src(pred, target))
    # a fixed-noise module loads the same state
    fixed = make(cls, init_noise_sigma=2.0, learn_noise=False)
    fixed.load_state_dict(src.state_dict())
    assert torch.equal(fixed.noise_sigma, src.noise_sigma.detach())
    assert torch.equal(copy.deepcopy(src)(pred, target), src(pred, target))


@pytest.mark.parametrize("cls,backend", _params())
def test_to_float64(cls, backend):
    m = make(cls, init_noise_sigma=0.8, backend=backend).to(torch.float64)
    assert m.noise_sigma.dtype == torch.float64 and isinstance(m.noise_sigma, nn.Parameter)
    for name in PRIOR_BUFFERS[cls]:
        assert getattr(m, name).dtype == torch.float64
    pred = torch.randn(11, dtype=torch.float64, requires_grad=True)
    target = torch.randn(11, dtype=torch.float64)
    loss = m(pred, target)
    assert loss.dtype == torch.float64
    loss.backward()
    assert m.noise_sigma.grad.dtype == torch.float64 and pred.grad.dtype == torch.float64
    ref_sigma = m.noise_sigma.detach().clone().requires_grad_()   # fp32 0.8 widened
    ref_pred = pred.detach().clone().requires_grad_()
    ref = functional(cls, m, ref_pred, target, ref_sigma * ref_sigma, backend="torch")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.noise_sigma.grad, ref_sigma.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.grad, ref_pred.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,backend", _params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("d", [1, 2])
def test_module_equals_functional_and_gradient_reaches_sigma(cls, backend, reduction, d):
    m = make(cls, d=d, init_noise_sigma=0.9, reduction=reduction, backend=backend)
    pred = (torch.randn(13, d) if d > 1 else torch.randn(13)).requires_grad_()
    target = torch.randn(pred.shape)
    mask = torch.rand(13) < 0.8
    out = m(pred, target, mask=mask)
    assert out.shape == ((13,) if reduction == "none" else ())
    g = torch.randn(out.shape) if reduction == "none" else torch.tensor(0.37)
    gp, gs = torch.autograd.grad(out, (pred, m.noise_sigma), g)
    sigma = torch.tensor(0.9, requires_grad=True)
    ref = functional(cls, m, pred, target, sigma * sigma, mask=mask, reduction=reduction, backend=backend)
    ref_gp, ref_gs = torch.autograd.grad(ref, (pred, sigma), g)
    assert torch.equal(out, ref) and torch.equal(gp, ref_gp) and torch.equal(gs, ref_gs)
    assert gs != 0 and torch.isfinite(gs)
    # a few optimiser steps on sigma alone change it (the gradient really drives the parameter)
    opt = torch.optim.SGD([m.noise_sigma], lr=0.05)
    before = float(m.noise_sigma)
    for _ in range(3):
        opt.zero_grad()
        m(pred.detach(), target, mask=mask).sum().backward()
        opt.step()
    assert float(m.noise_sigma) != before


def test_candidates_through_the_module():
    m = inn.BMCLoss(0.8)
    pred, target, cands = torch.randn(7), torch.randn(7), torch.randn(5)
    torch.testing.assert_close(m(pred, target, candidates=cands),
                               F.bmc_loss(pred, target, m.noise_var, candidates=cands), rtol=0, atol=0)
