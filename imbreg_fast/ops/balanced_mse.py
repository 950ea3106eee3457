"""Balanced MSE (BMC, GAI, BNI): backend implementations behind imbreg_fast.functional.

- ``torch``: the literal formulas of methods.md §1 in plain PyTorch, differentiated by autograd. It is the
  CPU fallback and the oracle the fused kernels are tested against. It materialises the N x M logits
  (BMC) and N x K logits (GAI/BNI), like the published code.
- ``cpp`` / ``triton``: fused ops ``imbreg_fast::bmc_fwd`` / ``imbreg_fast::mixture_nll_fwd`` (C++) and
  ``imbreg_fast::triton_*`` (Triton) that return the loss together with d loss/d pred and d loss/d sigma^2,
  computed in the same pass; their registered backward only scales these by ``grad_output``.

Every backend function here takes validated rows (see ``_validation.as_rows``) and the reduction code.
"""
from __future__ import annotations

import math

import torch

from .. import _extension
from .._dispatch import register
from .._validation import compute_dtype

# --------------------------------------------------------------------------------------------------
# Shared fake kernel and autograd of the fused loss ops (C++ and Triton alike).
# --------------------------------------------------------------------------------------------------


def fused_loss_fake(pred: torch.Tensor, noise_var: torch.Tensor, reduction: int, compute_grad: bool):
    """Output metadata of every fused loss op: (loss, grad_pred, grad_noise_var)."""
    per_row = (pred.shape[0],) if reduction == 0 else ()
    loss = pred.new_empty(per_row)
    grad_pred = pred.new_empty(pred.shape if compute_grad else (0,))
    grad_var = noise_var.new_empty(per_row if compute_grad else (0,))
    return loss, grad_pred, grad_var


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor, bit-identical whatever the thread count: on CPU torch.sum splits large
    tensors across threads (so the rounding depends on the thread count), cumsum scans in order."""
    if x.device.type == "cpu" and x.numel() > 0:
        return x.cumsum(0)[-1]
    return x.sum()


def register_fused_autograd(op, *, n_inputs: int, pred_index: int, noise_var_index: int,
                            reduction_index: int, compute_grad_index: int) -> None:
    """Backward of a fused loss op: the gradients were computed by the forward pass; scale them.

    loss = sum_i w_i L_i (w_i = 1/count for 'mean', 1 for 'sum'), so with upstream gradient g:
      d/d pred_i   = g * grad_pred_i           (grad_pred already holds w_i dL_i/dpred_i)
      d/d sigma^2  = g * grad_noise_var        ('none': sum_i g_i * dL_i/dsigma^2)
    """

    def setup_context(ctx, inputs, output):
        _, grad_pred, grad_var = output
        ctx.reduction = inputs[reduction_index]
        ctx.had_grads = inputs[compute_grad_index]
        ctx.pred_dtype = inputs[pred_index].dtype
        ctx.save_for_backward(grad_pred, grad_var)
        ctx.mark_non_differentiable(grad_pred, grad_var)

    def backward(ctx, grad_loss, _unused_grad_pred, _unused_grad_var):
        if not ctx.had_grads:
            raise RuntimeError("imbreg_fast: backward through a fused loss called with compute_grad=False")
        grad_pred, grad_var = ctx.saved_tensors
        grads = [None] * n_inputs
        if ctx.reduction == 0:
            if ctx.needs_input_grad[pred_index]:
                grads[pred_index] = (grad_loss.to(grad_pred.dtype).unsqueeze(-1) * grad_pred).to(ctx.pred_dtype)
            if ctx.needs_input_grad[noise_var_index]:
                grads[noise_var_index] = _ordered_sum(grad_loss.to(grad_var.dtype) * grad_var)
        else:
            if ctx.needs_input_grad[pred_index]:
                grads[pred_index] = (grad_loss.to(grad_pred.dtype) * grad_pred).to(ctx.pred_dtype)
            if ctx.needs_input_grad[noise_var_index]:
                grads[noise_var_index] = grad_loss.to(grad_var.dtype) * grad_var
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


BMC_ARGS = dict(n_inputs=7, pred_index=0, noise_var_index=4, reduction_index=5, compute_grad_index=6)
MIXTURE_ARGS = dict(n_inputs=11, pred_index=0, noise_var_index=3, reduction_index=9, compute_grad_index=10)


def _register_cpp_ops() -> None:
    @torch.library.register_fake("imbreg_fast::bmc_fwd")
    def _bmc_fake(pred, target, candidates, mask, noise_var, reduction, compute_grad):
        return fused_loss_fake(pred, noise_var, reduction, compute_grad)

    @torch.library.register_fake("imbreg_fast::mixture_nll_fwd")
    def _mixture_fake(pred, target, mask, noise_var, log_weight, means, precision, grad_var_bias,
                      log_noise_coef, reduction, compute_grad):
        return fused_loss_fake(pred, noise_var, reduction, compute_grad)

    @torch.library.register_fake("imbreg_fast::exp_throughput")
    def _exp_throughput_fake(x, variant, repeats):
        return x.new_empty(())

    register_fused_autograd("imbreg_fast::bmc_fwd", **BMC_ARGS)
    register_fused_autograd("imbreg_fast::mixture_nll_fwd", **MIXTURE_ARGS)


if _extension.cpp_available():
    _register_cpp_ops()


def compute_grad_flag(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor) -> bool:
    """Whether the fused forward must also produce gradients; rejects target gradients."""
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("target requires grad, but the fused Balanced MSE kernels do not differentiate "
                         "w.r.t. the target; detach it or use backend='torch'")
    return torch.is_grad_enabled() and (pred.requires_grad or noise_var.requires_grad)


# --------------------------------------------------------------------------------------------------
# Mixture tables for the fused GAI / BNI kernel (computed at the current sigma^2, not differentiated:
# the kernel returns d loss / d sigma^2 analytically).
#
# Per row, with delta_k = pred - mu_k, alpha_k = P_k delta_k, u = pred - target, e = |u|^2:
#   f   = e / (2 s2) + c * (d/2) log s2 + LSE_k( a_k - 1/2 delta_k^T alpha_k )
#   L   = 2 s2 * f      (the 2 s2 factor is under stop-gradient)
#   dL/dpred = 2 u - 2 s2 * sum_k r_k alpha_k
#   dL/ds2   = -e / s2 + c * d + 2 s2 * sum_k r_k ( 1/2 |alpha_k|^2 - b_k )
# GAI: P_k = (Sigma_k + s2 I)^-1, a_k = log phi_k - 1/2 logdet(Sigma_k + s2 I), b_k = 1/2 tr P_k, c = 1
#      (d/ds2 of a_k is -b_k, of -1/2 delta^T P delta is +1/2 |alpha|^2).
# BNI: P_k = I / s2, a_k = log phi_k, b_k = 0, c = 0 (the 1/2 log s2 terms cancel and are dropped).
# --------------------------------------------------------------------------------------------------


def gai_tables(noise_var, weights, means, covariances, dtype):
    s2 = noise_var.detach().to(dtype)
    weights, means, covariances = weights.to(dtype), means.to(dtype), covariances.to(dtype)
    d = means.shape[1]
    eye = torch.eye(d, dtype=dtype, device=means.device)
    chol = torch.linalg.cholesky(covariances + s2 * eye)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    precision = torch.cholesky_inverse(chol)
    log_weight = torch.log(weights) - 0.5 * logdet
    grad_var_bias = 0.5 * torch.diagonal(precision, dim1=-2, dim2=-1).sum(-1)
    return log_weight.contiguous(), means.contiguous(), precision.contiguous(), grad_var_bias.contiguous(), 1.0


def bni_tables(noise_var, bin_centers, bin_weights, dtype):
    s2 = noise_var.detach().to(dtype)
    centers = bin_centers.to(dtype)
    k, d = centers.shape
    precision = (torch.eye(d, dtype=dtype, device=centers.device) / s2).expand(k, d, d)
    log_weight = torch.log(bin_weights.to(dtype))
    return (log_weight.contiguous(), centers.contiguous(), precision.contiguous(),
            torch.zeros(k, dtype=dtype, device=centers.device), 0.0)


# --------------------------------------------------------------------------------------------------
# torch backend: literal formulas (methods.md §1), autograd does the gradients.
# --------------------------------------------------------------------------------------------------


def _reduce_rows(loss_rows: torch.Tensor, mask, reduction: int) -> torch.Tensor:
    """loss_rows [N] -> 'none' [N] (0 on dropped rows), 'mean' over kept rows (0 if none), 'sum'.

    Rows are dropped with ``torch.where`` rather than boolean indexing, so the shapes do not depend on
    the mask's values and ``torch.compile(fullgraph=True)`` traces the masked case too."""
    if mask is not None:
        loss_rows = torch.where(mask, loss_rows, 0.0)
    if reduction == 0:
        return loss_rows
    total = loss_rows.sum()
    if reduction == 2:
        return total
    count = loss_rows.new_tensor(loss_rows.shape[0]) if mask is None else mask.sum()
    return total / count.clamp(min=1).to(total.dtype)


