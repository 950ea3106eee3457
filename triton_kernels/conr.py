"""Triton kernels of ConR (docs/methods.md, ConR section; definitions and gradient in imbreg_fast/ops/conr.py).

Installed as ``imbreg_fast.triton_kernels.conr``; the registered ops that call the launchers
(``imbreg_fast::triton_conr_fwd`` / ``triton_conr_bwd``) live in ``imbreg_fast/ops/conr.py`` and follow the
contract of the C++ ops (csrc/conr.cpp).

Two tiled kernels over (row block x column block) tiles of the similarity matrix, recomputed per tile with
``tl.dot`` from the normalised features (never stored):

1. ``_conr_stats_kernel`` — one program per block of anchor rows streams the column blocks: masks,
   terms t_ij = S_ij + log a_ij, an online (max-shifted) log-sum-exp, |P_i|, |N_i|, sum_{P_i} S_ij; then the
   published ones (m_i = n - |P_i|, shifted by the same max), log D_i, 1/|P_i| and the anchor's loss.
2. ``_conr_grad_kernel`` — one program per block of rows k: per column tile H_kj = c_k G_kj + c_j G_jk from
   the statistics of rows k and j, accumulated as ``tl.dot(H, z_cols)`` into d L / d z_k, then the
   normalisation's Jacobian.

Normalisation, log omega, the coefficients c_i and the reduction of the per-anchor losses are small torch
ops on the device; nothing synchronises with the host (the value checks of ``check_finite`` are a
device-side assert on CUDA). Precision: fp64 for fp64 features, fp32 otherwise (``tl.dot`` with
``input_precision="ieee"``); the scalars travel in a small device tensor of that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import MEAN, NONE, compute_dtype, device_guard

__all__ = ["conr_fwd", "conr_bwd"]

NORM_EPS = 1e-12
BLOCK_M = 32
BLOCK_N = 32
MAX_D = 1024


@triton.jit
def _tile(z_ptr, y_ptr, p_ptr, params_ptr, rows, zr, yr, pr, start, n, d,
          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Similarities S [BM, BN] of the row block against columns [start, start + BN), the masks and |dy|."""
    cols = start + tl.arange(0, BLOCK_N)
    cmask = cols < n
    dcols = tl.arange(0, BLOCK_D)
    zc = tl.load(z_ptr + cols[:, None] * d + dcols[None, :], mask=cmask[:, None] & (dcols[None, :] < d), other=0.0)
    window = tl.load(params_ptr)
    inv_tau = tl.load(params_ptr + 1)
    s = tl.dot(zr, tl.trans(zc), input_precision="ieee", out_dtype=zr.dtype) * inv_tau
    yc = tl.load(y_ptr + cols, mask=cmask, other=0.0)
    pc = tl.load(p_ptr + cols, mask=cmask, other=0.0)
    dy = tl.abs(yr[:, None] - yc[None, :])
    dp = tl.abs(pr[:, None] - pc[None, :])
    both = (rows[:, None] < n) & cmask[None, :]
    pos = (dy <= window) & (rows[:, None] != cols[None, :]) & both
    neg = (dy > window) & (dp <= window) & both
    return cols, cmask, zc, s, dy, pos, neg


