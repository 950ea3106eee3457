"""Balanced MSE (BMC, GAI, BNI): the glue of the family's three backends (docs/methods.md §1).

- ``torch``: the formulas of docs/methods.md §1 in plain PyTorch, differentiated by autograd, written in
  numerically stable forms. The fallback on any device and the oracle the fused kernels are tested
  against; it materialises the N x M (BMC) and N x K (GAI/BNI) logits, like the published code.
- ``cpp``: ops ``imbreg_fast::bmc_fwd`` / ``imbreg_fast::mixture_nll_fwd`` (schemas csrc/balanced_mse.cpp,
  kernels csrc/cpu/balanced_mse_kernel.cpp).
- ``triton``: ops ``imbreg_fast::triton_bmc_fwd`` / ``imbreg_fast::triton_mixture_nll_fwd``, custom ops
  around the launchers of ``imbreg_fast.triton_kernels.balanced_mse`` (imported on the first call, so
  importing imbreg_fast never imports triton), with the C++ ops' argument lists and output contract.

The fused ops return ``(loss, grad_pred, grad_noise_var)``: the gradients are computed in the same pass
as the loss and their registered backward only scales them by ``grad_output``. Every backend function
here takes validated rows (``_validation.as_rows``) and a reduction code (``imbreg_fast._reduction``).
:func:`register_backends` (called once by ``imbreg_fast.ops``) registers them with the dispatcher.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _reduction
from .._dispatch import register
from .._validation import compute_dtype
from ._registration import ForwardGrad, grad_required, register_fused_op

# --------------------------------------------------------------------------------------------------
# Fake kernel and autograd shared by the fused loss ops (C++ and Triton alike).
# --------------------------------------------------------------------------------------------------


def _loss_fake(args):
    """Output metadata of every fused loss op: (loss, grad_pred, grad_noise_var)."""
    per_row = (args.pred.shape[0],) if args.reduction == _reduction.NONE else ()
    loss = args.pred.new_empty(per_row)
    grad_pred = args.pred.new_empty(args.pred.shape if args.compute_grad else (0,))
    grad_var = args.noise_var.new_empty(per_row if args.compute_grad else (0,))
    return loss, grad_pred, grad_var


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor, bit-identical whatever the thread count: on CPU torch.sum splits large
    tensors across threads (so the rounding depends on the thread count), cumsum scans in order."""
    if x.device.type == "cpu" and x.numel() > 0:
        return x.cumsum(0)[-1]
    return x.sum()


def _loss_setup_context(ctx, args, output):
    _, grad_pred, grad_var = output
    ctx.reduction = args.reduction
    ctx.had_grads = args.compute_grad
    ctx.pred_dtype = args.pred.dtype
    ctx.mark_non_differentiable(grad_pred, grad_var)
    return ForwardGrad(grad_pred), grad_var


def _loss_backward(ctx, saved, grad_loss, _unused_grad_pred, _unused_grad_var):
    """The gradients were computed by the forward pass; scale them.

    loss = sum_i w_i L_i (w_i = 1/count for 'mean', 1 for 'sum'), so with upstream gradient g:
      d/d pred_i   = g * grad_pred_i           (grad_pred already holds w_i dL_i/dpred_i)
      d/d sigma^2  = g * grad_noise_var        ('none': sum_i g_i * dL_i/dsigma^2)
    The target is not an input of the gradient (docs/methods.md, "Conventions").
    """
    if not ctx.had_grads:
        raise RuntimeError("imbreg_fast: backward through a fused loss called with compute_grad=False")
    grad_pred, grad_var = saved
    grads = {}
    per_row = ctx.reduction == _reduction.NONE
    if ctx.needs_grad["pred"]:
        grads["pred"] = grad_pred.scaled(grad_loss.unsqueeze(-1) if per_row else grad_loss, ctx.pred_dtype)
    if ctx.needs_grad["noise_var"]:
        g = grad_loss.to(grad_var.dtype) * grad_var
        grads["noise_var"] = _ordered_sum(g) if per_row else g
    return grads


