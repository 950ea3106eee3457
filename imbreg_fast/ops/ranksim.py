"""RankSim (Gong et al., ICML 2022): the glue of the family's three backends.

Definitions (docs: the RankSim section of docs/methods.md). Features x [m, d] (already subsampled by
:func:`imbreg_fast.functional.ranksim_loss`, or laid out with the c kept rows first and ``count`` = c: then
every formula below is over the first c rows and columns, m reads c, and the other rows get no loss and no
gradient — the form of the default subsample, whose size is not read on the host), labels y [m]:

    z_i   = x_i / max(|x_i|, eps)            (eps = 1e-12, as F.normalize)
    S     = z z^T                            (cosine similarities, [m, m])
    R_f,i = rank(S_i),  R_y,i = rank(-|y_i - y|)
    L_i   = mean_j (R_f,ij - R_y,ij)^2       loss = sum_i L_i ('sum', the published value), mean_i, or [m]

rank(v)_j = (r_j + 1) / m with r_j = #{k: v_k > v_j} + #{k > j: v_k == v_j}: 0-based descending position,
ties broken by the LATER index first (what the published code computes with a stable ascending argsort
that is then flipped; a NaN counts as larger than every number, as torch.sort orders it).

Gradient (blackbox combinatorial solver, Vlastelica et al. 2020, as the published code): with G_i the
incoming gradient on R_f,i,
    dL/dS_i = (rank(S_i + lambda G_i) - rank(S_i)) / lambda,
then the chain through S = z z^T and the normalisation (derived at ``_chain_through_cosine``). The
gradient is NOT linear in the incoming gradient: scaling the loss (gamma, AMP loss scales, gradient
accumulation 1/k, DDP averaging) changes the perturbation and hence the direction of the gradient. Every
backend therefore uses exactly the incoming gradient, as the published method does; the fused forward
cannot precompute the gradient (unlike the other fused losses): it saves S, the ranks and the normalised
rows, and the backward is a second fused kernel (re-rank S + lambda G, then the chain through the cosine).

- ``torch``: the formulas above in PyTorch (sort-based ranks); the rank is an ``autograd.Function`` with the
  blackbox backward, the rest is differentiated by autograd. The oracle of the fused kernels.
- ``cpp``: ops ``imbreg_fast::ranksim_fwd`` / ``imbreg_fast::ranksim_bwd`` (schemas csrc/ranksim.cpp,
  kernels csrc/cpu/ranksim_kernel.cpp): a sort per row, rows in parallel.
- ``triton``: ops ``imbreg_fast::triton_ranksim_fwd`` / ``imbreg_fast::triton_ranksim_bwd`` around the
  launchers of ``imbreg_fast.triton_kernels.ranksim``: ranks by counting (no sort), a program per row.

RankSim's gradient is a surrogate (the loss is piecewise constant in the features): it cannot be
differentiated twice on any backend (clear RuntimeError), and numerical gradchecks do not apply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from .. import _reduction
from .._dispatch import register
from .._validation import compute_dtype
from ._registration import grad_required, register_fused_op

OP = "ranksim_loss"   # the public op of the dispatcher
NORM_EPS = 1e-12      # F.normalize's eps: z = x / max(|x|, eps)

_SECOND_ORDER_MESSAGE = (
    "imbreg_fast: ranksim_loss cannot be differentiated twice (create_graph=True, a gradient penalty, "
    "torch.func.grad of a gradient): its gradient is the blackbox-solver surrogate (re-ranking of "
    "S + lambda G), which has no derivative; this holds on every backend.")


class _NoSecondOrder(torch.autograd.Function):
    """Identity on a first-order RankSim gradient; differentiating it raises (anchor: an input that
    requires grad, so the node is recorded whenever a graph of the backward is built)."""

    @staticmethod
    def forward(ctx, anchor, grad):
        return grad.clone()

    @staticmethod
    def backward(ctx, _unused):
        raise RuntimeError(_SECOND_ORDER_MESSAGE)


def _first_order(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _NoSecondOrder.apply(anchor, grad)
    return grad


# --------------------------------------------------------------------------------------------------
# torch backend (the oracle)
# --------------------------------------------------------------------------------------------------


def stable_rank(v: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """0-based descending rank along dim 1 of v [m, k], ties: the later index first (int64).

    A stable ascending sort keeps equal values in index order; reversed, it is the descending order with
    the later index first among equals. rank[order[p]] = p inverts that permutation. With ``kept`` ([k]
    bool), the rank among the kept columns only: the number of kept columns before each one in that order
    (the entries of columns not kept are meaningless)."""
    order = torch.sort(v, dim=1, stable=True).indices.flip(1)
    if kept is None:
        pos = torch.arange(v.shape[1], device=v.device).expand_as(order)
    else:
        pos = torch.cumsum(kept[order].long(), dim=1) - 1
    return torch.empty_like(order).scatter_(1, order, pos)


def rank_normalised(v: torch.Tensor, dtype: torch.dtype, kept: torch.Tensor | None = None,
                    count: torch.Tensor | None = None) -> torch.Tensor:
    """(stable_rank(v, kept) + 1) / c in ``dtype``: c = v.shape[1], or the kept count ``count`` (a tensor)."""
    r = (stable_rank(v, kept) + 1).to(dtype)
    return r / (v.shape[1] if count is None else count.to(dtype))


class _BlackboxRank(torch.autograd.Function):
    """R = rank_normalised(S) per row (among the kept columns); backward: dS = (rank(S + lambda G) - R) /
    lambda on the kept block, 0 outside it (``block``: [m, m] bool, or None for every entry)."""

    @staticmethod
    def forward(ctx, s, lam, kept, count, block):
        r = rank_normalised(s, s.dtype, kept, count)
        ctx.lam, ctx.kept, ctx.count, ctx.block = lam, kept, count, block
        ctx.save_for_backward(s, r)
        return r

    @staticmethod
    def backward(ctx, grad_r):
        s, r = ctx.saved_tensors
        with torch.no_grad():
            perturbed = rank_normalised(s + ctx.lam * grad_r, s.dtype, ctx.kept, ctx.count)
            grad_s = (perturbed - r) / ctx.lam
            if ctx.block is not None:
                grad_s = torch.where(ctx.block, grad_s, 0.0)
        return _first_order(grad_s, s), None, None, None, None


def label_keys(y: torch.Tensor) -> torch.Tensor:
    """-|y_i - y_j| [m, m] in the labels' own dtype (the published code's arithmetic)."""
    return -(y.unsqueeze(1) - y.unsqueeze(0)).abs()


def label_dtype(y: torch.Tensor) -> torch.dtype:
    """The dtype the label distances are computed in: float32 / float64 labels keep theirs (the published
    arithmetic, so the same ties), integer labels float64 (exact below 2^53), half types float32."""
    if y.dtype in (torch.float32, torch.float64):
        return y.dtype
    return torch.float32 if y.is_floating_point() else torch.float64


def ranksim_torch(x, y, lam, reduction, count=None):
    """x [m, d] floating, y [m] real, lam > 0, reduction code, count (None, or an int64 tensor c: only the
    first c rows are kept, the others take no part) -> loss (x's dtype; 'none': [m])."""
    dtype = compute_dtype(x.dtype)
    m = x.shape[0]
    z = TF.normalize(x.to(dtype), dim=1, eps=NORM_EPS)
    s = z @ z.T
    kept = block = None
    if count is not None:
        kept = torch.arange(m, device=x.device) < count
        block = kept.unsqueeze(1) & kept.unsqueeze(0)
    rf = _BlackboxRank.apply(s, lam, kept, count, block)
    ry = rank_normalised(label_keys(y.to(label_dtype(y))), dtype, kept, count)
    err = (rf - ry) ** 2
    if count is None:
        rows = err.mean(1) if m > 0 else rf.new_zeros(0)
    else:
        rows = torch.where(block, err, 0.0).sum(1) / count.to(dtype).clamp_min(1)
    return _reduction.reduce_rows(rows, kept, reduction).to(x.dtype)   # rows not kept are 0 already


# --------------------------------------------------------------------------------------------------
# Fused backends (cpp, triton): forward op -> (loss, z, norms, S, R_f, R_y); backward op -> d loss / d x.
# --------------------------------------------------------------------------------------------------


def _fwd_fake(args):
    m, d = args.features.shape
    loss = args.features.new_empty((m,) if args.reduction == _reduction.NONE else ())
    k = (lambda *shape: shape) if args.compute_grad else (lambda *shape: (0,))
    return (loss, args.features.new_empty(k(m, d)), args.features.new_empty(k(m)),
            args.features.new_empty(k(m, m)), args.features.new_empty(k(m, m)), args.features.new_empty(k(m, m)))


def _bwd_fake(args):
    return args.z.new_empty(args.z.shape)


def _fused_autograd(bwd_op_name: str):
    """setup_context / backward of a fused forward op whose backward is the fused op ``bwd_op_name``."""
    bwd_op = None

    def setup_context(ctx, args, output):
        _, z, norms, s, rf, ry = output
        ctx.had_grad = args.compute_grad
        ctx.lam = args.lam
        ctx.reduction = args.reduction
        ctx.mark_non_differentiable(z, norms, s, rf, ry)
        return z, norms, s, rf, ry, args.count, args.features

    def backward(ctx, saved, grad_loss, *_unused):
        nonlocal bwd_op
        if not ctx.had_grad:
            raise RuntimeError("imbreg_fast: backward through ranksim_fwd called with compute_grad=False")
        if bwd_op is None:
            bwd_op = getattr(torch.ops.imbreg_fast, bwd_op_name)
        z, norms, s, rf, ry, count, features = saved
        grads = {}
        if ctx.needs_grad["features"]:
            g = bwd_op(grad_loss.detach().to(z.dtype).contiguous(), z, norms, s, rf, ry, count, ctx.lam,
                       ctx.reduction)
            grads["features"] = _first_order(g.to(features.dtype), features)
        return grads

    return setup_context, backward


def _register_fused(fwd: str, bwd: str):
    """Register the fused pair ``imbreg_fast::<fwd>`` / ``imbreg_fast::<bwd>``; returns the forward op."""
    register_fused_op(f"imbreg_fast::{bwd}", fake=_bwd_fake)
    setup_context, backward = _fused_autograd(bwd)
    # twice_differentiable: the backward applies its own second-order guard (a RankSim-specific message)
    return register_fused_op(f"imbreg_fast::{fwd}", fake=_fwd_fake, setup_context=setup_context,
                             backward=backward, twice_differentiable=True)


def _fused_impl(fwd_op):
    def ranksim(x, y, lam, reduction, count=None):
        dtype = compute_dtype(x.dtype)
        xc = x.to(dtype).contiguous()
        yc = y.to(label_dtype(y)).contiguous()
        loss = fwd_op(xc, yc, count, float(lam), reduction, grad_required(x))[0]
        return loss.to(x.dtype)

    return ranksim


@torch.library.custom_op("imbreg_fast::triton_ranksim_fwd", mutates_args=())
def triton_ranksim_fwd(features: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None, lam: float,
                       reduction: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor]:
    """Triton RankSim forward: (loss, z, norms, S, R_f, R_y); see ``imbreg_fast::ranksim_fwd``."""
    from ..triton_kernels import ranksim
    return ranksim.ranksim_fwd(features, labels, count, lam, reduction, compute_grad)


@torch.library.custom_op("imbreg_fast::triton_ranksim_bwd", mutates_args=())
def triton_ranksim_bwd(grad_loss: torch.Tensor, z: torch.Tensor, norms: torch.Tensor, s: torch.Tensor,
                       rank_f: torch.Tensor, rank_y: torch.Tensor, count: torch.Tensor | None, lam: float,
                       reduction: int) -> torch.Tensor:
    """Triton RankSim backward: d loss / d features; see ``imbreg_fast::ranksim_bwd``."""
    from ..triton_kernels import ranksim
    return ranksim.ranksim_bwd(grad_loss, z, norms, s, rank_f, rank_y, count, lam, reduction)


def register_backends(cpp: bool) -> None:
    """Register the family's backends with the dispatcher: torch, then cpp (when the extension is
    loaded), then triton."""
    register(OP, "torch")(ranksim_torch)
    if cpp:
        register(OP, "cpp")(_fused_impl(_register_fused("ranksim_fwd", "ranksim_bwd")))
    register(OP, "triton")(_fused_impl(_register_fused("triton_ranksim_fwd", "triton_ranksim_bwd")))
