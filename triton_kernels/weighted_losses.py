"""Triton kernel of the weighted regression losses (docs/methods.md §2): MSE, L1, Huber, focal MSE, focal L1.

Installed as ``imbreg_fast.triton_kernels.weighted_losses``; the registered op that calls the launcher
(``imbreg_fast::triton_weighted_regression_fwd``) lives in ``imbreg_fast/ops/weighted_losses.py``.
The launcher follows the contract of the C++ op ``imbreg_fast::weighted_regression_fwd``
(csrc/weighted_losses.cpp): it returns ``(loss, grad_pred)``, d loss / d pred computed in the same pass as
the loss (already scaled by the reduction), or an empty ``[0]`` tensor when ``compute_grad`` is false.

One element-wise kernel, the loss kind a ``tl.constexpr``. Reductions (the named codes ``NONE`` / ``MEAN``
/ ``SUM`` / ``WEIGHTED_MEAN`` of ``common``): every program writes the partial sum of its elements' w·l;
the single-program ``common.finalize`` adds the partials in a fixed order (no atomics: deterministic run
to run) and divides by the denominator. The scale of 'mean' (1/kept count) and 'weighted_mean' (1/sum of
kept weights, ``common.reduction_scale``) is needed by the gradient in the main pass: the denominator is
computed first on the device (a torch reduction) and read by the kernels from a pointer, so nothing
synchronises with the host.

Precision: loads in the input dtype, compute in ``ACC`` (fp64 for fp64 inputs, else fp32), cast on store.
Focal factor: 2 sigmoid(x) - 1 = tanh(x/2), so both activations use s = tanh(kappa |e|) (kappa = beta/2 or
beta), evaluated as -m / (2 + m) with m = expm1(-2 kappa |e|) (accurate near 0; expm1 by Kahan's
``(u - 1) x / log u`` since libdevice's expm1 does not run under the interpreter).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .common import (MEAN, NONE, SUM, WEIGHTED_MEAN, acc_dtype, compute_dtype, device_guard, finalize,
                     flag_non_finite, flag_where, new_flag, non_finite_message, raise_flagged, reduction_scale)

__all__ = ["weighted_regression_fwd"]

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0, accurate near 0 (Kahan): (u - 1) x / log(u), u = exp(x)."""
    u = tl.exp(x)
    safe_u = tl.where((u == 1.0) | (u == 0.0), 0.5, u)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (safe_u - 1.0) * x / tl.log(safe_u)))