LOSS_AUTOGRAD = dict(fake=_loss_fake, setup_context=_loss_setup_context, backward=_loss_backward)


def compute_grad_flag(pred: torch.Tensor, noise_var: torch.Tensor) -> bool:
    """Whether the fused forward must also produce the gradients."""
    return grad_required(pred, noise_var)


# --------------------------------------------------------------------------------------------------
# Mixture tables for the fused GAI / BNI kernels (computed at the current sigma^2 in float64, then
# rounded to the compute dtype; not differentiated: the kernels return d loss / d sigma^2 analytically).
#
# Both losses are L = 2 s2 f (the 2 s2 factor under stop-gradient) with
#   GAI: f = |u|^2/(2 s2) + (d/2) log s2 + LSE_k(log phi_k - 1/2 logdet(Sigma_k + s2 I) - 1/2 delta_k^T P_k delta_k)
#   BNI: f = |u|^2/(2 s2) + LSE_k(log phi_k - |delta_k|^2/(2 s2))
# with u = pred - target, delta_k = pred - mu_k, P_k = (Sigma_k + s2 I)^-1 (BNI: I/s2, Sigma_k = 0). Since
# logdet(Sigma + s2 I) = d log s2 + logdet(I + Sigma/s2), GAI's (d/2) log s2 cancels exactly (never formed:
# at large s2 it is the large term of a cancellation), and LSE_k(log phi_k + x_k) = log sum phi +
# LSE_k(log phi^_k + x_k) with phi^ = phi / sum phi. Per row, with alpha_k = P_k delta_k, e = |u|^2:
#   t_k = n_k - 1/2 delta_k^T alpha_k,    m = max_k t_k,    S = sum_k phi^_k exp(t_k - m),
#   r_k = phi^_k exp(t_k - m) / S,
#   L        = e + 2 s2 (m + log S)
#   dL/dpred = 2 u - 2 s2 sum_k r_k alpha_k                        (d t_k / d pred = -alpha_k)
#   dL/ds2   = -e/s2 + 2 s2 sum_k r_k (1/2 |alpha_k|^2 + g_k)      (d P/d s2 = -P^2, d n_k/d s2 = g_k)
# Tables: log_weight_k = log phi^_k; log_norm_k = n_k; precision P_k; grad_var_bias g_k:
#   GAI: n_k = log sum phi - 1/2 sum_i log1p(lambda_ki / s2),  g_k = 1/2 tr(P_k Sigma_k)/s2
#        = 1/2 sum_i lambda_ki / ((lambda_ki + s2) s2)  (lambda_ki: eigenvalues of Sigma_k; log1p and this
#        g_k stay accurate when s2 >> Sigma_k, where 1/2 tr P_k - d/(2 s2) would cancel);
#   BNI: n_k = log sum phi, g_k = 0.
# Every t_k is O(|delta|^2 / s2): as s2 grows, S tends to 1 and the kernels take log S as
# log1p(sum_k phi^_k expm1(t_k - m)) (see the kernels). log sum phi is in n_k, not in log_weight, so that
# the weights the kernels sum stay normalised: sum_k phi^_k = 1 exactly, whatever the rounding of phi^.
# --------------------------------------------------------------------------------------------------


def _normalised_log_weights(weights: torch.Tensor, dtype):
    """(log phi^ [K], log sum phi []) in float64, for the weights as rounded to the compute dtype."""
    w = weights.detach().to(dtype).double()
    total = w.sum()
    return torch.log(w / total), torch.log(total)


