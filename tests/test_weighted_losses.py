"""Weighted regression losses (MSE, L1, Huber, Focal-R): every backend against the plain-loop oracle
(tests/naive_weighted_losses.py) and the torch backend, every reduction, masks, odd and dense shapes,
grad_output != 1, target gradients, non-contiguous inputs, fp32/fp64, gradcheck, opcheck on the C++ op,
torch.compile, determinism across thread counts, bad inputs.

The Triton backend joins the backend-parametrised tests when TRITON_INTERPRET=1 (sizes kept tiny); its
op-level checks are in tests/test_triton_weighted_losses.py.
"""
import math

import pytest
import torch

import imbreg_fast.functional as F
from conftest import assert_compiled_step_matches_eager, backend_params, interpreted, op_kernel_registered
import imbreg_fast.experiments.published as pub
from naive_weighted_losses import flat, weighted_loss_naive

OP = "weighted_regression_loss"
CPP_OP = "imbreg_fast::weighted_regression_fwd"
BACKENDS = backend_params(OP, (CPP_OP,))
FUSED = backend_params(OP, (CPP_OP,), include_torch=False)
# The interpreter's gradchecks (slow) are the trimmed set of tests/test_triton_weighted_losses.py.
GRADCHECK_BACKENDS = [p for p in BACKENDS if not interpreted(p.values[0])]

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}

# (name, functional, kwargs, naive kind, naive kwargs)
LOSSES = [
    ("mse", F.weighted_mse_loss, {}, "mse", {}),
    ("l1", F.weighted_l1_loss, {}, "l1", {}),
    ("huber", F.weighted_huber_loss, {}, "huber", dict(beta=1.0)),
    ("huber_b0.3", F.weighted_huber_loss, dict(beta=0.3), "huber", dict(beta=0.3)),
    ("focal_mse", F.weighted_focal_mse_loss, {}, "focal_mse", dict(beta=0.2, gamma=1.0, activation="sigmoid")),
    ("focal_mse_tanh_g2", F.weighted_focal_mse_loss, dict(activation="tanh", beta=0.5, gamma=2.0), "focal_mse",
     dict(beta=0.5, gamma=2.0, activation="tanh")),
    ("focal_mse_g0.5", F.weighted_focal_mse_loss, dict(beta=1.3, gamma=0.5), "focal_mse",
     dict(beta=1.3, gamma=0.5, activation="sigmoid")),
    ("focal_l1", F.weighted_focal_l1_loss, {}, "focal_l1", dict(beta=0.2, gamma=1.0, activation="sigmoid")),
    ("focal_l1_tanh_g3", F.weighted_focal_l1_loss, dict(activation="tanh", beta=0.7, gamma=3.0), "focal_l1",
     dict(beta=0.7, gamma=3.0, activation="tanh")),
    ("focal_l1_g0", F.weighted_focal_l1_loss, dict(gamma=0.0), "focal_l1",
     dict(beta=0.2, gamma=0.0, activation="sigmoid")),
]
LOSS_IDS = [c[0] for c in LOSSES]
REDUCTIONS = ["none", "mean", "sum", "weighted_mean"]


