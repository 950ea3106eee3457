"""Triton op of the weighted regression losses: ``imbreg_fast::triton_weighted_regression_fwd``.

Run with ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_weighted_losses.py -q`` on CPU
(tiny sizes: the interpreter runs one program after another), or on a CUDA machine. Value / gradient
checks of the public functions against the plain-loop oracle over every loss and reduction also run for
the Triton backend in tests/test_weighted_losses.py when TRITON_INTERPRET=1.
"""
import pytest
import torch

import imbreg_fast.functional as F
from naive_weighted_losses import flat, weighted_loss_naive

pytestmark = pytest.mark.requires_triton

REDUCTIONS = ["none", "mean", "sum", "weighted_mean"]
RED_CODE = {"none": 0, "mean": 1, "sum": 2, "weighted_mean": 3}
# (loss code, beta, gamma, activation code, naive kind, naive kwargs)
KINDS = [
    (0, 1.0, 1.0, 0, "mse", {}),
    (1, 1.0, 1.0, 0, "l1", {}),
    (2, 0.3, 1.0, 0, "huber", dict(beta=0.3)),
    (3, 0.2, 1.0, 0, "focal_mse", dict(beta=0.2, gamma=1.0, activation="sigmoid")),
    (3, 0.9, 0.5, 1, "focal_mse", dict(beta=0.9, gamma=0.5, activation="tanh")),
    (4, 0.2, 2.0, 0, "focal_l1", dict(beta=0.2, gamma=2.0, activation="sigmoid")),
    (4, 1.1, 1.7, 1, "focal_l1", dict(beta=1.1, gamma=1.7, activation="tanh")),
]
KIND_IDS = ["mse", "l1", "huber", "focal_mse", "focal_mse_tanh_g0.5", "focal_l1_g2", "focal_l1_tanh_g1.7"]


def kernels():
    from imbreg_fast.triton_kernels import weighted_losses
    return weighted_losses


