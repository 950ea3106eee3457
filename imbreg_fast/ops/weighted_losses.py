"""Weighted regression losses (MSE, L1, Huber, Focal-R): backend implementations behind
imbreg_fast.weighted_losses (methods.md §2).

- ``torch``: the reference's formulas (YyzHarry/imbalanced-regression ``loss.py``) in plain PyTorch,
  differentiated by autograd; the CPU fallback and the oracle of the fused kernels.
- ``cpp`` / ``triton``: fused ops ``imbreg_fast::weighted_regression_fwd`` (C++, schema in
  csrc/weighted_losses.cpp) and ``imbreg_fast::triton_weighted_regression_fwd``: one element-wise pass
  returns the loss and d loss / d pred; the registered backward only scales it by ``grad_output``
  (d loss / d target = -d loss / d pred).

Every backend function takes flat ``[N]`` tensors: pred, target, weight (already expanded to ``[N]``, in
the compute dtype, detached) or None, mask ``[N]`` bool or None, and the integer codes below.
"""
from __future__ import annotations

import torch

from .. import _extension
from .._dispatch import register
from .._validation import compute_dtype

OP = "weighted_regression_loss"

LOSSES = {"mse": 0, "l1": 1, "huber": 2, "focal_mse": 3, "focal_l1": 4}
ACTIVATIONS = {"sigmoid": 0, "tanh": 1}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, "weighted_mean": 3}
MSE, L1, HUBER, FOCAL_MSE, FOCAL_L1 = range(5)
NONE, MEAN, SUM, WEIGHTED_MEAN = range(4)

# Argument positions shared by the C++ and Triton ops:
# (pred, target, weight, mask, loss, beta, gamma, activation, reduction, compute_grad)
N_INPUTS, PRED, TARGET, REDUCTION, COMPUTE_GRAD = 10, 0, 1, 8, 9


# --------------------------------------------------------------------------------------------------
# Shared fake kernel and autograd of the fused ops (C++ and Triton alike).
# --------------------------------------------------------------------------------------------------


def fused_fake(pred, target, weight, mask, loss, beta, gamma, activation, reduction, compute_grad):
    """Output metadata: (loss [] or pred's shape, grad_pred pred's shape or [0])."""
    out = pred.new_empty(pred.shape if reduction == NONE else ())
    return out, pred.new_empty(pred.shape if compute_grad else (0,))


def _setup_context(ctx, inputs, output):
    _, grad_pred = output
    ctx.reduction = inputs[REDUCTION]
    ctx.had_grad = inputs[COMPUTE_GRAD]
    ctx.save_for_backward(grad_pred)
    ctx.mark_non_differentiable(grad_pred)


def _backward(ctx, grad_loss, _unused_grad_pred):
    """grad_pred holds d loss / d pred (the reduction's scale included), so with upstream g:
    d/d pred = g * grad_pred ('none': element-wise), d/d target = -d/d pred; weight and mask: none."""
    if not ctx.had_grad:
        raise RuntimeError("imbreg_fast: backward through a weighted loss op called with compute_grad=False")
    (grad_pred,) = ctx.saved_tensors
    grads = [None] * N_INPUTS
    if ctx.needs_input_grad[PRED] or ctx.needs_input_grad[TARGET]:
        g = grad_loss.to(grad_pred.dtype) * grad_pred
        if ctx.needs_input_grad[PRED]:
            grads[PRED] = g
        if ctx.needs_input_grad[TARGET]:
            grads[TARGET] = -g
    return tuple(grads)


def register_fused_autograd(op: str) -> None:
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


def _register_cpp_op() -> None:
    torch.library.register_fake("imbreg_fast::weighted_regression_fwd")(fused_fake)
    register_fused_autograd("imbreg_fast::weighted_regression_fwd")


def _cpp_op_defined() -> bool:
    """The C++ op exists (extension built, and not an older build without this op's schema)."""
    return _extension.cpp_available() and hasattr(torch.ops.imbreg_fast, "weighted_regression_fwd")


CPP_OP_DEFINED = _cpp_op_defined()
if CPP_OP_DEFINED:
    _register_cpp_op()


def compute_grad_flag(pred: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether the fused forward must also produce d loss / d pred (needed for pred or target grads)."""
    return torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)


# --------------------------------------------------------------------------------------------------
# torch backend: the reference's literal formulas, autograd does the gradients.
# --------------------------------------------------------------------------------------------------


def _focal_factor(e_abs, beta, gamma, activation):
    """act(beta |e|)^gamma; act = tanh or 2 sigmoid - 1 (reference). s^gamma is taken where s > 0 only
    (double where): at s = 0 the factor is 0^gamma and its gradient 0, never 0 * inf = NaN for gamma < 1."""
    x = beta * e_abs
    s = torch.tanh(x) if activation == 1 else 2 * torch.sigmoid(x) - 1
    pos = s > 0
    at_zero = 1.0 if gamma == 0 else 0.0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)) ** gamma, torch.full_like(s, at_zero))


def elementwise_loss(p, y, kind, beta, gamma, activation):
    """Unweighted element loss l(pred, target) of the reference's loss.py."""
    e = p - y
    if kind in (MSE, FOCAL_MSE):
        loss = e ** 2
    elif kind in (L1, FOCAL_L1):
        loss = torch.abs(e)
    else:
        l1 = torch.abs(e)
        loss = torch.where(l1 < beta, 0.5 * l1 ** 2 / beta, l1 - 0.5 * beta)
    if kind in (FOCAL_MSE, FOCAL_L1):
        loss = loss * _focal_factor(torch.abs(e), beta, gamma, activation)
    return loss


@register(OP, "torch")
def weighted_regression_torch(pred, target, weight, mask, kind, beta, gamma, activation, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, y = pred.to(dtype), target.to(dtype)
    w = None if weight is None else weight.detach().to(dtype)
    if mask is not None:
        # Dropped elements: e = 0 and w = 0 through torch.where (not indexing, so torch.compile(fullgraph)
        # keeps static shapes); their NaN holes get a zero gradient, never NaN.
        zero = torch.zeros((), dtype=dtype, device=p.device)
        p, y = torch.where(mask, p, zero), torch.where(mask, y, zero)
        w = mask.to(dtype) if w is None else torch.where(mask, w, zero)
    loss = elementwise_loss(p, y, kind, beta, gamma, activation)
    if w is not None:
        loss = loss * w
    if reduction == NONE:
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == SUM:
        out = total
    elif reduction == MEAN or weight is None:
        count = loss.shape[0] if mask is None else mask.sum().to(dtype)
        out = total / (max(count, 1) if mask is None else count.clamp_min(1))
    else:
        out = total / w.sum().clamp_min(torch.finfo(dtype).tiny)   # all weights 0: total is 0, loss 0
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# cpp backend
# --------------------------------------------------------------------------------------------------


def weighted_regression_cpp(pred, target, weight, mask, kind, beta, gamma, activation, reduction):
    grad = compute_grad_flag(pred, target)
    w = None if weight is None else weight.contiguous()
    m = None if mask is None else mask.contiguous()
    return torch.ops.imbreg_fast.weighted_regression_fwd(pred.contiguous(), target.contiguous(), w, m, kind,
                                                         float(beta), float(gamma), activation, reduction, grad)[0]


if CPP_OP_DEFINED:   # an extension built before this op existed: the cpp backend does not offer it
    register(OP, "cpp")(weighted_regression_cpp)
