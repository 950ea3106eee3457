"""ConR, contrastive regularisation for deep imbalanced regression (Keramati et al., ICLR 2024): the glue of
its three backends (docs/methods.md, ConR section).

Definitions (n anchors; every backend computes these, in fp64 for fp64 features and fp32 otherwise)::

    z_i   = f_i / max(|f_i|, 1e-12)                         (F.normalize: a zero row gives z_i = 0)
    S_ij  = z_i . z_j / tau
    P_i   = {j != i : |y_i - y_j| <= w}                       positives
    N_i   = {j : |y_i - y_j| > w and |p_i - p_j| <= w}        negatives (p: predictions, never differentiated)
    a_ij  = 1 (j in P_i),  omega_i exp(e |y_i - y_j|) (j in N_i),  0 otherwise
    D_i   = sum_j a_ij exp(S_ij) + m_i,   m_i = n - |P_i| (published denominator) or 0 (clean)
    l_i   = log D_i - mean_{j in P_i} S_ij          if |P_i| > 0 and |N_i| > 0, else 0
    L_i   = omega_i l_i;  'mean' = sum_i L_i / n (all anchors counted), 'sum', 'none' = [L_i]

m_i reproduces the published code, whose masked similarity matrix keeps exp(0) = 1 in every column that
is not a positive (the anchor's own column included), so m_i >= 1. log D_i is a max-shifted
log-sum-exp over the terms S_ij + log a_ij and, for the published denominator, log m_i.

Gradient (used by the fused kernels; the torch backend leaves it to autograd). With the reduction's per-
anchor coefficient c_i = r omega_i [valid_i] (r = 1/n for 'mean', 1 for 'sum', the incoming gradient g_i
for 'none'):

    d l_i / d S_ij = a_ij exp(S_ij) / D_i - [j in P_i] / |P_i|  =: G_ij
    H_kj = c_k G_kj + c_j G_jk         (S is symmetric and S_kj appears in rows k and j)
    d L / d z_k = (1/tau) sum_j H_kj z_j
    d L / d f_k = (g - z_k (z_k . g)) / |f_k|   with g = d L / d z_k  (|f_k| > 1e-12; else g / 1e-12)

- ``torch``: the formulas above in plain PyTorch (masks over the [n, n] matrices, ``torch.logsumexp``),
  differentiated by autograd; the oracle of the fused kernels.
- ``cpp``: op ``imbreg_fast::conr_fwd`` (schema csrc/conr.cpp, kernel csrc/cpu/conr_kernel.cpp): loss and
  d loss / d features in one call; the backward scales. ``'none'``: op ``imbreg_fast::conr_bwd`` computes
  the gradient for the incoming per-anchor gradient in the backward.
- ``triton``: ``imbreg_fast::triton_conr_fwd`` / ``triton_conr_bwd``, custom ops around the launchers of
  ``imbreg_fast.triton_kernels.conr``, same contract.

Every backend function takes ``features [n, d]`` (any floating dtype), ``targets``, ``preds`` ``[n]`` and
``weights`` ``[n]`` or None, all three detached and in the compute dtype, then window, temperature,
pushing, published_denominator and the reduction code.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _reduction
from .._dispatch import register
from .._validation import compute_dtype
from ._registration import ForwardGrad, grad_required, register_fused_op

OP = "conr_loss"   # the public op of the dispatcher

NORM_EPS = 1e-12   # F.normalize's default eps


# --------------------------------------------------------------------------------------------------
# torch backend: the definitions, autograd does the gradients.
# --------------------------------------------------------------------------------------------------


def conr_torch(features, targets, preds, weights, window, temperature, pushing, published_denominator,
               reduction):
    out_dtype, dtype = features.dtype, compute_dtype(features.dtype)
    n = features.shape[0]
    z = torch.nn.functional.normalize(features.to(dtype), dim=1, eps=NORM_EPS)
    s = z @ z.T / temperature                                           # [n, n]
    y, p = targets.to(dtype), preds.detach().to(dtype)
    dy = (y[:, None] - y[None, :]).abs()
    dp = (p[:, None] - p[None, :]).abs()
    not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
    pos = (dy <= window) & not_self
    neg = (dy > window) & (dp <= window)
    n_pos = pos.sum(1)
    valid = (n_pos > 0) & neg.any(1)
    if weights is None:
        log_w = torch.zeros(n, dtype=dtype, device=features.device)
    else:
        log_w = weights.detach().to(dtype).log()                        # omega = 0: -inf, its terms vanish
    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=features.device)
    terms = torch.where(pos, s, torch.where(neg, s + log_w[:, None] + pushing * dy, minus_inf))
    if published_denominator:
        ones = (n - n_pos).to(dtype).log()                              # log m_i, m_i >= 1
        terms = torch.cat([terms, ones[:, None]], dim=1)
    # invalid anchors: finite stand-in terms (their loss is dropped below; a row of -inf would give a NaN
    # gradient through logsumexp even when multiplied by 0)
    terms = torch.where(valid[:, None], terms, torch.zeros((), dtype=dtype, device=features.device))
    log_d = torch.logsumexp(terms, dim=1)
    mean_pos = torch.where(pos, s, 0.0).sum(1) / n_pos.clamp_min(1).to(dtype)
    per_anchor = log_d - mean_pos
    if weights is not None:
        per_anchor = per_anchor * weights.detach().to(dtype)
    per_anchor = torch.where(valid, per_anchor, 0.0)
    if reduction == _reduction.NONE:
        return per_anchor.to(out_dtype)
    total = per_anchor.sum()
    if reduction == _reduction.MEAN:
        total = total / max(n, 1)
    return total.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Fake kernels and autograd shared by the fused ops (C++ and Triton alike).
# --------------------------------------------------------------------------------------------------


def _fake(args):
    """(loss [] or [n] ('none'), grad_features [n, d] (mean/sum with compute_grad) or [0])."""
    n = args.features.shape[0]
    loss = args.features.new_empty((n,) if args.reduction == _reduction.NONE else ())
    keep = args.compute_grad and args.reduction != _reduction.NONE
    return loss, args.features.new_empty(args.features.shape if keep else (0,))


def _setup_context(ctx, args, output):
    _, grad_features = output
    ctx.reduction = args.reduction
    ctx.had_grad = args.compute_grad
    ctx.scalars = (args.window, args.temperature, args.pushing, args.published_denominator)
    ctx.mark_non_differentiable(grad_features)
    if args.reduction == _reduction.NONE:
        # the gradient depends on the incoming per-anchor gradient: recomputed by the backward op
        return (args.features, args.targets, args.preds,
                args.weights if args.weights is not None else args.targets.new_empty(0))
    return (ForwardGrad(grad_features),)


def _backward_with(bwd_op):
    def backward(ctx, saved, grad_loss, _unused_grad_features):
        """mean/sum: the forward's d loss / d features times g. 'none': the backward op with c_i = g_i."""
        if not ctx.had_grad:
            raise RuntimeError("imbreg_fast: backward through a ConR op called with compute_grad=False")
        if not ctx.needs_grad["features"]:
            return {}
        if ctx.reduction == _reduction.NONE:
            features, targets, preds, weights = saved
            weights = weights if weights.numel() == targets.numel() and targets.numel() > 0 else None
            g = grad_loss.to(targets.dtype).contiguous()
            return {"features": bwd_op(features, targets, preds, weights, g, *ctx.scalars)}
        (grad_features,) = saved
        return {"features": grad_features.scaled(grad_loss)}
    return backward


