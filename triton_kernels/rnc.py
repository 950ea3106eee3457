"""Triton kernels of Rank-N-Contrast (docs/methods.md, RnC; definitions in imbreg_fast/ops/rnc.py).

Installed as ``imbreg_fast.triton_kernels.rnc``; the registered op that calls the launcher
(``imbreg_fast::triton_rnc_fwd``) lives in ``imbreg_fast/ops/rnc.py`` and follows the contract of the C++ op
``imbreg_fast::rnc_fwd`` (csrc/rnc.cpp): (loss, d loss / d features) in one call.

Three kernels, O(n^2 log^2 n) work and O(n^2) memory (two [n, n] scratch matrices: distances r, coefficients W):

1. ``_distance_kernel`` — (row block x column block) tiles of r_ij = ||f_i - f_j||_2, accumulating
   sum_c (f_ic - f_jc)^2 over feature chunks from the differences themselves (never ||a||^2 + ||b||^2 - 2 a.b,
   which loses the small distances of two views of one sample).
2. ``_row_kernel`` — one program per anchor i holds its whole row (BLOCK = next_pow2(n) lanes, n <= MAX_N):
   label distances d_ij, then a bitonic sort of the columns j != i by (d_ij, j) (a strict total order on
   integer keys: the bit pattern of d >= 0 is monotone; the column index is the payload and breaks ties, so the
   network is deterministic), the suffix log-sum-exp of s_ij = -r_ij / tau along the sorted order (an
   associative scan with a running max: finite for any distance / tau), log Z at each tie group's head, the
   anchor's loss, and the coefficients W_ij = c_i d l_i / d s_ij written back in column order.
3. ``_grad_kernel`` — (row block, feature chunk) programs stream the column tiles:
   d loss / d f_i = sum_{j != i, r_ij > 0} -(W_ij + W_ji) / (tau r_ij) (f_i - f_j), from the differences
   (W^T read as transposed tiles of the scratch).

Gradient coefficients (derivation, as the C++ kernel): with tie groups g in sorted order, Z_g the suffix sum
from g's head and m_h the size of group h,

    d l_i / d s_ij = (1 / (n - 1)) (-1 + e^{s_ij - log Z_g(j)} T_g(j)),   T_g = sum_{h <= g} m_h e^{log Z_g - log Z_h}

(j is in the denominator of every column k whose group is at or before j's). T_g is read off a forward
log-sum-exp scan of a_q = -log Z_q (one term per column, so group h contributes m_h terms): at the last
position of group g the scan holds (M, S) with sum_{q <= end(g)} e^{a_q} = e^M S, hence
T_g = S e^{M + log Z_g} (M = a_end = -log Z_g when Z decreases along the sorted order: T_g = S, no
cancellation of large logarithms).

Reductions: the per-anchor losses l_i are summed on the device with torch (no host sync); 'mean' weighs each
anchor's coefficients by 1/n, an anchor weight (the 'none' backward) by w_i. Fewer than 2 rows: loss 0, no
launch. Precision: fp64 for fp64 features, fp32 otherwise (the glue upcasts half types); label distances in
the labels' own dtype (the published ties); the temperature travels in a one-element tensor of the compute
dtype. A NaN / inf label distance in a row makes that row's loss and coefficients NaN (never an undefined
sort).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import MEAN, NONE, acc_dtype, device_guard

__all__ = ["rnc_fwd", "MAX_N"]

MAX_N = 4096      # the row kernel holds a whole row in one block: BLOCK = next_pow2(n) <= MAX_N
BLOCK_I = 16      # distance / gradient kernels: rows per program
BLOCK_J = 16      # columns per tile
BLOCK_D = 32      # feature values per chunk


# --------------------------------------------------------------------------------------------------
# 1. pairwise distances
# --------------------------------------------------------------------------------------------------


@triton.jit
def _distance_kernel(
    f_ptr,        # [n, d] features (ACC)
    r_ptr,        # [n, n] out: ||f_i - f_j||_2 (ACC)
    n, d,
    ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < n
    col_ok = cols < n
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < d
        a = tl.load(f_ptr + rows[:, None] * d + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(f_ptr + cols[:, None] * d + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        diff = a[:, None, :] - b[None, :, :]           # [BI, BJ, BD]
        acc += tl.sum(diff * diff, axis=2)
    tl.store(r_ptr + rows[:, None] * n + cols[None, :], tl.sqrt(acc), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------------
# 2. per anchor row: sort by label distance, suffix log-sum-exp, loss, coefficients
# --------------------------------------------------------------------------------------------------


@triton.jit
def _xor_combine(a, b):
    return a ^ b


@triton.jit
def _lse_combine(m1, s1, m2, s2):
    """(max, sum of e^{x - max}) of two runs: associative; both maxima finite, so never NaN."""
    m = tl.maximum(m1, m2)
    return m, s1 * tl.exp(m1 - m) + s2 * tl.exp(m2 - m)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _side(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """[1, .., 2, .., 1] (0, 1) along hypercube axis AXIS (counted from the outermost) of a [2] * N_DIMS block."""
    return tl.reshape(tl.arange(0, 2), [1] * AXIS + [2] + [1] * (N_DIMS - AXIS - 1))


@triton.jit
def _compare_swap(key, idx, flip, N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """One compare-and-swap layer of the bitonic network between the lanes paired along hypercube axis AXIS:
    the lower lane keeps the smaller (key, idx) where flip is 0, the larger where it is 1. The partner's value
    is x ^ (x ^ partner) (an XOR-reduction over the pair); (key, idx) pairs are distinct, so exactly one lane of
    each pair swaps or neither does: the payload stays a permutation."""
    pk = key ^ tl.reduce(key, AXIS, _xor_combine, keep_dims=True)
    pi = idx ^ tl.reduce(idx, AXIS, _xor_combine, keep_dims=True)
    after = (key > pk) | ((key == pk) & (idx > pi))       # this lane's pair sorts after the partner's
    upper = _side(N_DIMS, AXIS)
    swap = after != ((flip ^ upper) != 0)
    return tl.where(swap, pk, key), tl.where(swap, pi, idx)


@triton.jit
def _sort_by_key(key, idx, BLOCK: tl.constexpr, N_DIMS: tl.constexpr):
    """Ascending bitonic sort of the [BLOCK] integer pairs (key, idx) (BLOCK = 2^N_DIMS, idx distinct):
    N_DIMS (N_DIMS + 1) / 2 compare-and-swap layers on the [2] * N_DIMS hypercube view of the row."""
    k = tl.reshape(key, [2] * N_DIMS)
    j = tl.reshape(idx, [2] * N_DIMS)
    for stage in tl.static_range(1, N_DIMS + 1):
        # merge runs of 2^stage lanes: ascending / descending alternately (bit `stage` of the lane), the last
        # stage ascending
        if stage < N_DIMS:
            flip = _side(N_DIMS, N_DIMS - 1 - stage)
        else:
            flip = tl.zeros([1] * N_DIMS, dtype=tl.int32)
        for t in tl.static_range(stage):
            k, j = _compare_swap(k, j, flip, N_DIMS, N_DIMS - stage + t)
    return tl.reshape(k, [BLOCK]), tl.reshape(j, [BLOCK])


@triton.jit
def _row_kernel(
    r_ptr,        # [n, n] distances (ACC)
    y_ptr,        # [n, L] labels (their own dtype: the label distances are computed in it)
    coef_ptr,     # [n] c_i: reduction weight of anchor i (ACC; read when GRAD)
    tau_ptr,      # [1] temperature (ACC)
    loss_ptr,     # [n] out: per-anchor loss l_i (ACC)
    w_ptr,        # [n, n] out: W_ij = c_i d l_i / d s_ij, j != i (ACC; written when GRAD)
    n, L,
    GRAD: tl.constexpr, KEY64: tl.constexpr, BLOCK: tl.constexpr, N_DIMS: tl.constexpr,
):
    i = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    col_ok = (lane < n) & (lane != i)
    tau = tl.load(tau_ptr)
    s = -tl.load(r_ptr + i * n + lane, mask=col_ok, other=0.0) / tau       # [BLOCK] s_ij in column order

    # label distances d_ij = sum_c |y_ic - y_jc| (in the labels' dtype)
    dist = tl.abs(tl.load(y_ptr + i * L) - tl.load(y_ptr + lane * L, mask=col_ok, other=0.0))
    for c in range(1, L):
        dist += tl.abs(tl.load(y_ptr + i * L + c) - tl.load(y_ptr + lane * L + c, mask=col_ok, other=0.0))
    bad = tl.max((col_ok & ~(dist < float("inf"))).to(tl.int32), axis=0) != 0     # NaN / inf label distance
    dist = tl.abs(dist)                       # sign bit clear (a NaN may carry one): bit patterns are monotone
    if KEY64:
        key = dist.to(tl.int64, bitcast=True)
    else:
        key = dist.to(tl.int32, bitcast=True)
    key = tl.where(col_ok, key, -1)           # the diagonal and the padding sort first, before every d >= 0
    key, order = _sort_by_key(key, lane, BLOCK, N_DIMS)

    m = n - 1                                 # columns per anchor
    first = BLOCK - m                         # sorted positions [first, BLOCK) hold the columns j != i
    valid = lane >= first
    s_sorted = tl.gather(s, order, 0)
    prev_key = tl.gather(key, tl.maximum(lane - 1, 0), 0)
    next_key = tl.gather(key, tl.minimum(lane + 1, BLOCK - 1), 0)
    is_head = valid & ((lane == first) | (key != prev_key))
    is_end = valid & ((lane == BLOCK - 1) | (key != next_key))

    # suffix log-sum-exp along the sorted order: log sum_{q >= p} e^{s_q} = sm + log(ss)
    sm, ss = tl.associative_scan((s_sorted, tl.full([BLOCK], 1.0, s_sorted.dtype)), 0, _lse_combine,
                                 reverse=True)
    lse = sm + tl.log(ss)
    head = tl.associative_scan(tl.where(is_head, lane, 0), 0, _max_combine)
    log_z = tl.gather(lse, head, 0)           # log Z of the position's tie group (suffix from its head)
    row_loss = tl.sum(tl.where(valid, log_z - s_sorted, 0.0), axis=0) / m
    nan = float("nan")
    tl.store(loss_ptr + i, tl.where(bad, nan, row_loss))

    if GRAD:
        # T_g: forward log-sum-exp scan of a_q = -log Z_q, read at the last position of each group
        ones = tl.where(valid, 1.0, 0.0).to(log_z.dtype)        # (a python-float where is fp32)
        am, asum = tl.associative_scan((tl.where(valid, -log_z, 0.0), ones), 0, _lse_combine)
        end = tl.associative_scan(tl.where(is_end, lane, BLOCK - 1), 0, _min_combine, reverse=True)
        # (the padding lanes' exponent is not bounded: kept at 0 so they stay finite)
        t = tl.gather(asum, end, 0) * tl.exp(tl.where(valid, tl.gather(am, end, 0) + log_z, 0.0))
        coef = tl.load(coef_ptr + i) / m
        w = coef * (tl.exp(s_sorted - log_z) * t - 1.0)
        w = tl.where(bad, nan, w)
        tl.store(w_ptr + i * n + order, w, mask=valid)


# --------------------------------------------------------------------------------------------------
# 3. chain through the distances
# --------------------------------------------------------------------------------------------------


@triton.jit
def _grad_kernel(
    f_ptr,        # [n, d] features (ACC)
    r_ptr,        # [n, n] distances (ACC)
    w_ptr,        # [n, n] W (ACC; the diagonal is never read)
    tau_ptr,      # [1] temperature (ACC)
    g_ptr,        # [n, d] out: d loss / d f (ACC)
    n, d,
    ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ks = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n
    k_ok = ks < d
    tau = tl.load(tau_ptr)
    fi = tl.load(f_ptr + rows[:, None] * d + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=ACC)
    for j0 in range(0, n, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < n
        ok = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        r = tl.load(r_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        w = (tl.load(w_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
             + tl.load(w_ptr + cols[None, :] * n + rows[:, None], mask=ok, other=0.0))
        # d s_ij / d f_i = -(f_i - f_j) / (tau r_ij); r = 0 (coincident features): subgradient 0
        live = ok & (r > 0)
        h = tl.where(live, -w / (tau * tl.where(live, r, 1.0)), 0.0)        # [BI, BJ]
        fj = tl.load(f_ptr + cols[:, None] * d + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        diff = fi[:, None, :] - fj[None, :, :]                                # [BI, BJ, BD]
        acc += tl.sum(h[:, :, None] * diff, axis=1)
    tl.store(g_ptr + rows[:, None] * d + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _check(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rnc (Triton): {name} must be float32 or float64, got {t.dtype}")


def row_block(n: int) -> int:
    """Lanes of the row kernel for n anchors (ValueError beyond MAX_N: no silent truncation)."""
    if n > MAX_N:
        raise ValueError(f"the Triton RnC kernel sorts a whole row in one block: n <= {MAX_N} anchors, got n = {n} "
                         "(use backend='cpp' or 'torch')")
    return max(2, triton.next_power_of_2(n))


def rnc_fwd(features: torch.Tensor, labels: torch.Tensor, anchor_weight, temperature: float, reduction: int,
            compute_grad: bool):
    """(loss, grad_features): the contract of ``imbreg_fast::rnc_fwd`` (csrc/rnc.cpp)."""
    _check("features", features)
    _check("labels", labels)
    if features.dim() != 2:
        raise ValueError(f"rnc (Triton): features must be [n, d], got {tuple(features.shape)}")
    n, d = features.shape
    if labels.dim() != 2 or labels.shape[0] != n or labels.shape[1] < 1:
        raise ValueError(f"rnc (Triton): labels must be [{n}, L] with L >= 1, got {tuple(labels.shape)}")
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"rnc (Triton): temperature must be finite and > 0, got {temperature}")
    if anchor_weight is not None and (anchor_weight.dim() != 1 or anchor_weight.shape[0] != n):
        raise ValueError(f"rnc (Triton): anchor_weight must be [{n}], got {tuple(anchor_weight.shape)}")
    block = row_block(n)
    f = features.contiguous()
    y = labels.contiguous()
    dtype = f.dtype
    w = None if anchor_weight is None else anchor_weight.to(dtype)
    if n < 2:
        loss = f.new_zeros(n) if reduction == int(NONE) else f.new_zeros(())
        return loss, (f.new_zeros(n, d) if compute_grad else f.new_empty(0))

    acc = acc_dtype(dtype)
    tau = torch.full((1,), float(temperature), dtype=dtype, device=f.device)
    scale = 1.0 / n if reduction == int(MEAN) else 1.0
    coef = torch.full((n,), scale, dtype=dtype, device=f.device) if w is None else (w * scale).contiguous()
    r = f.new_empty(n, n)
    rows = f.new_empty(n)
    wmat = f.new_empty(n, n) if compute_grad else rows
    with device_guard(f):
        _distance_kernel[(triton.cdiv(n, BLOCK_I), triton.cdiv(n, BLOCK_J))](
            f, r, n, d, ACC=acc, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D)
        _row_kernel[(n,)](r, y, coef, tau, rows, wmat, n, y.shape[1], GRAD=bool(compute_grad),
                          KEY64=y.dtype == torch.float64, BLOCK=block, N_DIMS=block.bit_length() - 1,
                          num_warps=max(4, min(16, block // 256)))
        grad = f.new_empty(0)
        if compute_grad:
            grad = torch.empty_like(f)
            if d > 0:
                _grad_kernel[(triton.cdiv(n, BLOCK_I), triton.cdiv(d, BLOCK_D))](
                    f, r, wmat, tau, grad, n, d, ACC=acc, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D)
    weighted = rows if w is None else rows * w
    if reduction == int(NONE):
        loss = weighted
    else:
        loss = weighted.sum()
        if reduction == int(MEAN):
            loss = loss / n
    return loss, grad