def _kept(x: torch.Tensor, mask, dtype) -> torch.Tensor:
    """x [N, d] in dtype with dropped rows zeroed (they may hold NaN; their gradient is 0)."""
    x = x.to(dtype)
    return x if mask is None else torch.where(mask.unsqueeze(1), x, 0.0)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, d], [M, d] -> [N, M] squared Euclidean distances, literally."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)


@register("bmc_loss", "torch")
def bmc_torch(pred, target, candidates, mask, noise_var, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, t = _kept(pred, mask, dtype), _kept(target, mask, dtype)
    s2 = noise_var.to(dtype)
    if candidates is None:
        logits = -_sq_dist(p, t) / (2 * s2)                                  # [N, N], positive on the diagonal
        if mask is not None:
            # dropped targets are no candidates; a dropped row keeps only its (finite) diagonal
            eye = torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
            logits = logits.masked_fill(~mask.unsqueeze(0) & ~eye, float("-inf"))
        positive = torch.diagonal(logits)
    else:
        positive = -(p - t).pow(2).sum(-1) / (2 * s2)                        # [N]
        logits = torch.cat([positive.unsqueeze(1), -_sq_dist(p, candidates.to(dtype)) / (2 * s2)], dim=1)
    loss_rows = (-positive + torch.logsumexp(logits, dim=1)) * (2 * s2).detach()
    return _reduce_rows(loss_rows, mask, reduction).to(out_dtype)


def _mvn_log_prob(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, cov) for x [N, 1, d], mean [K, d], cov [K, d, d] -> [N, K], with the 2 pi terms."""
    d = mean.shape[-1]
    chol = torch.linalg.cholesky(cov)                                          # [K, d, d]
    diff = (x - mean).unsqueeze(-1)                                            # [N, K, d, 1]
    sol = torch.linalg.solve_triangular(chol.expand(diff.shape[0], -1, -1, -1), diff, upper=False)
    maha = sol.pow(2).sum((-2, -1))
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (maha + logdet + d * math.log(2 * math.pi))


@register("gai_loss", "torch")
def gai_torch(pred, target, mask, noise_var, weights, means, covariances, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, t = _kept(pred, mask, dtype), _kept(target, mask, dtype)
    s2 = noise_var.to(dtype)
    weights, means, covariances = weights.to(dtype), means.to(dtype), covariances.to(dtype)
    d = p.shape[1]
    if d == 1:
        # L = 2 s2 [ (p - y)^2/(2 s2) + 1/2 log s2 + LSE_k(log phi_k - 1/2 log(v_k + s2) - (p - mu_k)^2/(2(v_k + s2))) ]
        var = covariances.reshape(-1) + s2                                     # [K]
        mse = (p - t).pow(2).squeeze(1) / (2 * s2) + 0.5 * torch.log(s2)
        logits = torch.log(weights) - 0.5 * torch.log(var) - (p - means.reshape(1, -1)).pow(2) / (2 * var)
    else:
        # L = 2 s2 [ -log N(y; p, s2 I) + LSE_k(log phi_k + log N(p; mu_k, Sigma_k + s2 I)) ]
        eye = torch.eye(d, dtype=dtype, device=p.device)
        mse = (p - t).pow(2).sum(-1) / (2 * s2) + 0.5 * d * torch.log(2 * math.pi * s2)
        logits = torch.log(weights) + _mvn_log_prob(p.unsqueeze(1), means, covariances + s2 * eye)
    loss_rows = (mse + torch.logsumexp(logits, dim=1)) * (2 * s2).detach()
    return _reduce_rows(loss_rows, mask, reduction).to(out_dtype)


@register("bni_loss", "torch")
def bni_torch(pred, target, mask, noise_var, bin_centers, bin_weights, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, t = _kept(pred, mask, dtype), _kept(target, mask, dtype)
    s2 = noise_var.to(dtype)
    # L = 2 s2 [ |p - y|^2/(2 s2) + LSE_k(log phi_k - |p - c_k|^2/(2 s2)) ]
    mse = (p - t).pow(2).sum(-1) / (2 * s2)
    logits = torch.log(bin_weights.to(dtype)) - _sq_dist(p, bin_centers.to(dtype)) / (2 * s2)
    loss_rows = (mse + torch.logsumexp(logits, dim=1)) * (2 * s2).detach()
    return _reduce_rows(loss_rows, mask, reduction).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# cpp backend
# --------------------------------------------------------------------------------------------------


def _fused_inputs(pred, target, mask):
    return pred.contiguous(), target.contiguous(), None if mask is None else mask.contiguous()


def call_bmc_op(op, pred, target, candidates, mask, noise_var, reduction):
    """Loss from a fused BMC op (``bmc_fwd`` or ``triton_bmc_fwd``), gradients computed only if needed."""
    grad = compute_grad_flag(pred, target, noise_var)
    pred, target, mask = _fused_inputs(pred, target, mask)
    cands = None if candidates is None else candidates.contiguous()
    return op(pred, target, cands, mask, noise_var, reduction, grad)[0]


def call_mixture_op(op, pred, target, mask, noise_var, tables, reduction):
    """Loss from a fused mixture op (``mixture_nll_fwd`` or ``triton_mixture_nll_fwd``)."""
    grad = compute_grad_flag(pred, target, noise_var)
    pred, target, mask = _fused_inputs(pred, target, mask)
    return op(pred, target, mask, noise_var, *tables, reduction, grad)[0]


@register("bmc_loss", "cpp")
def bmc_cpp(pred, target, candidates, mask, noise_var, reduction):
    return call_bmc_op(torch.ops.imbreg_fast.bmc_fwd, pred, target, candidates, mask, noise_var, reduction)


def mixture_cpp(pred, target, mask, noise_var, tables, reduction):
    return call_mixture_op(torch.ops.imbreg_fast.mixture_nll_fwd, pred, target, mask, noise_var, tables, reduction)


@register("gai_loss", "cpp")
def gai_cpp(pred, target, mask, noise_var, weights, means, covariances, reduction):
    tables = gai_tables(noise_var, weights, means, covariances, compute_dtype(pred.dtype))
    return mixture_cpp(pred, target, mask, noise_var, tables, reduction)


@register("bni_loss", "cpp")
def bni_cpp(pred, target, mask, noise_var, bin_centers, bin_weights, reduction):
    tables = bni_tables(noise_var, bin_centers, bin_weights, compute_dtype(pred.dtype))
    return mixture_cpp(pred, target, mask, noise_var, tables, reduction)