def inputs(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    target = (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    target[::5] = pred[::5]
    weight = (torch.rand(n, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    mask = (torch.rand(n, generator=g) > 0.25).to(device)
    return pred, target, weight, mask


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_launcher_many_programs_vs_naive(kind, reduction, dtype, triton_device):
    """Small blocks (64 elements, 8 programs, the last partial) exercise the per-program partials and the
    finalize pass."""
    code, beta, gamma, act, naive_kind, naive_kw = kind
    n = 501
    pred, target, weight, mask = inputs(n, dtype, triton_device)
    loss, grad = kernels().weighted_regression_fwd(pred, target, weight, mask, code, beta, gamma, act,
                                                   RED_CODE[reduction], True, block=64)
    ref = weighted_loss_naive(flat(pred.double()), flat(target.double()), flat(weight.double()), flat(mask),
                              naive_kind, reduction, [1.0] * n if reduction == "none" else 1.0, **naive_kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    expected = torch.as_tensor(ref.loss, dtype=torch.float64)
    torch.testing.assert_close(loss.cpu().double(), expected, **tol)
    torch.testing.assert_close(grad.cpu().double(), torch.tensor(ref.grad_pred, dtype=torch.float64), **tol)


def test_deterministic_run_to_run(triton_device):
    pred, target, weight, mask = inputs(3000, torch.float32, triton_device, seed=4)
    runs = [kernels().weighted_regression_fwd(pred, target, weight, mask, 4, 0.2, 1.0, 0, 3, True, block=256)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_fp64_scalars_exact(triton_device):
    """beta = 0.1 is not an fp32 number: fp64 results must use it exactly (scalars travel as fp64 bits)."""
    pred = torch.tensor([0.05, 0.3, -0.07, 2.0], dtype=torch.float64, device=triton_device)
    target = torch.zeros(4, dtype=torch.float64, device=triton_device)
    loss, _ = kernels().weighted_regression_fwd(pred, target, None, None, 2, 0.1, 1.0, 0, 0, False)
    a = pred.abs().cpu()
    expected = torch.where(a < 0.1, 0.5 * a * a / 0.1, a - 0.05)
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("loss_code, beta, gamma, act, reduction, with_mask", [
    (0, 1.0, 1.0, 0, 1, True), (2, 0.5, 1.0, 0, 0, False), (3, 0.2, 1.0, 0, 3, True), (4, 0.7, 2.5, 1, 2, True)])
def test_opcheck(loss_code, beta, gamma, act, reduction, with_mask, triton_device):
    pred = torch.randn(3, 1, 4, 5, device=triton_device, requires_grad=True)
    target = torch.randn(3, 1, 4, 5, device=triton_device)
    weight = torch.rand(3, 1, 4, 5, device=triton_device)
    mask = (torch.rand(3, 1, 4, 5) > 0.3).to(triton_device) if with_mask else None
    op = torch.ops.imbreg_fast.triton_weighted_regression_fwd.default
    torch.library.opcheck(op, (pred, target, weight, mask, loss_code, beta, gamma, act, reduction, True))
    torch.library.opcheck(op, (pred.detach(), target, None, mask, loss_code, beta, gamma, act, reduction, False))


GRADCHECK_CASES = [(F.weighted_focal_l1_loss, dict(activation="tanh", gamma=2.0), red) for red in REDUCTIONS] + [
    (F.weighted_mse_loss, {}, "weighted_mean"), (F.weighted_huber_loss, dict(beta=0.4), "mean"),
    (F.weighted_focal_mse_loss, dict(gamma=0.5), "weighted_mean")]


@pytest.mark.parametrize("fn, kwargs, reduction", GRADCHECK_CASES,
                         ids=[f"{fn.__name__}-{red}" for fn, _, red in GRADCHECK_CASES])
def test_gradcheck_fp64(fn, kwargs, reduction, triton_device):
    """The interpreter (and CUDA) run fp64: full gradcheck w.r.t. pred and target."""
    g = torch.Generator().manual_seed(2)
    shape = (2, 1, 2, 3)
    pred = torch.randn(shape, generator=g, dtype=torch.float64).to(triton_device).requires_grad_(True)
    target = torch.randn(shape, generator=g, dtype=torch.float64).to(triton_device).requires_grad_(True)
    weight = torch.rand(shape, generator=g, dtype=torch.float64).to(triton_device)
    mask = (torch.rand(shape, generator=g) > 0.25).to(triton_device)

    def f(p, t):
        return fn(p, t, weight, mask=mask, reduction=reduction, backend="triton", check_finite=False, **kwargs)

    assert torch.autograd.gradcheck(f, (pred, target), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_compile_fullgraph(triton_device):
    torch._dynamo.reset()
    x = torch.randn(24, 5, device=triton_device)
    y = torch.randn(24, 1, device=triton_device)
    w = torch.rand(24, 1, device=triton_device)
    m = (torch.rand(24, 1) > 0.2).to(triton_device)

    def step(model):
        pred = model(x)
        return F.weighted_focal_l1_loss(pred, y, w, mask=m, reduction="weighted_mean", backend="triton") \
            + F.weighted_mse_loss(pred, y, w, reduction="none", backend="triton").sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1).to(triton_device)
        loss = fn(model)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def test_launcher_errors(triton_device):
    p = torch.randn(8, device=triton_device)
    k = kernels()
    with pytest.raises(ValueError, match="target"):
        k.weighted_regression_fwd(p, p[:4], None, None, 0, 1.0, 1.0, 0, 1, False)
    with pytest.raises(ValueError, match="weight"):
        k.weighted_regression_fwd(p, p, p[:4], None, 0, 1.0, 1.0, 0, 1, False)
    with pytest.raises(ValueError, match="mask"):
        k.weighted_regression_fwd(p, p, None, p, 0, 1.0, 1.0, 0, 1, False)
    with pytest.raises(ValueError, match="beta"):
        k.weighted_regression_fwd(p, p, None, None, 2, 0.0, 1.0, 0, 1, False)
    with pytest.raises(ValueError, match="gamma"):
        k.weighted_regression_fwd(p, p, None, None, 3, 0.2, -1.0, 0, 1, False)
    with pytest.raises(ValueError, match="reduction"):
        k.weighted_regression_fwd(p, p, None, None, 0, 1.0, 1.0, 0, 7, False)