def _bwd_fake(args):
    return args.features.new_empty(args.features.shape)


# --------------------------------------------------------------------------------------------------
# Fused backends (cpp, triton)
# --------------------------------------------------------------------------------------------------


def _fused_impl(op):
    def conr(features, targets, preds, weights, window, temperature, pushing, published_denominator, reduction,
             *, check_finite=False):
        """``check_finite=True``: the kernel checks features, targets, preds and weights (finite, weights >= 0)
        and raises ValueError naming the argument."""
        grad = grad_required(features)
        w = None if weights is None else weights.contiguous()
        return op(features.contiguous(), targets.contiguous(), preds.contiguous(), w, float(window),
                  float(temperature), float(pushing), bool(published_denominator), reduction, grad,
                  check_finite)[0]

    return conr


@torch.library.custom_op("imbreg_fast::triton_conr_fwd", mutates_args=())
def triton_conr_fwd(features: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                    weights: Optional[torch.Tensor], window: float, temperature: float, pushing: float,
                    published_denominator: bool, reduction: int, compute_grad: bool,
                    check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ConR: (loss, d loss / d features); see ``imbreg_fast::conr_fwd``."""
    from ..triton_kernels import conr

    return conr.conr_fwd(features, targets, preds, weights, window, temperature, pushing, published_denominator,
                         reduction, compute_grad, check_finite=check_finite)


@torch.library.custom_op("imbreg_fast::triton_conr_bwd", mutates_args=())
def triton_conr_bwd(features: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                    weights: Optional[torch.Tensor], grad_rows: torch.Tensor, window: float, temperature: float,
                    pushing: float, published_denominator: bool) -> torch.Tensor:
    """Triton ConR gradient for 'none': d (sum_i g_i L_i) / d features; see ``imbreg_fast::conr_bwd``."""
    from ..triton_kernels import conr

    return conr.conr_bwd(features, targets, preds, weights, grad_rows, window, temperature, pushing,
                         published_denominator)


def _register(prefix: str):
    bwd = register_fused_op(f"imbreg_fast::{prefix}conr_bwd", fake=_bwd_fake)
    fwd = register_fused_op(f"imbreg_fast::{prefix}conr_fwd", fake=_fake, setup_context=_setup_context,
                            backward=_backward_with(bwd))
    return _fused_impl(fwd)


def _triton_supports(features: torch.Tensor) -> str | None:
    if features.dim() == 2 and features.shape[1] > 1024:
        return f"the Triton ConR kernel holds a row of features in registers: d <= 1024 (got {features.shape[1]})"
    return None


def register_backends(cpp: bool) -> None:
    """Register ConR's backends with the dispatcher: torch, then cpp (when the extension is loaded), then
    triton."""
    register(OP, "torch")(conr_torch)
    if cpp:
        register(OP, "cpp")(_register(""))
    register(OP, "triton", supports=_triton_supports)(_register("triton_"))