def gai_tables(noise_var, weights, means, covariances, dtype):
    s2 = noise_var.detach().to(dtype).double()                          # the sigma^2 the kernels see
    cov = covariances.detach().to(dtype).double()
    d = cov.shape[-1]
    log_weight, log_total = _normalised_log_weights(weights, dtype)
    if d == 1:   # the same formulas, without the [K, 1, 1] factorisations (a few small ops per call)
        lam = cov.reshape(-1, 1)
        precision = (1.0 / (cov + s2))
    else:
        lam = torch.linalg.eigvalsh(cov)                                   # [K, d]
        eye = torch.eye(d, dtype=torch.float64, device=cov.device)
        precision = torch.cholesky_inverse(torch.linalg.cholesky(cov + s2 * eye))
    log_norm = log_total - 0.5 * torch.log1p(lam / s2).sum(-1)
    grad_var_bias = 0.5 * (lam / (lam + s2)).sum(-1) / s2
    return tuple(x.to(dtype).contiguous() for x in (log_weight, log_norm, means, precision, grad_var_bias))


def bni_tables(noise_var, bin_centers, bin_weights, dtype):
    s2 = noise_var.detach().to(dtype).double()
    k, d = bin_centers.shape
    log_weight, log_total = _normalised_log_weights(bin_weights, dtype)
    precision = (torch.eye(d, dtype=torch.float64, device=bin_centers.device) / s2).expand(k, d, d)
    return tuple(x.to(dtype).contiguous() for x in (log_weight, log_total.expand(k), bin_centers, precision,
                                                    torch.zeros_like(log_weight)))


# --------------------------------------------------------------------------------------------------
# torch backend: the formulas of docs/methods.md §1 rewritten in numerically stable forms (§1.7), autograd
# does the gradients.
#
# Every variant is L_i = sg(2 s2) * log sum_j w_j exp(t_ij), with logits t_ij taken RELATIVE to the
# row's own term (the positive of BMC, the -log N(y; p, s2 I) term of GAI/BNI), written as products of
# differences, |p - y|^2 - |p - c|^2 = (c - y).(2p - y - c), never as a difference of two large squares:
#   BMC  t_ij = (y_j - y_i).(2p_i - y_i - y_j) / (2 s2),                                     w_j = 1
#   BNI  t_ik = (c_k - y_i).(2p_i - y_i - c_k) / (2 s2),                                     w_k = phi_k
#   GAI  t_ik = -1/2 logdet(I + Sigma_k/s2) + [(mu_k - y_i).(2p_i - y_i - mu_k) + x_ik.Sigma_k delta_ik] / (2 s2)
#        with delta_ik = p_i - mu_k, x_ik = (Sigma_k + s2 I)^-1 delta_ik
# (GAI: |p-y|^2/(2 s2) - 1/2 delta^T (Sigma + s2 I)^-1 delta = (|p-y|^2 - |delta|^2)/(2 s2) + 1/2 delta^T
# (I/s2 - (Sigma + s2 I)^-1) delta, and I/s2 - (Sigma + s2 I)^-1 = (Sigma + s2 I)^-1 Sigma / s2; the
# (d/2) log(2 pi s2) of both Gaussians cancel, leaving logdet(Sigma + s2 I) - d log s2 = logdet(I + Sigma/s2).)
# The logits near the maximum are O(1) however far p is from the labels, so the softmax that autograd
# produces (through a max shift that is a constant, _logsumexp) is exact to rounding; and as s2 grows
# every GAI/BNI logit is O(1/s2), which _log_mixture keeps to relative precision.
# --------------------------------------------------------------------------------------------------


def _kept(x: torch.Tensor, mask, dtype) -> torch.Tensor:
    """x [N, d] in dtype with dropped rows zeroed (they may hold NaN; their gradient is 0)."""
    x = x.to(dtype)
    return x if mask is None else torch.where(mask.unsqueeze(1), x, 0.0)