@triton.jit
def _conr_stats_kernel(
    z_ptr,         # [n, d] ACC normalised features
    y_ptr,         # [n] ACC targets
    p_ptr,         # [n] ACC predictions
    logw_ptr,      # [n] ACC log omega (0 without weights or where omega = 0)
    w_ptr,         # [n] ACC omega (read when HAS_W)
    params_ptr,    # [3] ACC: window, 1 / tau, pushing
    logd_ptr,      # [n] ACC out: log D_i (0 for invalid anchors)
    invp_ptr,      # [n] ACC out: 1 / |P_i| (0 for invalid anchors)
    loss_ptr,      # [n] ACC out: L_i
    n, d,
    HAS_W: tl.constexpr, PUBLISHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    dcols = tl.arange(0, BLOCK_D)
    zr = tl.load(z_ptr + rows[:, None] * d + dcols[None, :], mask=rmask[:, None] & (dcols[None, :] < d), other=0.0)
    yr = tl.load(y_ptr + rows, mask=rmask, other=0.0)
    pr = tl.load(p_ptr + rows, mask=rmask, other=0.0)
    lwr = tl.load(logw_ptr + rows, mask=rmask, other=0.0)
    pushing = tl.load(params_ptr + 2)
    zero = tl.zeros([BLOCK_M], dtype=yr.dtype)
    lowest = zero - 1e30                       # finite "no term yet": exp(lowest - lowest) stays defined
    m = lowest
    acc = zero
    n_pos = zero
    n_neg = zero
    s_pos = zero
    for start in range(0, n, BLOCK_N):
        cols, cmask, zc, s, dy, pos, neg = _tile(z_ptr, y_ptr, p_ptr, params_ptr, rows, zr, yr, pr, start, n, d,
                                                 BLOCK_N, BLOCK_D)
        live = pos | neg
        t = tl.where(pos, s, s + lwr[:, None] + pushing * dy)
        m_new = tl.maximum(m, tl.max(tl.where(live, t, lowest[:, None]), axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.where(live, tl.exp(tl.minimum(t - m_new[:, None], 0.0)), 0.0), axis=1)
        m = m_new
        n_pos += tl.sum(pos.to(yr.dtype), axis=1)
        n_neg += tl.sum(neg.to(yr.dtype), axis=1)
        s_pos += tl.sum(tl.where(pos, s, 0.0), axis=1)
    valid = (n_pos > 0) & (n_neg > 0) & rmask
    if PUBLISHED:
        log_ones = tl.log(tl.maximum(n - n_pos, 1.0))    # m_i = n - |P_i| >= 1
        m_f = tl.maximum(m, log_ones)
        acc = acc * tl.exp(m - m_f) + tl.exp(log_ones - m_f)
        m = m_f
    log_d = m + tl.log(tl.where(valid, acc, 1.0))
    inv = tl.where(valid, 1.0 / tl.maximum(n_pos, 1.0), 0.0)
    loss = log_d - s_pos * inv
    if HAS_W:
        loss = loss * tl.load(w_ptr + rows, mask=rmask, other=0.0)
    tl.store(logd_ptr + rows, tl.where(valid, log_d, 0.0), mask=rmask)
    tl.store(invp_ptr + rows, inv, mask=rmask)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=rmask)


@triton.jit
def _conr_grad_kernel(
    z_ptr, y_ptr, p_ptr, logw_ptr, params_ptr,   # as _conr_stats_kernel
    logd_ptr,      # [n] ACC log D_j
    invp_ptr,      # [n] ACC 1 / |P_j| (0: invalid)
    coef_ptr,      # [n] ACC c_j (0 for invalid anchors)
    denom_ptr,     # [n] ACC max(|f_j|, eps)
    grad_ptr,      # [n, d] out (features' dtype): d (sum_i c_i l_i) / d f
    n, d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < d
    zr = tl.load(z_ptr + rows[:, None] * d + dcols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    yr = tl.load(y_ptr + rows, mask=rmask, other=0.0)
    pr = tl.load(p_ptr + rows, mask=rmask, other=0.0)
    lwr = tl.load(logw_ptr + rows, mask=rmask, other=0.0)
    ldr = tl.load(logd_ptr + rows, mask=rmask, other=0.0)
    ivr = tl.load(invp_ptr + rows, mask=rmask, other=0.0)
    cr = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    pushing = tl.load(params_ptr + 2)
    inv_tau = tl.load(params_ptr + 1)
    gz = tl.zeros([BLOCK_M, BLOCK_D], dtype=zr.dtype)
    for start in range(0, n, BLOCK_N):
        cols, cmask, zc, s, dy, pos, neg = _tile(z_ptr, y_ptr, p_ptr, params_ptr, rows, zr, yr, pr, start, n, d,
                                                 BLOCK_N, BLOCK_D)
        lwc = tl.load(logw_ptr + cols, mask=cmask, other=0.0)
        ldc = tl.load(logd_ptr + cols, mask=cmask, other=0.0)
        ivc = tl.load(invp_ptr + cols, mask=cmask, other=0.0)
        cc = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
        # G_kj = a_kj e^{S_kj} / D_k - [j in P_k] / |P_k|, log a_kj = log omega_k + e |dy| for a negative;
        # H_kj = c_k G_kj + c_j G_jk (the masks are symmetric)
        push = pushing * dy
        e_row = tl.exp(tl.minimum(tl.where(pos, s, s + push + lwr[:, None]) - ldr[:, None], 0.0))
        e_col = tl.exp(tl.minimum(tl.where(pos, s, s + push + lwc[None, :]) - ldc[None, :], 0.0))
        on_pos = cr[:, None] * (e_row - ivr[:, None]) + cc[None, :] * (e_col - ivc[None, :])
        on_neg = cr[:, None] * e_row + cc[None, :] * e_col
        h = tl.where(pos, on_pos, tl.where(neg, on_neg, 0.0))
        gz += tl.dot(h, zc, input_precision="ieee", out_dtype=gz.dtype)
    gz = gz * inv_tau
    # d / d f_k = (g - z_k (z_k . g)) / |f_k| for |f_k| > eps, g / eps otherwise
    dn = tl.load(denom_ptr + rows, mask=rmask, other=1.0)
    proj = tl.sum(zr * gz, axis=1)
    out = tl.where((dn > 1e-12)[:, None], (gz - zr * proj[:, None]) / dn[:, None], gz / dn[:, None])
    tl.store(grad_ptr + rows[:, None] * d + dcols[None, :], out.to(grad_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def _check_values(features, targets, preds, weights) -> None:
    """check_finite: ValueError naming the argument (CPU, the interpreter), device-side assert on CUDA."""
    named = [("features", ~torch.isfinite(features)), ("targets", ~torch.isfinite(targets)),
             ("preds", ~torch.isfinite(preds))]
    if weights is not None:
        named.append(("weights", ~torch.isfinite(weights)))
        named.append(("weights (>= 0)", weights < 0))
    for name, bad in named:
        message = (f"{name.split()[0]} must be >= 0" if "(" in name else
                   f"{name} contains NaN or inf (pass check_finite=False to skip this check)")
        if features.is_cuda:
            torch._assert_async(~bad.any(), f"imbreg_fast: conr_loss: {message}")
        elif bool(bad.any()):
            raise ValueError(message)


def _blocks(d: int):
    if d > MAX_D:
        raise ValueError(f"the Triton ConR kernel holds a row of features in registers: d <= {MAX_D}, got {d}")
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)))


def _prepare(features, targets, preds, weights, window, temperature, pushing):
    cdt = compute_dtype(features.dtype)
    f = features.to(cdt)
    denom = torch.linalg.vector_norm(f, dim=1).clamp_min(NORM_EPS)
    z = (f / denom[:, None]).contiguous()
    w = None if weights is None else weights.to(cdt).contiguous()
    log_w = torch.zeros_like(denom) if w is None else torch.where(w > 0, w, 1.0).log()
    params = torch.tensor([window, 1.0 / temperature, pushing], dtype=cdt, device=features.device)
    return z, denom, w, log_w, params


def _statistics(z, targets, preds, w, log_w, params, published, blocks):
    n, d = z.shape
    log_d, inv_pos, loss_rows = (torch.empty(n, dtype=z.dtype, device=z.device) for _ in range(3))
    if n > 0:
        _conr_stats_kernel[(triton.cdiv(n, blocks["BLOCK_M"]),)](
            z, targets, preds, log_w, w if w is not None else log_w, params, log_d, inv_pos, loss_rows, n, d,
            HAS_W=w is not None, PUBLISHED=bool(published), **blocks)
    return log_d, inv_pos, loss_rows


def _gradient(features, z, targets, preds, log_w, params, log_d, inv_pos, coef, denom, blocks):
    n, d = z.shape
    grad = torch.empty(features.shape, dtype=features.dtype, device=features.device)
    if n > 0:
        _conr_grad_kernel[(triton.cdiv(n, blocks["BLOCK_M"]),)](
            z, targets, preds, log_w, params, log_d, inv_pos, coef, denom, grad, n, d, **blocks)
    return grad


def conr_fwd(features, targets, preds, weights, window, temperature, pushing, published_denominator, reduction,
             compute_grad, *, check_finite=False):
    """(loss, grad_features): the contract of ``imbreg_fast::conr_fwd`` (csrc/conr.cpp)."""
    with device_guard(features):
        if check_finite:
            _check_values(features, targets, preds, weights)
        blocks = _blocks(features.shape[1])
        z, denom, w, log_w, params = _prepare(features, targets, preds, weights, window, temperature, pushing)
        targets, preds = targets.contiguous(), preds.contiguous()
        log_d, inv_pos, loss_rows = _statistics(z, targets, preds, w, log_w, params, published_denominator, blocks)
        n = features.shape[0]
        if reduction == NONE:
            loss = loss_rows.to(features.dtype)
        else:
            loss = loss_rows.sum()
            if reduction == MEAN:
                loss = loss / max(n, 1)
            loss = loss.to(features.dtype)
        if not compute_grad or reduction == NONE:
            return loss, features.new_empty(0)
        r = 1.0 / max(n, 1) if reduction == MEAN else 1.0
        base = torch.full_like(inv_pos, r) if w is None else r * w
        coef = torch.where(inv_pos > 0, base, 0.0).contiguous()
        return loss, _gradient(features, z, targets, preds, log_w, params, log_d, inv_pos, coef, denom, blocks)


def conr_bwd(features, targets, preds, weights, grad_rows, window, temperature, pushing, published_denominator):
    """d (sum_i grad_rows_i L_i) / d features: the contract of ``imbreg_fast::conr_bwd``."""
    with device_guard(features):
        blocks = _blocks(features.shape[1])
        z, denom, w, log_w, params = _prepare(features, targets, preds, weights, window, temperature, pushing)
        targets, preds = targets.contiguous(), preds.contiguous()
        log_d, inv_pos, _ = _statistics(z, targets, preds, w, log_w, params, published_denominator, blocks)
        g = grad_rows.to(z.dtype)
        coef = torch.where(inv_pos > 0, g if w is None else g * w, 0.0).contiguous()
        return _gradient(features, z, targets, preds, log_w, params, log_d, inv_pos, coef, denom, blocks)
