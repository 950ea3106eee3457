"""Weighted regression losses (MSE, L1, Huber, Focal-R): the glue of the family's three backends
(docs/methods.md §2).

- ``torch``: the reference's formulas (YyzHarry/imbalanced-regression ``loss.py``) in plain PyTorch,
  differentiated by autograd; the fallback and the oracle of the fused kernels.
- ``cpp``: op ``imbreg_fast::weighted_regression_fwd`` (schema csrc/weighted_losses.cpp, kernel
  csrc/cpu/weighted_losses_kernel.cpp).
- ``triton``: op ``imbreg_fast::triton_weighted_regression_fwd``, a custom op around the launcher of
  ``imbreg_fast.triton_kernels.weighted_losses`` (imported on the first call), same contract.

The fused ops make one element-wise pass that returns the loss and d loss / d pred; the registered
backward only scales it by ``grad_output`` (d loss / d target = -d loss / d pred). Every backend function
takes flat ``[N]`` tensors: pred, target, weight (expanded to ``[N]``, compute dtype, detached) or None,
mask ``[N]`` bool or None, the loss kind and activation codes below and a reduction code
(``imbreg_fast._reduction``, ``weighted_mean`` included).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _reduction
from .._dispatch import register
from .._validation import compute_dtype
from ._registration import ForwardGrad, grad_required, register_fused_op

OP = "weighted_regression_loss"   # the public op of the dispatcher

MSE, L1, HUBER, FOCAL_MSE, FOCAL_L1 = range(5)   # loss kinds of the op schema
ACTIVATIONS = {"sigmoid": 0, "tanh": 1}          # focal factor act(beta |e|)


# --------------------------------------------------------------------------------------------------
# Fake kernel and autograd shared by the fused ops (C++ and Triton alike).
# --------------------------------------------------------------------------------------------------


def _fake(args):
    """Output metadata: (loss [] or pred's shape, grad_pred pred's shape or [0])."""
    out = args.pred.new_empty(args.pred.shape if args.reduction == _reduction.NONE else ())
    return out, args.pred.new_empty(args.pred.shape if args.compute_grad else (0,))


def _setup_context(ctx, args, output):
    _, grad_pred = output
    ctx.had_grad = args.compute_grad
    ctx.mark_non_differentiable(grad_pred)
    return (ForwardGrad(grad_pred),)


def _backward(ctx, saved, grad_loss, _unused_grad_pred):
    """grad_pred holds d loss / d pred (the reduction's scale included), so with upstream g:
    d/d pred = g * grad_pred ('none': element-wise), d/d target = -d/d pred; weight and mask: none."""
    if not ctx.had_grad:
        raise RuntimeError("imbreg_fast: backward through a weighted loss op called with compute_grad=False")
    (grad_pred,) = saved
    grads = {}
    if ctx.needs_grad["pred"] or ctx.needs_grad["target"]:
        g = grad_pred.scaled(grad_loss)
        if ctx.needs_grad["pred"]:
            grads["pred"] = g
        if ctx.needs_grad["target"]:
            grads["target"] = -g
    return grads


AUTOGRAD = dict(fake=_fake, setup_context=_setup_context, backward=_backward)


def compute_grad_flag(pred: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether the fused forward must also produce d loss / d pred (needed for pred or target grads)."""
    return grad_required(pred, target)


# --------------------------------------------------------------------------------------------------
# torch backend: the reference's literal formulas, autograd does the gradients.
# --------------------------------------------------------------------------------------------------


def _focal_factor(e_abs, beta, gamma, activation):
    """act(beta |e|)^gamma; act = tanh or 2 sigmoid - 1 (reference). s^gamma is taken where s > 0 only
    (double where): at s = 0 the factor is 0^gamma and its gradient 0, never 0 * inf = NaN for gamma < 1."""
    x = beta * e_abs
    s = torch.tanh(x) if activation == ACTIVATIONS["tanh"] else 2 * torch.sigmoid(x) - 1
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
    # 'weighted_mean' as sum_i (w_i / sum w) l_i: the normalised weights stay exact to rounding when the
    # weights are subnormal, where 1 / sum w (and so the gradient of a division) would overflow; all weights
    # 0: loss 0, gradient 0
    normalised = reduction == _reduction.WEIGHTED_MEAN and weight is not None
    if w is not None:
        if normalised:
            total_w = w.sum()
            w = w / torch.where(total_w > 0, total_w, torch.ones_like(total_w))
        loss = loss * w
    if reduction == _reduction.NONE:
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == _reduction.SUM or normalised:
        out = total
    else:   # 'mean', or 'weighted_mean' without weights
        count = loss.shape[0] if mask is None else mask.sum().to(dtype)
        out = total / (max(count, 1) if mask is None else count.clamp_min(1))
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Fused backends (cpp, triton)
# --------------------------------------------------------------------------------------------------


def _fused_impl(op):
    def weighted_regression(pred, target, weight, mask, kind, beta, gamma, activation, reduction, *,
                            check_finite=False):
        """``check_finite=True``: the kernel checks pred, target and weight (finite, weight >= 0) at kept
        elements in its own pass and raises ValueError naming the argument (docs/methods.md §2)."""
        grad = compute_grad_flag(pred, target)
        w = None if weight is None else weight.contiguous()
        m = None if mask is None else mask.contiguous()
        return op(pred.contiguous(), target.contiguous(), w, m, kind, float(beta), float(gamma), activation,
                  reduction, grad, check_finite)[0]

    return weighted_regression


@torch.library.custom_op("imbreg_fast::triton_weighted_regression_fwd", mutates_args=())
def triton_weighted_regression_fwd(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                                   mask: Optional[torch.Tensor], loss: int, beta: float, gamma: float,
                                   activation: int, reduction: int, compute_grad: bool,
                                   check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton weighted regression loss: (loss, d loss/d pred); see ``imbreg_fast::weighted_regression_fwd``."""
    from ..triton_kernels import weighted_losses

    return weighted_losses.weighted_regression_fwd(pred, target, weight, mask, loss, beta, gamma, activation,
                                                   reduction, compute_grad, check_finite=check_finite)


def register_backends(cpp: bool) -> None:
    """Register the family's backends with the dispatcher: torch, then cpp (when the extension is
    loaded), then triton."""
    register(OP, "torch")(weighted_regression_torch)
    if cpp:
        register(OP, "cpp")(_fused_impl(register_fused_op("imbreg_fast::weighted_regression_fwd", **AUTOGRAD)))
    register(OP, "triton")(_fused_impl(register_fused_op("imbreg_fast::triton_weighted_regression_fwd", **AUTOGRAD)))