def _sq_dist_gap(p: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """p, y [N, d], c [M, d] -> [N, M]: |p_i - y_i|^2 - |p_i - c_j|^2 = (c_j - y_i).(2 p_i - y_i - c_j).

    The product of two differences keeps the gap to the relative precision of its factors when p is far
    from both labels (two squares of 1e8 would leave only the rounding of 1e8 in fp32)."""
    return ((c.unsqueeze(0) - y.unsqueeze(1)) * ((2 * p - y).unsqueeze(1) - c.unsqueeze(0))).sum(-1)


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x_ij) over dim 1, shifted by the row max as a constant (detached): autograd then
    differentiates m + log sum_j exp(x_ij - m) into exactly softmax(x_i.) as computed from x - m.
    (torch.logsumexp's backward, exp(x - result), carries the rounding of the result, which is large
    when the logits are.) Every row needs a finite entry."""
    if x.shape[1] == 0:                                    # no rows (BMC with N = 0): nothing to reduce
        return x.sum(1)
    m = x.detach().amax(1, keepdim=True)
    return m.squeeze(1) + torch.log(torch.exp(x - m).sum(1))


def _log_mixture(weights: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log sum_k phi_k exp(t_ik) over dim 1 for weights phi [K] >= 0 (not all 0) and logits t [N, K].

    With the shift m_i = max_k t_ik (a constant for autograd), z = t - m <= 0, S_i = sum_k phi_k e^{z_ik}:
        log sum_k phi_k e^{t_ik} = m_i + log S_i.
    When sigma^2 is large against the spread of the labels, every t_k is O(1/s2) and S = sum phi - O(1/s2):
    log(S) would keep only the rounding of S (which the loss multiplies by 2 s2). For S > (sum phi)/2 it is
    therefore taken as
        log S = log sum phi + log1p((S - sum phi) / sum phi),    S - sum phi = sum_k phi_k expm1(z_k),
    a sum of terms <= 0 (no cancellation), with log sum phi in float64: sum phi is 1 only up to the
    rounding of the weights, and 2 s2 log sum phi is part of the loss. Otherwise |log S| > log 2 and
    log(S) is accurate. Either way autograd gives the softmax of log phi + t. The inner torch.where calls
    keep the unused branch finite, so that its (masked-out) gradient is 0, not NaN."""
    total = weights.sum()
    log_total = torch.log(weights.double().sum()).to(t.dtype)
    # zero weights (BNI's empty bins): their logits neither set the shift (the kept terms must not all
    # underflow) nor enter the sums (z > 0 there is replaced by 0 before the exp: no inf * 0)
    used = weights > 0
    m = torch.where(used, t.detach(), float("-inf")).amax(1, keepdim=True)
    z = torch.where(used, t - m, 0.0)
    s = (weights * torch.exp(z)).sum(1)
    near = s > 0.5 * total
    s_minus_total = (weights * torch.expm1(z)).sum(1)
    log_s = torch.where(near, log_total + torch.log1p(torch.where(near, s_minus_total, 0.0) / total),
                        torch.log(torch.where(near, total, s)))
    return m.squeeze(1) + log_s