def make_inputs(shape, dtype, *, weight=True, mask=True, zeros=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0
    target = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0
    if zeros:                                   # exact e = 0 elements (kinks, focal factor 0)
        flat_t = target.reshape(-1)
        flat_t[::7] = pred.reshape(-1)[::7]
    w = torch.rand(shape, generator=g, dtype=torch.float64) * 3.0 if weight else None
    m = (torch.rand(shape, generator=g) > 0.3) if mask else None
    if m is not None:                           # NaN holes at dropped positions must not matter
        pred = torch.where(m, pred, torch.full_like(pred, float("nan")))
        if w is not None:
            w = torch.where(m, w, torch.full_like(w, float("nan")))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(pred), cast(target), cast(w), m


def grad_output_for(reduction, shape, dtype):
    if reduction == "none":
        return torch.linspace(-1.5, 2.0, math.prod(shape), dtype=dtype).reshape(shape)
    return torch.tensor(1.7, dtype=dtype)


def run(fn, kwargs, pred, target, weight, mask, reduction, backend, grad_out, *, target_grad=True):
    p = pred.detach().clone().requires_grad_(True)
    t = target.detach().clone().requires_grad_(target_grad)
    loss = fn(p, t, weight, mask=mask, reduction=reduction, backend=backend, check_finite=mask is None, **kwargs)
    grads = torch.autograd.grad((loss * grad_out).sum(), [p, t] if target_grad else [p])
    return loss.detach(), grads


def naive_of(naive_kind, naive_kw, pred, target, weight, mask, reduction, grad_out):
    return weighted_loss_naive(flat(pred.double()), flat(target.double()),
                               None if weight is None else flat(weight.double()),
                               None if mask is None else flat(mask), naive_kind, reduction,
                               flat(grad_out.double()) if reduction == "none" else float(grad_out),
                               **naive_kw)


def assert_close_scaled(got, expected, scale, tol, what):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    got = got.double().reshape(expected.shape)
    err = (got - expected).abs()
    bound = tol["atol"] * max(scale, 1.0) + tol["rtol"] * expected.abs()
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max()):.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["plain", "weight", "weight_mask", "mask"])
def test_matches_naive(backend, case, reduction, dtype, variant):
    _, fn, kwargs, naive_kind, naive_kw = case
    shape = (2, 1, 5, 7) if variant != "plain" else (37,)
    pred, target, w, m = make_inputs(shape, dtype, weight="weight" in variant, mask="mask" in variant)
    g = grad_output_for(reduction, shape, dtype)
    loss, (gp, gt) = run(fn, kwargs, pred, target, w, m, reduction, backend, g)
    ref = naive_of(naive_kind, naive_kw, pred, target, w, m, reduction, g)
    tol = TOL[dtype]
    assert loss.dtype == dtype and loss.shape == (shape if reduction == "none" else ())
    assert_close_scaled(loss, ref.loss, ref.loss_scale, tol, "loss")
    gscale = max(abs(v) for v in ref.grad_pred) if ref.grad_pred else 1.0
    assert_close_scaled(gp, ref.grad_pred, gscale, tol, "grad pred")
    assert_close_scaled(gt, [-v for v in ref.grad_pred], gscale, tol, "grad target")
    if m is not None:
        assert bool((gp[~m] == 0).all()) and bool(torch.isfinite(gp).all())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_matches_torch_multiblock(backend, case, reduction):
    """Several kernel blocks (C++: 4096 elements, Triton: 1024), odd size, fp32 and fp64."""
    _, fn, kwargs, _, _ = case
    shape = (2, 1, 31, 37) if interpreted(backend) else (3, 1, 61, 67)
    for dtype in (torch.float32, torch.float64):
        pred, target, w, m = make_inputs(shape, dtype, seed=3)
        g = grad_output_for(reduction, shape, dtype)
        ref_loss, ref_grads = run(fn, kwargs, pred, target, w, m, reduction, "torch", g)
        loss, grads = run(fn, kwargs, pred, target, w, m, reduction, backend, g)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(loss, ref_loss, **tol)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_broadcast_weight(backend):
    base_p = torch.randn(2, 7, 1, 9, dtype=torch.float64)
    pred = base_p.permute(0, 2, 3, 1)                      # [2, 1, 9, 7], non-contiguous
    target = torch.randn(2, 1, 7, 9, dtype=torch.float64).transpose(2, 3)
    weight = torch.rand(2, 1, 1, 1, dtype=torch.float64)   # per-image weights, expanded
    mask = (torch.rand(2, 1, 7, 9) > 0.2).transpose(2, 3)
    assert not pred.is_contiguous() and not target.is_contiguous()
    for fn in (F.weighted_mse_loss, F.weighted_focal_l1_loss):
        for red in REDUCTIONS:
            g = grad_output_for(red, pred.shape, torch.float64)
            loss, grads = run(fn, {}, pred, target, weight, mask, red, backend, g)
            ref = naive_of("mse" if fn is F.weighted_mse_loss else "focal_l1",
                           {} if fn is F.weighted_mse_loss else dict(beta=0.2, gamma=1.0, activation="sigmoid"),
                           pred, target, weight.expand_as(target), mask, red, g)
            assert_close_scaled(loss, ref.loss, ref.loss_scale, TOL[torch.float64], "loss")
            assert_close_scaled(grads[0], ref.grad_pred, 1.0, TOL[torch.float64], "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_formulas(backend):
    """'mean' is the published loss.py's torch.mean(w * l) (with [B, 1] weights), Focal-R included."""
    pred, target = torch.randn(33, 1, dtype=torch.float64) * 3, torch.randn(33, 1, dtype=torch.float64) * 3
    w = torch.rand(33, 1, dtype=torch.float64)
    pairs = [
        (F.weighted_mse_loss(pred, target, w, backend=backend), pub.published_weighted_mse_loss(pred, target, w)),
        (F.weighted_l1_loss(pred, target, w, backend=backend), pub.published_weighted_l1_loss(pred, target, w)),
        (F.weighted_huber_loss(pred, target, w, backend=backend), pub.published_weighted_huber_loss(pred, target, w)),
        (F.weighted_huber_loss(pred, target, w, beta=2.5, backend=backend),
         pub.published_weighted_huber_loss(pred, target, w, beta=2.5)),
        (F.weighted_focal_mse_loss(pred, target, w, backend=backend),
         pub.published_weighted_focal_mse_loss(pred, target, w)),
        (F.weighted_focal_mse_loss(pred, target, w, activation="tanh", beta=0.4, gamma=2, backend=backend),
         pub.published_weighted_focal_mse_loss(pred, target, w, activate="tanh", beta=0.4, gamma=2)),
        (F.weighted_focal_l1_loss(pred, target, w, backend=backend),
         pub.published_weighted_focal_l1_loss(pred, target, w)),
        (F.weighted_focal_l1_loss(pred, target, w, activation="tanh", gamma=3, backend=backend),
         pub.published_weighted_focal_l1_loss(pred, target, w, activate="tanh", gamma=3)),
        (F.weighted_l1_loss(pred, target, backend=backend), pub.published_weighted_l1_loss(pred, target)),
    ]
    for i, (got, ref) in enumerate(pairs):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14, msg=f"case {i}")
    e = pred - target
    wm = F.weighted_mse_loss(pred, target, w, reduction="weighted_mean", backend=backend)
    torch.testing.assert_close(wm, (e ** 2 * w).sum() / w.sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mask_and_zero_weights(backend):
    pred = torch.randn(4, 1, 3, 5, requires_grad=True)
    target = torch.randn(4, 1, 3, 5)
    none = torch.zeros(4, 1, 3, 5, dtype=torch.bool)
    for red in ("mean", "weighted_mean", "sum"):
        loss = F.weighted_focal_mse_loss(pred, target, torch.rand(4, 1, 3, 5), mask=none, reduction=red,
                                         backend=backend)
        (g,) = torch.autograd.grad(loss, pred)
        assert float(loss) == 0.0 and bool((g == 0).all())
    loss = F.weighted_mse_loss(pred, target, torch.zeros(4, 1, 3, 5), reduction="weighted_mean", backend=backend)
    (g,) = torch.autograd.grad(loss, pred)
    assert float(loss) == 0.0 and bool((g == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-42), (torch.float32, 1e-40), (torch.float64, 1e-312),
                                        (torch.float64, 3e-309)])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_weighted_mean_of_subnormal_weights(backend, dtype, tiny, masked):
    """'weighted_mean' is scale-free in the weights: subnormal weights (whose sum's inverse overflows) give the
    loss and gradient of the same weights times 2^200, exactly representable; no inf, no clamped denominator."""
    g = torch.Generator().manual_seed(3)
    n = 37
    pred = torch.randn(n, generator=g, dtype=dtype).requires_grad_()
    target = torch.randn(n, generator=g, dtype=dtype)
    w = (torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.5) * tiny
    w = w.to(dtype)                                   # subnormal in dtype: the values the losses see
    mask = (torch.rand(n, generator=g) > 0.3) if masked else None
    loss = F.weighted_mse_loss(pred, target, w, mask=mask, reduction="weighted_mean", backend=backend)
    (grad,) = torch.autograd.grad(loss, pred)
    # the reference: the same weights scaled by 2^200 (exact in float64), the formula in plain float64 loops
    w64 = w.double() * 2.0 ** 200
    kept = [i for i in range(n) if mask is None or bool(mask[i])]
    total_w = sum(float(w64[i]) for i in kept)
    e = (pred.detach().double() - target.double()).tolist()
    expected = sum(float(w64[i]) * e[i] ** 2 for i in kept) / total_w
    expected_grad = torch.zeros(n, dtype=torch.float64)
    for i in kept:
        expected_grad[i] = float(w64[i]) * 2 * e[i] / total_w
    # subnormal weights carry fewer significant bits, so the tolerance is that of their own rounding
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), **tol)
    torch.testing.assert_close(grad.double(), expected_grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_is_constant(backend):
    pred = torch.randn(10, requires_grad=True)
    weight = torch.rand(10, requires_grad=True)
    F.weighted_l1_loss(pred, torch.randn(10), weight, backend=backend).backward()
    assert weight.grad is None and pred.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_weightless(backend):
    pred, target = torch.randn(3, 1, 4, 6), torch.randn(3, 1, 4, 6)
    with torch.no_grad():
        a = F.weighted_huber_loss(pred, target, backend=backend)
    b = F.weighted_huber_loss(pred, target, torch.ones(1), backend=backend)
    c = F.weighted_huber_loss(pred, target, reduction="weighted_mean", backend=backend)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 casts truncate (docs/triton-interpreter.md)")
    pred, target, w, m = make_inputs((3, 1, 5, 9), torch.float32, seed=5)
    p16 = pred.to(dtype).requires_grad_(True)
    loss = F.weighted_focal_mse_loss(p16, target.to(dtype), w, mask=m, check_finite=False, backend=backend)
    loss.backward()
    p32 = p16.detach().float().requires_grad_(True)
    ref = F.weighted_focal_mse_loss(p32, target.to(dtype).float(), w, mask=m, check_finite=False, backend="torch")
    ref.backward()
    assert loss.dtype == dtype and p16.grad.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.float16 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(p16.grad.float(), p32.grad, **tol)


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, case, reduction):
    _, fn, kwargs, _, _ = case
    pred, target, w, m = make_inputs((2, 1, 3, 4), torch.float64, zeros=False, seed=11)
    pred = torch.where(m, pred, torch.zeros_like(pred))   # gradcheck perturbs every element
    p = pred.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    w = torch.where(m, w, torch.zeros_like(w))

    def f(p_, t_):
        return fn(p_, t_, w, mask=m, reduction=reduction, backend=backend, check_finite=False, **kwargs)

    assert torch.autograd.gradcheck(f, (p, t), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# C++ op: opcheck, torch.compile, determinism
# --------------------------------------------------------------------------------------------------

requires_cpp_op = pytest.mark.skipif(not op_kernel_registered(CPP_OP),
                                     reason="C++ CPU kernel of weighted_regression_fwd not built")


OPCHECK_CASES = [  # (loss, beta, gamma, activation, reduction, with_mask, dtype)
    (0, 1.0, 1.0, 0, 1, True, torch.float32), (1, 1.0, 1.0, 0, 0, False, torch.float64),
    (2, 0.5, 1.0, 0, 3, True, torch.float64), (2, 1.0, 1.0, 0, 2, False, torch.float32),
    (3, 0.2, 1.0, 0, 2, True, torch.float32), (3, 1.3, 0.5, 0, 1, True, torch.float64),
    (4, 0.7, 2.5, 1, 3, False, torch.float32), (4, 0.7, 2.5, 1, 0, True, torch.float64),
]


@requires_cpp_op
@pytest.mark.parametrize("loss_code, beta, gamma, act, reduction, with_mask, dtype", OPCHECK_CASES)
def test_opcheck_cpp(loss_code, beta, gamma, act, reduction, with_mask, dtype):
    pred = torch.randn(3, 1, 5, 7, dtype=dtype, requires_grad=True)
    target = torch.randn(3, 1, 5, 7, dtype=dtype)
    weight = torch.rand(3, 1, 5, 7, dtype=dtype)
    mask = torch.rand(3, 1, 5, 7) > 0.3 if with_mask else None
    args = (pred, target, weight, mask, loss_code, beta, gamma, act, reduction, True)
    torch.library.opcheck(torch.ops.imbreg_fast.weighted_regression_fwd.default, args)
    args_no_grad = (pred.detach(), target, None, mask, loss_code, beta, gamma, act, reduction, False)
    torch.library.opcheck(torch.ops.imbreg_fast.weighted_regression_fwd.default, args_no_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_training_step(backend, compile_backend):
    """torch.compile(fullgraph=True) of model forward + losses (fake kernel, registered autograd), then
    backward: equals eager."""
    if compile_backend == "inductor" and backend != "cpp":
        pytest.skip("inductor code generation around the opaque op: once, with the cpp backend")
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    w = torch.rand(40, 1, dtype=torch.float64)
    m = torch.rand(40, 1) > 0.2

    def step(model):
        pred = model(x)
        return (F.weighted_focal_mse_loss(pred, y, w, mask=m, reduction="weighted_mean", backend=backend,
                                          activation="tanh", gamma=1.5)
                + F.weighted_huber_loss(pred, y, w, backend=backend)
                + F.weighted_l1_loss(pred, y, reduction="none", backend=backend).mean())

    assert_compiled_step_matches_eager(
        step, lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double(), compile_backend)


@requires_cpp_op
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpp_deterministic_across_threads(reduction):
    pred, target, w, m = make_inputs((4, 1, 97, 131), torch.float32, seed=21)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(F.weighted_focal_l1_loss, {}, pred, target, w, m, reduction, "cpp",
                               grad_output_for(reduction, pred.shape, torch.float32)))
    finally:
        torch.set_num_threads(old)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    p, t = torch.randn(4, 1, 3, 5), torch.randn(4, 1, 3, 5)
    with pytest.raises(ValueError, match="weight"):
        F.weighted_mse_loss(p, t, torch.rand(3, 1, 3, 5), backend=backend)
    with pytest.raises(ValueError, match="weight"):
        F.weighted_mse_loss(p, t, torch.rand(2, 4, 1, 3, 5), backend=backend)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        F.weighted_mse_loss(p, t, -torch.rand(4, 1, 3, 5), backend=backend)
    with pytest.raises(ValueError, match="weight contains NaN"):
        F.weighted_mse_loss(p, t, torch.full((4, 1, 3, 5), float("nan")), backend=backend)
    with pytest.raises(TypeError, match="weight"):
        F.weighted_mse_loss(p, t, torch.ones(4, 1, 3, 5, dtype=torch.long), backend=backend)
    bad = p.clone()
    bad[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="pred contains NaN"):
        F.weighted_l1_loss(bad, t, backend=backend)
    with pytest.raises(ValueError, match="target contains NaN"):
        F.weighted_l1_loss(p, bad, backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        F.weighted_l1_loss(p, t[:2], backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        F.weighted_l1_loss(p, t.double(), backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        F.weighted_l1_loss(p, t, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="mask"):
        F.weighted_l1_loss(p, t, mask=torch.ones(4, 3, 5, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="mask"):
        F.weighted_l1_loss(p, t, mask=torch.ones(4, 1, 3, 5), backend=backend)
    for kw, word in [(dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("inf")), "beta")]:
        with pytest.raises(ValueError, match=word):
            F.weighted_huber_loss(p, t, backend=backend, **kw)
    for kw, word in [(dict(beta=0.0), "beta"), (dict(gamma=-0.5), "gamma"), (dict(gamma=float("nan")), "gamma"),
                     (dict(activation="relu"), "activation")]:
        with pytest.raises(ValueError, match=word):
            F.weighted_focal_mse_loss(p, t, backend=backend, **kw)
        with pytest.raises(ValueError, match=word):
            F.weighted_focal_l1_loss(p, t, backend=backend, **kw)
    with pytest.raises(TypeError, match="gamma"):
        F.weighted_focal_l1_loss(p, t, gamma="1", backend=backend)
    # NaN at dropped positions is fine
    masked = F.weighted_l1_loss(bad, t, mask=torch.isfinite(bad), backend=backend)
    assert bool(torch.isfinite(masked))


def test_unknown_backend_and_unavailable():
    p = torch.randn(5)
    with pytest.raises(ValueError, match="backend"):
        F.weighted_mse_loss(p, p, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functional(backend):
    from imbreg_fast import nn as inn

    pred, target, w, m = make_inputs((2, 1, 4, 6), torch.float64, seed=8)
    pairs = [
        (inn.WeightedMSELoss(backend=backend), F.weighted_mse_loss, {}),
        (inn.WeightedL1Loss(reduction="sum", backend=backend), F.weighted_l1_loss, dict(reduction="sum")),
        (inn.WeightedHuberLoss(0.5, reduction="weighted_mean", backend=backend), F.weighted_huber_loss,
         dict(beta=0.5, reduction="weighted_mean")),
        (inn.WeightedFocalMSELoss("tanh", 0.3, 2.0, backend=backend), F.weighted_focal_mse_loss,
         dict(activation="tanh", beta=0.3, gamma=2.0)),
        (inn.WeightedFocalL1Loss(reduction="none", backend=backend), F.weighted_focal_l1_loss,
         dict(reduction="none")),
    ]
    for module, fn, kwargs in pairs:
        got = module(pred, target, w, mask=m)
        ref = fn(pred, target, w, mask=m, backend=backend, **kwargs)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert repr(module).startswith(type(module).__name__)
    with pytest.raises(ValueError, match="reduction"):
        inn.WeightedMSELoss(reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        inn.WeightedHuberLoss(beta=-1.0)
    with pytest.raises(ValueError, match="activation"):
        inn.WeightedFocalL1Loss(activation="relu")
    with pytest.raises(ValueError, match="gamma"):
        inn.WeightedFocalMSELoss(gamma=-2.0)
