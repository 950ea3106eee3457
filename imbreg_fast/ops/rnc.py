"""Rank-N-Contrast (Zha et al., NeurIPS 2023): the glue of the family's backends (docs/methods.md, RnC).

For anchors i and k != i, with s_ij = -||f_i - f_j||_2 / tau and label distances d_ij = sum_c |y_ic - y_jc|:

    l_ik = log Z_ik - s_ik,    Z_ik = sum_{j != i, d_ij >= d_ik} e^{s_ij}     (k itself and its ties included)

and the per-anchor loss l_i = (1 / (n - 1)) sum_{k != i} l_ik; 'mean' = mean_i l_i (= the published mean over the
n (n - 1) pairs), 'sum' = sum_i l_i, 'none' = [n] of l_i.

Exact in O(n^2 log n) time and O(n^2) memory: each row sorted by d (stable, so ties keep column order),
Z at sorted position p = the suffix sum from the head of p's tie group, taken as a suffix log-sum-exp (finite
for any distance / tau; the published max-subtraction is a no-op since the row max is the diagonal's 0).

- ``torch``: that formulation in plain PyTorch (cdist without the Gram-matrix shortcut, sort, logcumsumexp),
  differentiated by autograd; the fallback and the oracle of the fused kernels.
- ``cpp``: op ``imbreg_fast::rnc_fwd`` (schema csrc/rnc.cpp, kernel csrc/cpu/rnc_kernel.cpp).
- ``triton``: op ``imbreg_fast::triton_rnc_fwd``, a custom op around the launcher of
  ``imbreg_fast.triton_kernels.rnc`` (a program per anchor row: bitonic sort by label distance, suffix
  log-sum-exp scan; n <= MAX_N anchors), same contract.

Every backend function takes ``features`` [n, d] (any floating dtype, half types computed in fp32), ``labels``
[n, L] (floating, constant), the temperature and a reduction code (``imbreg_fast._reduction``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _reduction
from .._dispatch import register
from .._validation import compute_dtype
from ._registration import ForwardGrad, grad_required, register_fused_op

OP = "rnc_loss"   # the public op of the dispatcher


# --------------------------------------------------------------------------------------------------
# torch backend: the exact sorted formulation, autograd does the gradients.
# --------------------------------------------------------------------------------------------------


def _off_diagonal(n: int, device) -> torch.Tensor:
    """[n, n - 1] column indices j != i of row i, in increasing order."""
    j = torch.arange(n - 1, device=device)
    return j + (j >= torch.arange(n, device=device)[:, None]).to(j.dtype)


def pairwise_l2(f: torch.Tensor) -> torch.Tensor:
    """[n, n] ||f_i - f_j||_2 from the differences themselves (never ||a||^2 + ||b||^2 - 2 a.b, which loses the
    small distances of two views of one sample); gradient 0 where a distance is 0 (torch's subgradient)."""
    return torch.cdist(f[None], f[None], p=2.0, compute_mode="donot_use_mm_for_euclid_dist")[0]


def l1_label_distance(y: torch.Tensor) -> torch.Tensor:
    """[n, n] sum_c |y_ic - y_jc| for labels y [n, L] (the published 'l1')."""
    return (y[:, None, :] - y[None, :, :]).abs().sum(-1)


def rnc_anchor_losses_torch(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n] per-anchor losses l_i (compute dtype) for n >= 2."""
    n = features.shape[0]
    off = _off_diagonal(n, features.device)
    s = pairwise_l2(features).gather(1, off) / -temperature          # [n, n-1] s_ij, j != i
    d = l1_label_distance(labels).gather(1, off)                     # [n, n-1] d_ij
    d_sorted, order = torch.sort(d, dim=1, stable=True)
    s_sorted = s.gather(1, order)
    # suffix log-sum-exp: lse_p = log sum_{q >= p} e^{s_q} (sorted order)
    suffix = torch.logcumsumexp(s_sorted.flip(1), dim=1).flip(1)
    # head of each tie group: the first sorted position with the same d (all of the group share its Z)
    pos = torch.arange(n - 1, device=features.device).expand(n, n - 1)
    new_group = torch.ones_like(d_sorted, dtype=torch.bool)
    new_group[:, 1:] = d_sorted[:, 1:] != d_sorted[:, :-1]
    head = torch.where(new_group, pos, torch.zeros_like(pos)).cummax(dim=1).values
    log_z = suffix.gather(1, head)
    return (log_z - s_sorted).sum(1) / (n - 1)


def reduce_anchors(per_anchor: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == _reduction.NONE:
        return per_anchor
    total = per_anchor.sum()
    return total if reduction == _reduction.SUM else total / max(per_anchor.shape[0], 1)


def rnc_torch(features, labels, temperature, reduction):
    out_dtype = features.dtype
    f = features.to(compute_dtype(out_dtype))
    y = labels.detach().to(compute_dtype(labels.dtype))
    if f.shape[0] < 2:    # no pair: loss 0 (gradient 0), still attached to features
        per_anchor = (f * 0).sum(-1)
    else:
        per_anchor = rnc_anchor_losses_torch(f, y, float(temperature))
    return reduce_anchors(per_anchor, reduction).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Fused backends: the op returns (loss, d loss / d features) in one call; the registered backward scales.
# --------------------------------------------------------------------------------------------------


def _fake(args):
    """(loss [] or [n] for 'none', grad_features [n, d] or [0])."""
    n = args.features.shape[0]
    out = args.features.new_empty((n,) if args.reduction == _reduction.NONE else ())
    return out, args.features.new_empty(args.features.shape if args.compute_grad else (0,))


def _setup_context(ctx, args, output):
    _, grad_features = output
    ctx.had_grad = args.compute_grad
    ctx.reduction = args.reduction
    ctx.temperature = args.temperature
    ctx.mark_non_differentiable(grad_features)
    if args.reduction == _reduction.NONE:
        # per-anchor losses: the backward re-runs the op with the incoming gradient as anchor weights
        return (args.features, args.labels)
    return (ForwardGrad(grad_features),)


def _backward(ctx, saved, grad_loss, _unused_grad):
    """'mean'/'sum': grad_features holds d loss / d features, so d/d features = g * grad_features.
    'none': d/d features = d (sum_i g_i l_i) / d features: the op again with anchor weights g, reduction 'sum'
    (one more forward pass instead of keeping an [n, n] matrix). Labels: never differentiated."""
    if not ctx.needs_grad["features"]:
        return {}
    if ctx.reduction == _reduction.NONE:
        features, labels = saved
        op = _FUSED_OPS[ctx.op_name]
        with torch.no_grad():
            _, grad = op.op(features, labels, grad_loss.detach().to(features.dtype).contiguous(),
                            ctx.temperature, _reduction.SUM, True)
        return {"features": grad}
    if not ctx.had_grad:
        raise RuntimeError("imbreg_fast: backward through an RnC op called with compute_grad=False")
    (grad_features,) = saved
    return {"features": grad_features.scaled(grad_loss)}


_FUSED_OPS: dict = {}


def _autograd(qualname):
    def setup_context(ctx, args, output):
        saved = _setup_context(ctx, args, output)
        ctx.op_name = qualname
        return saved
    return dict(fake=_fake, setup_context=setup_context, backward=_backward)


def _fused_impl(op):
    def rnc(features, labels, temperature, reduction):
        out_dtype = features.dtype
        dtype = compute_dtype(out_dtype)
        f = features.to(dtype).contiguous()
        y = labels.detach().to(compute_dtype(labels.dtype)).contiguous()
        grad = grad_required(features) and reduction != _reduction.NONE
        return op(f, y, None, float(temperature), reduction, grad)[0].to(out_dtype)

    return rnc


def _register_fused(backend: str, qualname: str, supports=None) -> None:
    fused = register_fused_op(qualname, **_autograd(qualname))
    _FUSED_OPS[qualname] = fused
    register(OP, backend, supports=supports)(_fused_impl(fused))


@torch.library.custom_op("imbreg_fast::triton_rnc_fwd", mutates_args=())
def triton_rnc_fwd(features: torch.Tensor, labels: torch.Tensor, anchor_weight: Optional[torch.Tensor],
                   temperature: float, reduction: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RnC: (loss, d loss / d features); see ``imbreg_fast::rnc_fwd``."""
    from ..triton_kernels import rnc

    return rnc.rnc_fwd(features, labels, anchor_weight, temperature, reduction, compute_grad)


TRITON_MAX_N = 4096   # = imbreg_fast.triton_kernels.rnc.MAX_N (readable without importing Triton)


def _triton_supports(features: torch.Tensor) -> str | None:
    """features: the flat [n, d] batch."""
    if features.dim() == 2 and features.shape[0] > TRITON_MAX_N:
        return (f"the Triton RnC kernel sorts a whole row in one block: n <= {TRITON_MAX_N} anchors "
                f"(got n = {features.shape[0]})")
    return None


def register_backends(cpp: bool) -> None:
    """Register the family's backends with the dispatcher: torch, then cpp (when the extension is loaded), then
    triton."""
    register(OP, "torch")(rnc_torch)
    if cpp and hasattr(torch.ops.imbreg_fast, "rnc_fwd"):
        _register_fused("cpp", "imbreg_fast::rnc_fwd")
    _register_fused("triton", "imbreg_fast::triton_rnc_fwd", supports=_triton_supports)