def bmc_torch(pred, target, candidates, mask, noise_var, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, t = _kept(pred, mask, dtype), _kept(target, mask, dtype)
    s2 = noise_var.to(dtype)
    # L_i = 2 s2 (-l_ii + LSE_j l_ij) = 2 s2 LSE_j (l_ij - l_ii),  l_ij - l_ii = (y_j - y_i).(2p_i - y_i - y_j)/(2 s2)
    if candidates is None:
        logits = _sq_dist_gap(p, t, t) / (2 * s2)                            # [N, N], exactly 0 on the diagonal
        if mask is not None:
            # dropped targets are no candidates; a dropped row keeps only its diagonal
            eye = torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
            logits = logits.masked_fill(~mask.unsqueeze(0) & ~eye, float("-inf"))
    else:
        gaps = _sq_dist_gap(p, t, candidates.to(dtype)) / (2 * s2)             # [N, M]
        logits = torch.cat([gaps.new_zeros(gaps.shape[0], 1), gaps], dim=1)    # the positive first
    loss_rows = _logsumexp(logits) * (2 * s2).detach()
    return _reduction.reduce_rows(loss_rows, mask, reduction).to(out_dtype)


def gai_torch(pred, target, mask, noise_var, weights, means, covariances, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, t = _kept(pred, mask, dtype), _kept(target, mask, dtype)
    s2 = noise_var.to(dtype)
    weights, means, covariances = weights.to(dtype), means.to(dtype), covariances.to(dtype)
    d = p.shape[1]
    # L = 2 s2 [ -log N(y; p, s2 I) + LSE_k(log phi_k + log N(p; mu_k, Sigma_k + s2 I)) ] = 2 s2 log sum_k phi_k e^{t_k}
    # (t_k: see the comment above; for d = 1,
    #  t_k = -1/2 log1p(v_k/s2) + [(mu_k - y)(2p - y - mu_k) + delta_k^2 v_k/(v_k + s2)] / (2 s2))
    gap = _sq_dist_gap(p, t, means)                                            # [N, K]
    if d == 1:
        var = covariances.reshape(1, -1)                                       # [1, K]
        delta = p - means.reshape(1, -1)                                       # [N, K]
        half_logdet = 0.5 * torch.log1p(var / s2)
        quad = delta.pow(2) * (var / (var + s2))
    else:
        # logdet(I + Sigma/s2) = sum_i log1p(lambda_i / s2) over the eigenvalues of Sigma: no cancellation
        # of logdet(Sigma + s2 I) against d log s2 when s2 dominates
        half_logdet = 0.5 * torch.log1p(torch.linalg.eigvalsh(covariances) / s2).sum(-1)       # [K]
        eye = torch.eye(d, dtype=dtype, device=p.device)
        chol = torch.linalg.cholesky(covariances + s2 * eye)                                    # [K, d, d]
        delta = (p.unsqueeze(1) - means).unsqueeze(-1)                                          # [N, K, d, 1]
        x = torch.cholesky_solve(delta, chol)                                       # (Sigma + s2 I)^-1 delta
        quad = (x * (covariances @ delta)).sum((-2, -1))                                        # [N, K]
    logits = (gap + quad) / (2 * s2) - half_logdet
    loss_rows = _log_mixture(weights, logits) * (2 * s2).detach()
    return _reduction.reduce_rows(loss_rows, mask, reduction).to(out_dtype)


def bni_torch(pred, target, mask, noise_var, bin_centers, bin_weights, reduction):
    out_dtype, dtype = pred.dtype, compute_dtype(pred.dtype)
    p, t = _kept(pred, mask, dtype), _kept(target, mask, dtype)
    s2 = noise_var.to(dtype)
    # L = 2 s2 [ |p - y|^2/(2 s2) + LSE_k(log phi_k - |p - c_k|^2/(2 s2)) ] = 2 s2 log sum_k phi_k e^{t_k},
    # t_k = (|p - y|^2 - |p - c_k|^2)/(2 s2)
    logits = _sq_dist_gap(p, t, bin_centers.to(dtype)) / (2 * s2)
    loss_rows = _log_mixture(bin_weights.to(dtype), logits) * (2 * s2).detach()
    return _reduction.reduce_rows(loss_rows, mask, reduction).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Fused backends (cpp, triton): the same calls on either backend's ops.
# --------------------------------------------------------------------------------------------------


def _fused_bmc(op, pred, target, candidates, mask, noise_var, reduction, check_finite):
    grad = compute_grad_flag(pred, noise_var)
    cands = None if candidates is None else candidates.contiguous()
    mask = None if mask is None else mask.contiguous()
    return op(pred.contiguous(), target.contiguous(), cands, mask, noise_var, reduction, grad, check_finite)[0]


def _fused_mixture(op, pred, target, mask, noise_var, tables, reduction, check_finite):
    grad = compute_grad_flag(pred, noise_var)
    mask = None if mask is None else mask.contiguous()
    return op(pred.contiguous(), target.contiguous(), mask, noise_var, *tables, reduction, grad, check_finite)[0]


def _fused_impls(bmc_op, mixture_op) -> dict:
    """The public ops ``bmc_loss``, ``gai_loss``, ``bni_loss`` on one backend's fused ops.

    ``check_finite=True``: the kernels check pred and target (kept rows) and BMC's candidates for NaN / inf
    in their own pass and raise ValueError naming the argument (docs/methods.md §1.8); the prior's
    parameters and sigma^2 are checked by the caller (imbreg_fast.functional)."""

    def bmc(pred, target, candidates, mask, noise_var, reduction, *, check_finite=False):
        return _fused_bmc(bmc_op, pred, target, candidates, mask, noise_var, reduction, check_finite)

    def gai(pred, target, mask, noise_var, weights, means, covariances, reduction, *, check_finite=False):
        tables = gai_tables(noise_var, weights, means, covariances, compute_dtype(pred.dtype))
        return _fused_mixture(mixture_op, pred, target, mask, noise_var, tables, reduction, check_finite)

    def bni(pred, target, mask, noise_var, bin_centers, bin_weights, reduction, *, check_finite=False):
        tables = bni_tables(noise_var, bin_centers, bin_weights, compute_dtype(pred.dtype))
        return _fused_mixture(mixture_op, pred, target, mask, noise_var, tables, reduction, check_finite)

    return {"bmc_loss": bmc, "gai_loss": gai, "bni_loss": bni}


# Triton ops: opaque custom ops around the host launchers. This form runs eagerly, under
# torch.compile(fullgraph=True) and opcheck, on CUDA and on CPU tensors under TRITON_INTERPRET=1 (a
# triton_op + wrap_triton op lets Inductor see the kernels, but fails under torch.compile with the
# interpreter's CPU tensors).


def _triton_kernels():
    from ..triton_kernels import balanced_mse
    return balanced_mse


@torch.library.custom_op("imbreg_fast::triton_bmc_fwd", mutates_args=())
def triton_bmc_fwd(pred: torch.Tensor, target: torch.Tensor, candidates: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], noise_var: torch.Tensor, reduction: int,
                   compute_grad: bool, check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton BMC: (loss, d loss/d pred, d loss/d sigma^2); see ``imbreg_fast::bmc_fwd``."""
    return _triton_kernels().bmc_fwd(pred, target, candidates, mask, noise_var, reduction, compute_grad,
                                     check_finite=check_finite)


@torch.library.custom_op("imbreg_fast::triton_mixture_nll_fwd", mutates_args=())
def triton_mixture_nll_fwd(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                           noise_var: torch.Tensor, log_weight: torch.Tensor, log_norm: torch.Tensor,
                           means: torch.Tensor, precision: torch.Tensor, grad_var_bias: torch.Tensor,
                           reduction: int, compute_grad: bool,
                           check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GAI/BNI mixture NLL: (loss, d loss/d pred, d loss/d sigma^2); see ``imbreg_fast::mixture_nll_fwd``."""
    return _triton_kernels().mixture_nll_fwd(pred, target, mask, noise_var, log_weight, log_norm, means, precision,
                                             grad_var_bias, reduction, compute_grad, check_finite=check_finite)


def _triton_supports(pred: torch.Tensor) -> str | None:
    from ..triton_kernels.common import MAX_DIM

    d = pred.shape[1] if pred.dim() == 2 else 1      # [N, d]; [N] and dense [B, 1, H, W] maps have d = 1
    if d > MAX_DIM:
        return f"the Triton kernels support targets of dimension d <= {MAX_DIM}, got d = {d}"
    return None


def register_backends(cpp: bool) -> None:
    """Register the family's backends with the dispatcher: torch, then cpp (when the extension is
    loaded), then triton."""
    register("bmc_loss", "torch")(bmc_torch)
    register("gai_loss", "torch")(gai_torch)
    register("bni_loss", "torch")(bni_torch)
    if cpp:
        impls = _fused_impls(register_fused_op("imbreg_fast::bmc_fwd", **LOSS_AUTOGRAD),
                             register_fused_op("imbreg_fast::mixture_nll_fwd", **LOSS_AUTOGRAD))
        for op, impl in impls.items():
            register(op, "cpp")(impl)
    impls = _fused_impls(register_fused_op("imbreg_fast::triton_bmc_fwd", **LOSS_AUTOGRAD),
                         register_fused_op("imbreg_fast::triton_mixture_nll_fwd", **LOSS_AUTOGRAD))
    for op, impl in impls.items():
        register(op, "triton", supports=_triton_supports)(impl)