@triton.jit
def _from_bits(bits, ACC: tl.constexpr):
    """A float64 passed as its int64 bit pattern, in ACC (exact in fp64: a Python float argument would be
    typed fp32 by the launcher and lose precision)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


@triton.jit(do_not_specialize=["beta_bits", "kappa_bits", "gamma_bits"])
def _weighted_regression_fwd_kernel(
    pred_ptr,        # [N] predictions
    target_ptr,      # [N] targets
    weight_ptr,      # [N] weights (read when HAS_WEIGHT)
    mask_ptr,        # [N] bool: elements kept (read when HAS_MASK)
    denom_ptr,       # [] ACC: kept count ('mean' with mask) or sum of kept weights ('weighted_mean', times
                     # weight_scale)
    weight_scale_ptr,  # [] ACC: the weights' factor (read when SCALE_WEIGHT): 1, or a power of two (see launcher)
    loss_ptr,        # [N] w l ('none') or [num_programs] partial sums (ACC)
    grad_ptr,        # [N] d loss / d pred, scaled by the reduction
    flag_ptr,        # [] int32 value-check flag (CHECK): bits 1 / 2 / 4 NaN or inf in a kept pred / target /
                     # weight, 8 a kept weight < 0
    N, beta_bits, kappa_bits, gamma_bits,     # float64 bit patterns (see _from_bits)
    LOSS: tl.constexpr, GAMMA_CASE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    REDUCTION: tl.constexpr, READ_DENOM: tl.constexpr, COMPUTE_GRAD: tl.constexpr, CHECK: tl.constexpr,
    SCALE_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + offs, mask=ok, other=0) != 0)
    beta = _from_bits(beta_bits, ACC)
    kappa = _from_bits(kappa_bits, ACC)
    gamma = _from_bits(gamma_bits, ACC)
    # Dropped elements load e = 0 and w = 0 (NaN holes never reach the sums); l(0) = 0 for every kind.
    p = tl.load(pred_ptr + offs, mask=ok, other=0.0).to(ACC)
    y = tl.load(target_ptr + offs, mask=ok, other=0.0).to(ACC)
    e = p - y
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(ACC)
    else:
        w = tl.where(ok, 1.0, 0.0).to(ACC)
    if CHECK:
        flag_non_finite(flag_ptr, p, 1)
        flag_non_finite(flag_ptr, y, 2)
        if HAS_WEIGHT:
            flag_non_finite(flag_ptr, w, 4)
            flag_where(flag_ptr, w < 0, 8)
    if SCALE_WEIGHT:
        w = w * tl.load(weight_scale_ptr)             # exact: a power of two
    a = tl.abs(e)
    sign = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)).to(ACC)
    if LOSS == 0 or LOSS == 3:
        l = e * e                                  # dl/de = 2 e
        dl = 2.0 * e
    elif LOSS == 1 or LOSS == 4:
        l = a                                      # dl/de = sign(e)
        dl = sign
    else:
        # Huber: a < beta: a^2 / (2 beta), dl/de = e / beta;  else a - beta/2, dl/de = sign(e)
        small = a < beta
        l = tl.where(small, 0.5 * a * a / beta, a - 0.5 * beta)
        dl = tl.where(small, e / beta, sign)
    if LOSS == 3 or LOSS == 4:
        # L = l f, f = s^gamma, s = tanh(kappa a), ds/da = kappa (1 - s^2):
        #   dL/de = dl f + sign(e) gamma kappa (1 - s^2) f (l / s)     (l/s finite; the term is 0 at s = 0)
        m = _expm1(-2.0 * kappa * a)
        s = -m / (2.0 + m)
        pos = s > 0
        if GAMMA_CASE == 0:
            f = tl.full([BLOCK], 1.0, ACC)
        elif GAMMA_CASE == 1:
            f = s
        elif GAMMA_CASE == 2:
            f = s * s
        else:
            f = tl.where(pos, tl.exp(gamma * tl.log(tl.where(pos, s, 1.0))), 0.0)
        ratio = tl.where(pos, l / tl.where(pos, s, 1.0), 0.0)
        dl = dl * f + sign * (gamma * kappa) * (1.0 - s * s) * f * ratio
        l = l * f
    wl = w * l
    if REDUCTION == NONE:
        tl.store(loss_ptr + offs, wl.to(loss_ptr.dtype.element_ty), mask=offs < N)
    else:
        tl.store(loss_ptr + pid, tl.sum(wl, axis=0))
    if COMPUTE_GRAD:
        scale = reduction_scale(denom_ptr, N, REDUCTION, READ_DENOM, ACC)
        tl.store(grad_ptr + offs, (scale * w * dl).to(grad_ptr.dtype.element_ty), mask=offs < N)


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def weighted_regression_fwd(pred, target, weight, mask, loss: int, beta: float, gamma: float, activation: int,
                            reduction: int, compute_grad: bool, *, check_finite: bool = False, block: int = BLOCK):
    """Weighted regression loss and d loss / d pred in one pass (contract of
    ``imbreg_fast::weighted_regression_fwd``, csrc/weighted_losses.cpp). Returns (loss, grad_pred).
    ``check_finite``: the kernel flags a NaN / inf in a kept pred / target / weight or a kept weight < 0
    while loading them; then ``common.raise_flagged`` (ValueError naming the argument; on CUDA an
    asynchronous device-side assert)."""
    if target.shape != pred.shape or target.dtype != pred.dtype:
        raise ValueError(f"target must have pred's shape and dtype, got {tuple(target.shape)} {target.dtype} "
                         f"for pred {tuple(pred.shape)} {pred.dtype}")
    if weight is not None and (weight.shape != pred.shape or not weight.is_floating_point()):
        raise ValueError(f"weight must be a floating tensor of pred's shape {tuple(pred.shape)}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != pred.shape):
        raise ValueError(f"mask must be a bool tensor of pred's shape {tuple(pred.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if loss not in range(5) or activation not in (0, 1) or reduction not in (NONE, MEAN, SUM, WEIGHTED_MEAN):
        raise ValueError(f"loss must be 0..4, activation 0/1, reduction {NONE.value}..{WEIGHTED_MEAN.value}; got "
                         f"{loss}, {activation}, {reduction}")
    if loss >= 2 and not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    if loss >= 3 and not (gamma >= 0 and gamma < float("inf")):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    acc_torch = compute_dtype(pred.dtype)
    acc = acc_dtype(pred.dtype)
    p, y = pred.contiguous().reshape(-1), target.contiguous().reshape(-1)
    w = None if weight is None else weight.to(acc_torch).contiguous().reshape(-1)
    m = None if mask is None else mask.contiguous().reshape(-1)
    n = p.numel()
    num_programs = max(triton.cdiv(n, block), 1)

    # Denominator of 'mean' with a mask (kept count) or 'weighted_mean' (sum of kept weights), on the device.
    read_denom = bool((reduction == MEAN and m is not None)
                      or (reduction == WEIGHTED_MEAN and (m is not None or w is not None)))
    denom = p.new_empty((), dtype=acc_torch)
    scale_weight = reduction == WEIGHTED_MEAN and w is not None
    weight_scale = denom
    if read_denom:
        if scale_weight:
            denom = (w if m is None else torch.where(m, w, torch.zeros((), dtype=acc_torch, device=w.device))).sum()
            # subnormal weights: 1 / denom would overflow ACC, so the kernel takes every weight times
            # 2^(max exponent - 2) and the denominator is scaled alike (exact; on the device, no sync)
            big = torch.finfo(acc_torch).max
            factor = torch.full((), 2.0 ** (math.frexp(big)[1] - 2), dtype=acc_torch, device=denom.device)
            weight_scale = torch.where((denom > 0) & (denom < 1.0 / big), factor, torch.ones_like(factor))
            denom = denom * weight_scale
        else:
            denom = m.sum(dtype=acc_torch)

    grad = torch.empty(pred.shape if compute_grad else (0,), dtype=pred.dtype, device=pred.device)
    if reduction == NONE:
        out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
        loss_buf = out
    else:
        out = torch.empty((), dtype=pred.dtype, device=pred.device)
        loss_buf = torch.empty(num_programs, dtype=acc_torch, device=pred.device)
    kappa = 0.5 * beta if activation == 0 else beta
    gamma_case = 0 if gamma == 0 else 1 if gamma == 1 else 2 if gamma == 2 else 3
    check = bool(check_finite)
    flag = new_flag(p) if check else denom
    with device_guard(pred):
        if n > 0 or reduction != NONE:
            _weighted_regression_fwd_kernel[(num_programs,)](
                p, y, p if w is None else w, p if m is None else m, denom, weight_scale, loss_buf,
                grad if compute_grad else loss_buf,
                flag, n, _bits(beta), _bits(kappa), _bits(gamma),
                LOSS=loss, GAMMA_CASE=gamma_case, HAS_WEIGHT=w is not None, HAS_MASK=m is not None,
                REDUCTION=reduction, READ_DENOM=read_denom, COMPUTE_GRAD=compute_grad, CHECK=check,
                SCALE_WEIGHT=scale_weight, ACC=acc, BLOCK=block, num_warps=NUM_WARPS)
        if reduction != NONE:
            finalize(loss_buf, denom, out, n, reduction, read_denom, acc, divide=True)
    if check:
        masked = m is not None
        raise_flagged(flag, [non_finite_message("pred", masked), non_finite_message("target", masked),
                             non_finite_message("weight", masked),
                             "weight must be >= 0" + (" at kept elements" if masked else "")])
    return out, grad
