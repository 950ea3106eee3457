"""Triton kernels of the Balanced MSE family (docs/methods.md §1): BMC, and GAI/BNI through one mixture kernel.

Installed as ``imbreg_fast.triton_kernels.balanced_mse``; the registered ops that call the launchers
(``bmc_fwd``, ``mixture_nll_fwd``) live in ``imbreg_fast/ops/balanced_mse.py``. The launchers follow
the contract of the C++ ops ``imbreg_fast::bmc_fwd`` / ``imbreg_fast::mixture_nll_fwd``
(csrc/balanced_mse.cpp): they return ``(loss, grad_pred, grad_noise_var)``, the two gradients computed in
the same pass as the loss (already scaled by the reduction weight), or empty ``[0]`` tensors when
``compute_grad`` is false.

Launches per call: a prologue kernel that lays out the candidates (BMC) or the component tables (GAI/BNI)
planar, padded to whole tiles and pre-scaled (O(M) / O(K) work; GAI/BNI at d = 1 also a one-program kernel
that decides on the device whether the tables are a BNI uniform grid, see "BNI on a uniform grid"), the main kernel (one program per block
of rows), and for 'mean' / 'sum' a one-program kernel that adds the per-program partial sums in a fixed
order (deterministic: no atomics). The 'mean' weight 1/count is read from a device tensor
(count = kept rows, ``mask.sum()`` on the device): nothing on the path synchronises with the host.

Precision: inputs are loaded in their dtype and everything is computed in ``ACC`` (fp32 for fp32, fp16
and bf16 inputs; fp64 for fp64 inputs); results are cast to the output dtype on store.

Layout: the main kernels work on [BLOCK_CANDS or BLOCK_COMPS, BLOCK_ROWS] tiles with the rows on the fast
axis. Triton's default layout then gives each thread whole columns (its rows x all candidates/components
of the tile), so the per-row reductions of the online softmax stay in registers: no shuffles, no shared
memory, and the candidate/component values are broadcast loads. (Rows on the slow axis made Triton
spread a row over 32 lanes: over 20 shuffles per logit.) Block sizes are fixed, chosen from the sm_90 SASS
(no autotuning: with the interpreter an autotuner of several configs cannot run, and the tests must
exercise the configuration the GPU runs). The target dimension D <= 4 (``MAX_DIM``, defined in
``common``) is a compile-time constant with one register accumulator per dimension.

Reductions are the named codes of ``common`` (``NONE`` / ``MEAN`` / ``SUM``); the second stage and the
'mean' weight are ``common.finalize`` and ``common.reduction_scale``, shared with the other families.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (MAX_DIM, MEAN, NONE, SUM, acc_dtype, compute_dtype, device_guard, finalize, flag_bits,
                     flag_non_finite, new_flag, non_finite_message, raise_flagged, reduction_scale)

# Bits of the value-check flag (check_finite): a NaN / inf at a kept row of pred, target; in a candidate.
_PRED, _TARGET, _CANDIDATES = 1, 2, 4

__all__ = ["MAX_DIM", "bmc_fwd", "mixture_grid_tables", "mixture_nll_fwd"]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Block sizes. Rows per program = 32 lanes x num_warps x rows per thread; a thread holds its rows x the
# tile's candidates/components in registers. Chosen from the sm_90 SASS (ptxas, no GPU needed): the
# largest tiles without register spills, e.g. BMC d = 1 fp32 [16 x 256]: 127 registers, main loop
# 10.75 instructions per logit; mixture d = 1 fp32 [8 x 512]: 106 registers, 12 per logit.
BMC_BLOCK_CANDS = 16
BMC_NUM_WARPS = 4
MIXTURE_BLOCK_COMPS = 8
MIXTURE_NUM_WARPS = 4
PROLOGUE_BLOCK = 1024


def bmc_block_rows(d: int, dtype: torch.dtype) -> int:
    return 128 if dtype == torch.float64 or d >= 3 else 256


def mixture_block_rows(d: int, dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        return 128 if d >= 3 else 256
    return 256 if d >= 3 else 512


@triton.jit
def _load_dim(ptr, idx, k: tl.constexpr, D: tl.constexpr, valid, ACC: tl.constexpr):
    """Column k of a row-major [*, D] array at rows ``idx``; 0 where not ``valid``."""
    return tl.load(ptr + idx * D + k, mask=valid, other=0.0).to(ACC)


@triton.jit
def _store(ptr, offsets, ok, x):
    tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# BMC: row i against its candidates, streamed in tiles with an online softmax (the N x M logits never
# exist in memory).
#
# With the positive shifted out, l'_ij = l_ij - l_ii = (|p_i - y_i|^2 - |p_i - c_j|^2) / (2 s2)
#                                        = sum_k (c_jk - y_ik) (2 p_ik - y_ik - c_jk) / (2 s2),
# a product of two well-conditioned factors (no cancellation of two huge distances when the prediction
# is far from every target, or sigma is tiny); l'_ii = 0 exactly. Then, with s_ij = softmax_j(l'_ij):
#   L_i        = 2 s2 (-l_ii + LSE_j l_ij)  = 2 s2 LSE_j l'_ij
#   dL_i/dp_i  = 2 (sum_j s_ij c_j - y_i)   = 2 sum_j s_ij (c_j - y_i)
#   dL_i/ds2   = 2 (l_ii - sum_j s_ij l_ij) = -2 sum_j s_ij l'_ij
# (dl_ij/dp_i = -(p_i - c_j)/s2 and dl_ij/ds2 = -l_ij/s2, the 2 s2 factor being under stop-gradient.)
# Logits are in base-2 units, t = l' log2(e) = sum_k (c_jk - y_ik) (a_ik - cs_jk) with
# a_ik = (2 p_ik - y_ik) log2(e)/(2 s2) and cs_jk = c_jk log2(e)/(2 s2), so exp2 is the native instruction.
# The running max starts at 0, the positive's t: default mode streams all kept targets (the positive
# among them, t = 0, no diagonal test needed); with explicit candidates the positive is not streamed
# and seeds the sums instead (sum e = 1, sum e t = 0, sum e (c - y_i) = 0).
# Dropped candidates and the padding of the last tile are zero-valued with an additive bias of -inf
# (one add per logit, and only in tiles that need it); sum e t and sum e dy use the unbiased t.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bmc_candidates_kernel(
    src_ptr,          # [M, D] candidates, or the targets (TARGETS_AS_CANDS)
    mask_ptr,         # [M] bool: candidates kept (HAS_MASK)
    noise_var_ptr,    # [] sigma^2
    cand_ptr,         # [D, M_pad] out (ACC): candidates, planar; 0 where dropped or padding
    cand_scaled_ptr,  # [D, M_pad] out (ACC): candidates * log2(e) / (2 sigma^2)
    bias_ptr,         # [M_pad] out (ACC): 0 for kept candidates, -inf for dropped ones and padding
    flag_ptr,         # [] int32: value-check flag (CHECK: bit 4 for a NaN / inf candidate)
    M, M_pad,
    D: tl.constexpr, HAS_MASK: tl.constexpr, CHECK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_pad = idx < M_pad
    kept = idx < M
    if HAS_MASK:
        kept = kept & (tl.load(mask_ptr + idx, mask=kept, other=0) != 0)
    scale = LOG2E / (2.0 * tl.load(noise_var_ptr).to(ACC))
    tl.store(bias_ptr + idx, tl.where(kept, 0.0, float("-inf")).to(ACC), mask=in_pad)
    for k in tl.static_range(D):
        c = _load_dim(src_ptr, idx, k, D, kept, ACC)
        if CHECK:
            flag_non_finite(flag_ptr, c, 4)
        tl.store(cand_ptr + k * M_pad + idx, c, mask=in_pad)
        tl.store(cand_scaled_ptr + k * M_pad + idx, c * scale, mask=in_pad)


@triton.jit
def _bmc_tile(start, cand_ptr, cand_scaled_ptr, bias_ptr, M_pad,
              y0, y1, y2, y3, a0, a1, a2, a3,
              m, sum_e, sum_et, sum_ed0, sum_ed1, sum_ed2, sum_ed3,
              D: tl.constexpr, BIAS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_CANDS: tl.constexpr):
    """Online-softmax update of a block of rows with candidates [start, start + BLOCK_CANDS)."""
    cols = start + tl.arange(0, BLOCK_CANDS)
    c = tl.load(cand_ptr + cols)
    dy0 = c[:, None] - y0[None, :]                                        # [BLOCK_CANDS, BLOCK_ROWS]
    t = dy0 * (a0[None, :] - tl.load(cand_scaled_ptr + cols)[:, None])
    if D > 1:
        c = tl.load(cand_ptr + M_pad + cols)
        dy1 = c[:, None] - y1[None, :]
        t += dy1 * (a1[None, :] - tl.load(cand_scaled_ptr + M_pad + cols)[:, None])
    if D > 2:
        c = tl.load(cand_ptr + 2 * M_pad + cols)
        dy2 = c[:, None] - y2[None, :]
        t += dy2 * (a2[None, :] - tl.load(cand_scaled_ptr + 2 * M_pad + cols)[:, None])
    if D > 3:
        c = tl.load(cand_ptr + 3 * M_pad + cols)
        dy3 = c[:, None] - y3[None, :]
        t += dy3 * (a3[None, :] - tl.load(cand_scaled_ptr + 3 * M_pad + cols)[:, None])
    t_kept = t
    if BIAS:
        t_kept = t + tl.load(bias_ptr + cols)[:, None]
    m_new = tl.maximum(m, tl.max(t_kept, axis=0))
    rescale = tl.exp2(m - m_new)
    e = tl.exp2(t_kept - m_new[None, :])                                  # 0 on dropped candidates
    sum_e = sum_e * rescale + tl.sum(e, axis=0)
    sum_et = sum_et * rescale + tl.sum(e * t, axis=0)
    if COMPUTE_GRAD:
        sum_ed0 = sum_ed0 * rescale + tl.sum(e * dy0, axis=0)
        if D > 1:
            sum_ed1 = sum_ed1 * rescale + tl.sum(e * dy1, axis=0)
        if D > 2:
            sum_ed2 = sum_ed2 * rescale + tl.sum(e * dy2, axis=0)
        if D > 3:
            sum_ed3 = sum_ed3 * rescale + tl.sum(e * dy3, axis=0)
    return m_new, sum_e, sum_et, sum_ed0, sum_ed1, sum_ed2, sum_ed3


@triton.jit
def _row_bits(p, y):
    """Per row: bit 1 if p is NaN / inf, bit 2 if y is (dropped rows are loaded as 0)."""
    return tl.where(tl.abs(p) < float("inf"), 0, 1) | tl.where(tl.abs(y) < float("inf"), 0, 2)


@triton.jit
def _flag_rows(flag_ptr, p, y):
    """Value check of one coordinate of a block of rows (dropped rows loaded as 0)."""
    flag_bits(flag_ptr, _row_bits(p, y))


@triton.jit
def _bmc_fwd_kernel(
    pred_ptr,         # [N, D] predictions
    target_ptr,       # [N, D] targets (the positives)
    cand_ptr,         # [D, M_pad] candidates, planar, from _bmc_candidates_kernel (ACC)
    cand_scaled_ptr,  # [D, M_pad] candidates * log2(e) / (2 sigma^2) (ACC)
    bias_ptr,         # [M_pad] 0 / -inf (ACC)
    mask_ptr,         # [N] bool: rows kept (HAS_MASK)
    count_ptr,        # [] int32: number of kept rows (read for 'mean' with a mask)
    noise_var_ptr,    # [] sigma^2
    loss_ptr,         # [N] row losses ('none') or [num_programs] partial sums (ACC)
    grad_pred_ptr,    # [N, D] d loss / d pred, scaled by the reduction weight
    grad_var_ptr,     # [N] row d loss / d sigma^2 ('none') or [num_programs] partial sums (ACC)
    flag_ptr,         # [] int32: value-check flag (CHECK: bits 1 / 2 for a NaN / inf in a kept pred / target)
    N, M_pad,
    M_UNBIASED,       # candidates [0, M_UNBIASED) need no bias (whole tiles, none dropped)
    D: tl.constexpr, TARGETS_AS_CANDS: tl.constexpr, HAS_MASK: tl.constexpr, REDUCTION: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, CHECK: tl.constexpr, ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_CANDS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < N
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    s2 = tl.load(noise_var_ptr).to(ACC)
    scale = LOG2E / (2.0 * s2)

    # Row factors y_ik and a_ik (0 on dropped rows: their values may be NaN holes).
    y0 = _load_dim(target_ptr, rows, 0, D, row_ok, ACC)
    a0 = (2.0 * _load_dim(pred_ptr, rows, 0, D, row_ok, ACC) - y0) * scale
    y1 = y0
    y2 = y0
    y3 = y0
    a1 = a0
    a2 = a0
    a3 = a0
    if D > 1:
        y1 = _load_dim(target_ptr, rows, 1, D, row_ok, ACC)
        a1 = (2.0 * _load_dim(pred_ptr, rows, 1, D, row_ok, ACC) - y1) * scale
    if D > 2:
        y2 = _load_dim(target_ptr, rows, 2, D, row_ok, ACC)
        a2 = (2.0 * _load_dim(pred_ptr, rows, 2, D, row_ok, ACC) - y2) * scale
    if D > 3:
        y3 = _load_dim(target_ptr, rows, 3, D, row_ok, ACC)
        a3 = (2.0 * _load_dim(pred_ptr, rows, 3, D, row_ok, ACC) - y3) * scale

    m = tl.zeros([BLOCK_ROWS], dtype=ACC)          # running max of t (the positive's t = 0)
    sum_e = tl.zeros([BLOCK_ROWS], dtype=ACC)      # sum_j e_j,  e_j = 2^(t_j - m)
    if not TARGETS_AS_CANDS:
        sum_e += 1.0                               # the positive, not among the streamed candidates
    sum_et = tl.zeros([BLOCK_ROWS], dtype=ACC)     # sum_j e_j t_j
    sum_ed0 = tl.zeros([BLOCK_ROWS], dtype=ACC)    # sum_j e_j (c_jk - y_ik), k = 0..D-1
    sum_ed1 = tl.zeros([BLOCK_ROWS], dtype=ACC)
    sum_ed2 = tl.zeros([BLOCK_ROWS], dtype=ACC)
    sum_ed3 = tl.zeros([BLOCK_ROWS], dtype=ACC)

    for start in range(0, M_UNBIASED, BLOCK_CANDS):
        m, sum_e, sum_et, sum_ed0, sum_ed1, sum_ed2, sum_ed3 = _bmc_tile(
            start, cand_ptr, cand_scaled_ptr, bias_ptr, M_pad, y0, y1, y2, y3, a0, a1, a2, a3,
            m, sum_e, sum_et, sum_ed0, sum_ed1, sum_ed2, sum_ed3, D, False, COMPUTE_GRAD, BLOCK_CANDS)
    for start in range(M_UNBIASED, M_pad, BLOCK_CANDS):
        m, sum_e, sum_et, sum_ed0, sum_ed1, sum_ed2, sum_ed3 = _bmc_tile(
            start, cand_ptr, cand_scaled_ptr, bias_ptr, M_pad, y0, y1, y2, y3, a0, a1, a2, a3,
            m, sum_e, sum_et, sum_ed0, sum_ed1, sum_ed2, sum_ed3, D, True, COMPUTE_GRAD, BLOCK_CANDS)

    if CHECK:
        # after the candidate loop, pred re-read (N D values, cached): checked at the top, its values would
        # stay live through the loop and spill registers; one OR-reduction and one atomic for all bits
        bits = _row_bits(_load_dim(pred_ptr, rows, 0, D, row_ok, ACC), y0)
        if D > 1:
            bits = bits | _row_bits(_load_dim(pred_ptr, rows, 1, D, row_ok, ACC), y1)
        if D > 2:
            bits = bits | _row_bits(_load_dim(pred_ptr, rows, 2, D, row_ok, ACC), y2)
        if D > 3:
            bits = bits | _row_bits(_load_dim(pred_ptr, rows, 3, D, row_ok, ACC), y3)
        flag_bits(flag_ptr, bits)

    in_range = rows < N
    sum_e = tl.where(row_ok, sum_e, 1.0)           # kept rows: >= 1 (the max term); dropped rows: unused
    two_s2 = 2.0 * s2
    loss = tl.where(row_ok, two_s2 * LN2 * (m + tl.log2(sum_e)), 0.0)   # 2 s2 LSE_j l'_ij
    if REDUCTION == NONE:
        _store(loss_ptr, rows, in_range, loss)
    else:
        tl.store(loss_ptr + pid, tl.sum(loss, axis=0))
    if COMPUTE_GRAD:
        inv_sum = tl.where(row_ok, 1.0 / sum_e, 0.0)
        grad_var = -2.0 * LN2 * sum_et * inv_sum                          # -2 sum_j s_ij l'_ij
        if REDUCTION == NONE:
            _store(grad_var_ptr, rows, in_range, grad_var)
        else:
            tl.store(grad_var_ptr + pid, tl.sum(grad_var, axis=0))
        # dL_i/dp_ik = 2 sum_j s_ij (c_jk - y_ik), times the row's weight in the reduced loss.
        w = 2.0 * reduction_scale(count_ptr, N, REDUCTION, HAS_MASK, ACC) * inv_sum
        _store(grad_pred_ptr, rows * D, in_range, w * sum_ed0)
        if D > 1:
            _store(grad_pred_ptr, rows * D + 1, in_range, w * sum_ed1)
        if D > 2:
            _store(grad_pred_ptr, rows * D + 2, in_range, w * sum_ed2)
        if D > 3:
            _store(grad_pred_ptr, rows * D + 3, in_range, w * sum_ed3)


# --------------------------------------------------------------------------------------------------
# GAI / BNI: one element-wise pass over the rows; each program streams the K components in tiles with
# an online log-sum-exp. Per row (tables and derivation: the "Mixture tables" comment of
# imbreg_fast/ops/balanced_mse.py), with delta_k = p - mu_k, alpha_k = P_k delta_k, u = p - y, e = |u|^2,
# t_k = n_k - 1/2 delta_k . alpha_k, r_k = softmax_k(log phi^_k + t_k), F = LSE_k(log phi^_k + t_k):
#   L        = e + 2 s2 F
#   dL/dp    = 2 u - 2 s2 sum_k r_k alpha_k               (d t_k/dp = -alpha_k, P_k symmetric)
#   dL/ds2   = -e/s2 + 2 s2 sum_k r_k (1/2 |alpha_k|^2 + g_k)
# (d/ds2 of -1/2 delta^T P delta is 1/2 |P delta|^2 since dP/ds2 = -P^2; of n_k it is g_k.)
# In base 2 with beta_k = Q_k delta_k, Q_k = -1/2 log2(e) P_k (so alpha_k = -2 beta_k / log2(e)):
#   (log phi^_k + t_k) log2(e) = a2_k + delta_k . beta_k,           a2_k = (log phi^_k + n_k) log2(e)
#   dL/dp           = 2 u + 4 s2 / log2(e) sum_k r_k beta_k
#   dL/ds2          = -e/s2 + 4 s2 / log2(e)^2 sum_k r_k (|beta_k|^2 + g2_k),   g2_k = g_k log2(e)^2 / 2
# The prologue writes a2, mu, Q, g2 (and n2 = n log2(e), phi^ for the near-one pass) planar and padded to
# whole tiles (a2 = n2 = -inf and phi^ = 0 on the padding, whose beta = 0), so the main loop has no
# masks: (D + 2)^2 flops and one exp2 per (row, component).
# Near one (large s2): every t_k is O(|delta|^2 / s2) <= 0 (n_k <= log sum phi = 0 up to rounding), so
# F = m + log S with m = max_k t_k and S = sum_k phi^_k e^{t_k - m} close to 1, and the loss multiplies the
# rounding of log S by 2 s2. When some row of the block has e + 2 s2 |F| < 2 s2 NEAR_ONE_BOUND (F <= 0 is
# then the sum of the small |m| and |log S|), a second pass over the components recomputes, per row,
# m and log S = log1p(sum_k phi^_k expm1(t_k - m)) (exact since sum_k phi^_k = 1; a sum of terms <= 0);
# rows with S > 1/2 take it. fp32 only: fp64 keeps log S to 1e-16. The gradients are stored before this
# pass (they do not need it: r_k is a ratio), so little state stays live across it.
# --------------------------------------------------------------------------------------------------

NEAR_ONE_BOUND = tl.constexpr(1.0 / 16)
# Components per tile in the near-one pass: smaller tiles than the main loop's keep the register budget of
# the main loop (sm_90: no more registers than without the pass).
NEAR_ONE_BLOCK_COMPS = tl.constexpr(4)


@triton.jit
def _mixture_tables_kernel(
    log_weight_ptr,    # [K] log phi^_k
    log_norm_ptr,      # [K] n_k
    means_ptr,         # [K, D] mu_k
    prec_ptr,          # [K, D, D] P_k
    grad_var_bias_ptr, # [K] g_k
    a2_ptr,            # [K_pad] out (ACC): (log phi^_k + n_k) log2(e); -inf on the padding
    n2_ptr,            # [K_pad] out (ACC): n_k log2(e); -inf on the padding
    w_ptr,             # [K_pad] out (ACC): phi^_k; 0 on the padding
    mu_ptr,            # [D, K_pad] out (ACC): mu_k, planar; 0 on the padding
    q_ptr,             # [D * D, K_pad] out (ACC): Q_k[j, l] = -1/2 log2(e) P_k[j, l]; 0 on the padding
    g2_ptr,            # [K_pad] out (ACC): g_k log2(e)^2 / 2; 0 on the padding
    K, K_pad,
    D: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_pad = idx < K_pad
    valid = idx < K
    lw = tl.load(log_weight_ptr + idx, mask=valid, other=0.0).to(ACC)
    n = tl.load(log_norm_ptr + idx, mask=valid, other=0.0).to(ACC)
    tl.store(a2_ptr + idx, tl.where(valid, (lw + n) * LOG2E, float("-inf")), mask=in_pad)
    tl.store(n2_ptr + idx, tl.where(valid, n * LOG2E, float("-inf")), mask=in_pad)
    tl.store(w_ptr + idx, tl.where(valid, tl.exp(lw), 0.0), mask=in_pad)
    g = tl.load(grad_var_bias_ptr + idx, mask=valid, other=0.0).to(ACC)
    tl.store(g2_ptr + idx, g * (0.5 * LOG2E * LOG2E), mask=in_pad)
    for j in tl.static_range(D):
        tl.store(mu_ptr + j * K_pad + idx, _load_dim(means_ptr, idx, j, D, valid, ACC), mask=in_pad)
    for jl in tl.static_range(D * D):
        q = _load_dim(prec_ptr, idx, jl, D * D, valid, ACC) * (-0.5 * LOG2E)
        tl.store(q_ptr + jl * K_pad + idx, q, mask=in_pad)


@triton.jit
def _beta_dim(j: tl.constexpr, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D: tl.constexpr):
    """beta_kj = sum_l Q_k[j, l] delta_kl for a tile of components: [BLOCK_COMPS, BLOCK_ROWS]."""
    beta = tl.load(q_ptr + (j * D) * K_pad + cols)[:, None] * delta0
    if D > 1:
        beta += tl.load(q_ptr + (j * D + 1) * K_pad + cols)[:, None] * delta1
    if D > 2:
        beta += tl.load(q_ptr + (j * D + 2) * K_pad + cols)[:, None] * delta2
    if D > 3:
        beta += tl.load(q_ptr + (j * D + 3) * K_pad + cols)[:, None] * delta3
    return beta


@triton.jit
def _deltas(cols, mu_ptr, K_pad, p0, p1, p2, p3, D: tl.constexpr):
    """delta_kj = pred_j - mu_kj for a tile of components: D tiles [BLOCK_COMPS, BLOCK_ROWS] (unused ones
    repeat delta_0)."""
    delta0 = p0[None, :] - tl.load(mu_ptr + cols)[:, None]
    delta1 = delta0
    delta2 = delta0
    delta3 = delta0
    if D > 1:
        delta1 = p1[None, :] - tl.load(mu_ptr + K_pad + cols)[:, None]
    if D > 2:
        delta2 = p2[None, :] - tl.load(mu_ptr + 2 * K_pad + cols)[:, None]
    if D > 3:
        delta3 = p3[None, :] - tl.load(mu_ptr + 3 * K_pad + cols)[:, None]
    return delta0, delta1, delta2, delta3


@triton.jit
def _quad2(cols, mu_ptr, q_ptr, K_pad, p0, p1, p2, p3, D: tl.constexpr):
    """delta_k . beta_k = -1/2 log2(e) delta_k^T P_k delta_k for a tile of components (the near-one pass)."""
    delta0, delta1, delta2, delta3 = _deltas(cols, mu_ptr, K_pad, p0, p1, p2, p3, D)
    quad = delta0 * _beta_dim(0, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
    if D > 1:
        quad += delta1 * _beta_dim(1, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
    if D > 2:
        quad += delta2 * _beta_dim(2, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
    if D > 3:
        quad += delta3 * _beta_dim(3, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
    return quad


@triton.jit
def _expm1_nonpositive(z):
    """expm1(z) for z <= 0 in fp32: degree-8 Taylor polynomial on [-1/2, 0] (truncation below 2e-8
    relative), exp(z) - 1 below (relative error at most 1.55 times that of exp there)."""
    p = 1.0 / 40320 * z + 1.0 / 5040
    p = p * z + 1.0 / 720
    p = p * z + 1.0 / 120
    p = p * z + 1.0 / 24
    p = p * z + 1.0 / 6
    p = p * z + 0.5
    p = p * z + 1.0
    return tl.where(z >= -0.5, p * z, tl.exp(z) - 1.0)


@triton.jit
def _log1p_small(q):
    """log1p(q) for -1/2 < q <= 0 with + - * / only (no approximate log): 2 atanh(v), v = q / (2 + q) in
    (-1/3, 0], by its odd series to v^17 (truncation below 1e-10 relative)."""
    v = q / (2.0 + q)
    v2 = v * v
    s = 1.0 / 17 * v2 + 1.0 / 15
    s = s * v2 + 1.0 / 13
    s = s * v2 + 1.0 / 11
    s = s * v2 + 1.0 / 9
    s = s * v2 + 1.0 / 7
    s = s * v2 + 1.0 / 5
    s = s * v2 + 1.0 / 3
    s = s * v2 + 1.0
    return 2.0 * v * s


@triton.jit
def _mixture_log_sum_near_one(n2_ptr, w_ptr, mu_ptr, q_ptr, K_pad, p0, p1, p2, p3, lse,
                              D: tl.constexpr, BLOCK_COMPS: tl.constexpr):
    """F = m + log1p(sum_k phi^_k expm1(t_k - m)) (natural units) for the rows with S > 1/2; lse elsewhere."""
    mt = tl.full(lse.shape, float("-inf"), lse.dtype)              # m log2(e), m = max_k t_k
    for start in range(0, K_pad, BLOCK_COMPS):
        cols = start + tl.arange(0, BLOCK_COMPS)
        t = tl.load(n2_ptr + cols)[:, None] + _quad2(cols, mu_ptr, q_ptr, K_pad, p0, p1, p2, p3, D)
        mt = tl.maximum(mt, tl.max(t, axis=0))
    s_minus_1 = tl.zeros(lse.shape, lse.dtype)
    for start in range(0, K_pad, BLOCK_COMPS):
        cols = start + tl.arange(0, BLOCK_COMPS)
        t = tl.load(n2_ptr + cols)[:, None] + _quad2(cols, mu_ptr, q_ptr, K_pad, p0, p1, p2, p3, D)
        # padding: t = -inf, expm1 = -1, phi^ = 0
        em1 = _expm1_nonpositive(tl.minimum((t - mt[None, :]) * LN2, 0.0))
        s_minus_1 += tl.sum(tl.load(w_ptr + cols)[:, None] * em1, axis=0)
    near = s_minus_1 > -0.5
    return tl.where(near, LN2 * mt + _log1p_small(tl.where(near, s_minus_1, 0.0)), lse)


# --------------------------------------------------------------------------------------------------
# BNI on a uniform grid (d = 1, every P_k equal, every g_k = 0, centres c_k = c_0 + k h): O(1) exps per row
# per chunk of R bins instead of one per bin (the design shared with the C++ kernel).
# With m0 = max_k a2_k (base 2) and w_k = 2^(a2_k - m0) in [0, 1] (0 for a zero weight), the main loop's
# e_k = 2^(a2_k + delta_k beta_k - m0) = w_k G_k with G_k = exp(-(P/2) dl_k^2) = 2^(Q dl_k^2), dl_k = p - c_k,
# Q = -1/2 log2(e) P. With B = P h log2(e) = -2 Q h and A = -Q h^2 = (P h^2 / 2) log2(e):
#   ascending  (dl_{k+1} = dl_k - h):  G_{k+1} = G_k rho,  rho = 2^(B dl_k - A)
#   descending (dl_{k-1} = dl_k + h):  G_{k-1} = G_k rho,  rho = 2^(-B dl_k - A)
# and after each step rho <- rho q, q = 2^(-2A) = exp(-P h^2), taken as rho <- rho qa - rho qb with (qa, qb) =
# (1, 1 - q) for q > 1/2 (large sigma: a rounded q close to 1 would put a systematic j^2/2 epsilons on the j-th
# term of a chunk; 1 - q stored keeps its own relative precision), else (q, 0) (rho - rho (1 - q) would cancel
# for small q). One loop body for both (a branch with two copies of the loop spills registers on sm_90).
# Only the bins [first, last] (first and last of non-zero weight) are visited: the others add 0.
# Bins go in chunks [s, s + R_c) in lock-step for every row; per row and chunk the direction starts at the
# chunk end nearest to p (ascending from s if p <= the chunk midpoint, else descending from s + R_c - 1): a
# chunk on one side of p has its largest term first (an underflowing start means the rest of the chunk
# underflows too), and in the chunk containing p the start is at most R/2 bins from p, where
# a (R/2)^2 <= 60 (a = P h^2 / 2) keeps G_start a normal number. Per row and chunk: 2 exps (G_start and
# rho_start, from the stored centre c_start); per step a select between the weights of the two candidate
# bins (no gather) and multiplications:
#   S = sum_k w_k G_k 2^-shift,  sd = sum_k w_k G_k 2^-shift dl_k,  sd2 = sum_k w_k G_k 2^-shift dl_k^2
# with a per-row shift = Q dn^2, dn = the distance from p to [c_first, c_last] (0 inside): for p outside, the
# nearest visited bin has G 2^-shift = 1, so S does not underflow however far p is (unless the end bins'
# weights are tiny); every visited bin has G 2^-shift <= 1, and G_start 2^-shift = 2^(Q (dl - dn)(dl + dn)),
# a product of differences. In the main loop's terms: sum_e = S, sum_eb0 = Q sd (beta_k = Q dl_k),
# sum_eg = Q^2 sd2 (g2_k = 0), m = m0 + shift. Blocks where some kept row still has S < GRID_MIN_SUM are
# redone on the general path (exact max shift); the near-one pass is unchanged.
# R = clamp(floor(2 sqrt(60 / a)), 1, 16); R <= 2 (sigma below ~0.14 bin widths: a recurrence saves nothing)
# takes the general path, as do non-uniform centres, GAI and d > 1.
# --------------------------------------------------------------------------------------------------

# Recompute a block on the general path when a kept row's shifted sum falls below this: above it, a term
# flushed to 0 (< 2^-126 in fp32) is below 2^-76 of S.
GRID_MIN_SUM = tl.constexpr(2.0 ** -50)
GRID_MAX_CHUNK = tl.constexpr(16)
# grid_ptr layout (ACC): [R (0: general path), h, Q, B, A, qa, m0, first, last, qb] (first / last: the first and
# last bin of non-zero weight; the bins outside contribute 0 and are skipped)
GRID_INFO_SIZE = 10
# Centres within GRID_TOL_ULPS epsilons of max|c| of c_0 + k h are a grid (the stored centres' own rounding).
GRID_TOL_ULPS = 4


@triton.jit
def _mixture_grid_kernel(
    log_weight_ptr,    # [K] log phi^_k
    log_norm_ptr,      # [K] n_k
    means_ptr,         # [K, 1] mu_k
    prec_ptr,          # [K, 1, 1] P_k
    grad_var_bias_ptr, # [K] g_k
    grid_ptr,          # [GRID_INFO_SIZE] out (ACC): R, h, Q, B, A, qa, m0, first, last, qb (see above)
    gw_ptr,            # [K_pad] out (ACC): w_k = 2^(a2_k - m0); 0 on the padding and for zero weights
    K, K_pad,
    TOL_ULPS: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: is the d = 1 mixture a BNI uniform grid, and its recurrence constants. The test runs in
    float64: c_0 + k h is then exact to well below the tolerance TOL_ULPS EPS max|c| (EPS: ACC's epsilon),
    so only the stored centres' own rounding counts."""
    F64: tl.constexpr = tl.float64
    c_first = tl.load(means_ptr).to(F64)
    c_last = tl.load(means_ptr + K - 1).to(F64)
    h64 = (c_last - c_first) / tl.maximum(K - 1, 1).to(F64)
    p0 = tl.load(prec_ptr).to(ACC)
    dev = tl.zeros([BLOCK], dtype=F64)             # max_k |c_k - (c_0 + k h)|
    cmax = tl.zeros([BLOCK], dtype=F64)            # max_k |c_k|
    bad = tl.zeros([BLOCK], dtype=tl.int32)        # some P_k != P_0 or g_k != 0
    a2max = tl.full([BLOCK], float("-inf"), ACC)   # m0 = max_k a2_k, a2_k as in _mixture_tables_kernel
    first_w = tl.full([BLOCK], K, tl.int32)        # first and last bin of non-zero weight
    last_w = tl.full([BLOCK], -1, tl.int32)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < K
        c = tl.load(means_ptr + idx, mask=valid, other=0.0).to(F64)
        dev = tl.maximum(dev, tl.where(valid, tl.abs(c - (c_first + idx.to(F64) * h64)), 0.0))
        cmax = tl.maximum(cmax, tl.abs(c))
        prec = tl.load(prec_ptr + idx, mask=valid, other=0.0).to(ACC)
        g = tl.load(grad_var_bias_ptr + idx, mask=valid, other=0.0).to(ACC)
        bad = bad | (valid & ((prec != p0) | (g != 0.0))).to(tl.int32)
        lw = tl.load(log_weight_ptr + idx, mask=valid, other=0.0).to(ACC)
        n = tl.load(log_norm_ptr + idx, mask=valid, other=0.0).to(ACC)
        a2 = tl.where(valid, (lw + n) * LOG2E, float("-inf"))
        a2max = tl.maximum(a2max, a2)
        first_w = tl.minimum(first_w, tl.where(a2 > float("-inf"), idx, K))
        last_w = tl.maximum(last_w, tl.where(a2 > float("-inf"), idx, -1))
    m0 = tl.max(a2max, axis=0)
    dev_max = tl.max(dev, axis=0)                  # NaN centres: the comparison below fails
    h = h64.to(ACC).to(F64)                        # the step the main kernel takes
    P = p0.to(F64)
    a = 0.5 * P * h * h
    r = tl.floor(tl.minimum(2.0 * tl.sqrt(60.0 / a), GRID_MAX_CHUNK))
    ok = ((K >= 2) & (h > 0.0) & (h < float("inf")) & (P > 0.0) & (P < float("inf")) & (m0 > float("-inf"))
          & (tl.max(bad, axis=0) == 0) & (dev_max <= TOL_ULPS * EPS * tl.max(cmax, axis=0)) & (r > 2.0))
    tl.store(grid_ptr + 0, tl.where(ok, r, 0.0).to(ACC))
    tl.store(grid_ptr + 1, h.to(ACC))
    tl.store(grid_ptr + 2, (P * (-0.5 * LOG2E)).to(ACC))       # Q
    tl.store(grid_ptr + 3, (P * h * LOG2E).to(ACC))          # B
    tl.store(grid_ptr + 4, (a * LOG2E).to(ACC))              # A
    x = 2.0 * a                                    # qm1 = 1 - exp(-x): Taylor for small x (no cancellation)
    qm1 = tl.where(x < 1e-2, x * (1.0 - x / 2 * (1.0 - x / 3 * (1.0 - x / 4 * (1.0 - x / 5 * (1.0 - x / 6))))),
                   1.0 - tl.exp(-x))
    q = tl.exp(-x)
    tl.store(grid_ptr + 5, tl.where(q > 0.5, 1.0, q).to(ACC))     # qa
    tl.store(grid_ptr + 9, tl.where(q > 0.5, qm1, 0.0).to(ACC))   # qb
    tl.store(grid_ptr + 6, m0)
    tl.store(grid_ptr + 7, tl.min(first_w, axis=0).to(ACC))
    tl.store(grid_ptr + 8, tl.max(last_w, axis=0).to(ACC))
    for start in range(0, K_pad, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < K
        lw = tl.load(log_weight_ptr + idx, mask=valid, other=0.0).to(ACC)
        n = tl.load(log_norm_ptr + idx, mask=valid, other=0.0).to(ACC)
        gw = tl.where(valid, tl.exp2((lw + n) * LOG2E - m0), 0.0)
        tl.store(gw_ptr + idx, gw, mask=idx < K_pad)


@triton.jit
def _mixture_grid_sums(p, mu_ptr, gw_ptr, first, last, R, h, Q, B, A, qa, qb, GRAD: tl.constexpr):
    """(shift, S, sd, sd2) of a block of rows p [BLOCK_ROWS] over the bins [first, last] by the chunked
    recurrence (see above), every term scaled by the row's 2^-shift (sd, sd2: GRAD; else 0)."""
    dn = p - tl.minimum(tl.maximum(p, tl.load(mu_ptr + first)), tl.load(mu_ptr + last))  # to [c_first, c_last]
    S = tl.zeros(p.shape, p.dtype)
    sd = tl.zeros(p.shape, p.dtype)
    sd2 = tl.zeros(p.shape, p.dtype)
    for s in range(first, last + 1, R):
        top = tl.minimum(s + R - 1, last)              # last bin of the chunk
        c_lo = tl.load(mu_ptr + s)
        c_hi = tl.load(mu_ptr + top)
        asc = p <= 0.5 * (c_lo + c_hi)
        dl = p - tl.where(asc, c_lo, c_hi)             # from the stored centre of the start
        G = tl.exp2(Q * (dl - dn) * (dl + dn))          # G_start 2^-shift, <= 1
        rho = tl.exp2(tl.where(asc, B, -B) * dl - A)
        step = tl.where(asc, h, -h)
        for j in range(0, top + 1 - s):
            t = tl.where(asc, tl.load(gw_ptr + s + j), tl.load(gw_ptr + top - j)) * G
            S += t
            if GRAD:
                td = t * dl                            # not t dl^2: t = 0 with an overflowing dl^2
                sd += td
                sd2 += td * dl
            dl -= step
            G *= rho
            rho = rho * qa - rho * qb                  # rho q
    return Q * dn * dn, S, sd, sd2


@triton.jit
def _mixture_nll_fwd_kernel(
    pred_ptr,          # [N, D] predictions
    target_ptr,        # [N, D] targets
    mask_ptr,          # [N] bool: rows kept (HAS_MASK)
    count_ptr,         # [] int32: number of kept rows (read for 'mean' with a mask)
    noise_var_ptr,     # [] sigma^2
    a2_ptr,            # [K_pad] (log phi^_k + n_k) log2(e)   (tables from _mixture_tables_kernel, ACC)
    n2_ptr,            # [K_pad] n_k log2(e)
    w_ptr,             # [K_pad] phi^_k
    mu_ptr,            # [D, K_pad] mu_k
    q_ptr,             # [D * D, K_pad] Q_k
    g2_ptr,            # [K_pad] g2_k
    grid_ptr,          # [GRID_INFO_SIZE] uniform-grid constants from _mixture_grid_kernel (GRID)
    gw_ptr,            # [K_pad] w_k = 2^(a2_k - m0) (GRID)
    loss_ptr,          # [N] row losses ('none') or [num_programs] partial sums (ACC)
    grad_pred_ptr,     # [N, D] d loss / d pred, scaled by the reduction weight
    grad_var_ptr,      # [N] row d loss / d sigma^2 ('none') or [num_programs] partial sums (ACC)
    flag_ptr,          # [] int32: value-check flag (CHECK: bits 1 / 2 for a NaN / inf in a kept pred / target)
    N, K_pad,
    D: tl.constexpr, HAS_MASK: tl.constexpr, REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    CHECK: tl.constexpr, GRID: tl.constexpr, ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COMPS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < N
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    s2 = tl.load(noise_var_ptr).to(ACC)

    # Dropped rows load 0 (their values may be NaN holes).
    p0 = _load_dim(pred_ptr, rows, 0, D, row_ok, ACC)
    p1 = p0
    p2 = p0
    p3 = p0
    if D > 1:
        p1 = _load_dim(pred_ptr, rows, 1, D, row_ok, ACC)
    if D > 2:
        p2 = _load_dim(pred_ptr, rows, 2, D, row_ok, ACC)
    if D > 3:
        p3 = _load_dim(pred_ptr, rows, 3, D, row_ok, ACC)

    # Running max: a finite lowest start, so that a tile whose logits are all -inf (zero-weight bins, log
    # weight -inf) gives rescale = 2^0 and e = 2^-inf = 0, not 2^(-inf - -inf) = NaN.
    lowest = -1.7976931348623157e308 if ACC == tl.float64 else -3.4028234663852886e38
    m = tl.full([BLOCK_ROWS], lowest, ACC)         # running max of logit log2(e)
    sum_e = tl.zeros([BLOCK_ROWS], dtype=ACC)      # sum_k e_k,  e_k = 2^(logit_k log2(e) - m)
    sum_eg = tl.zeros([BLOCK_ROWS], dtype=ACC)     # sum_k e_k (|beta_k|^2 + g2_k)
    sum_eb0 = tl.zeros([BLOCK_ROWS], dtype=ACC)    # sum_k e_k beta_kj, j = 0..D-1
    sum_eb1 = tl.zeros([BLOCK_ROWS], dtype=ACC)
    sum_eb2 = tl.zeros([BLOCK_ROWS], dtype=ACC)
    sum_eb3 = tl.zeros([BLOCK_ROWS], dtype=ACC)

    r = 0                                          # chunk length of the grid path; 0: the general path
    if GRID:
        r = tl.load(grid_ptr).to(tl.int32)
    if r > 0:
        q_grid = tl.load(grid_ptr + 2)
        first = tl.load(grid_ptr + 7).to(tl.int32)
        last = tl.load(grid_ptr + 8).to(tl.int32)
        h_grid = tl.load(grid_ptr + 1)
        b_grid = tl.load(grid_ptr + 3)
        a_grid = tl.load(grid_ptr + 4)
        shift, s_grid, sd, sd2 = _mixture_grid_sums(p0, mu_ptr, gw_ptr, first, last, r, h_grid, q_grid, b_grid,
                                                    a_grid, tl.load(grid_ptr + 5), tl.load(grid_ptr + 9),
                                                    COMPUTE_GRAD)
        m = tl.load(grid_ptr + 6) + shift
        sum_e = tl.where(row_ok, s_grid, 1.0)      # dropped rows: unused, but finite
        sum_eb0 = q_grid * sd
        sum_eg = (q_grid * q_grid) * sd2
        if tl.min(sum_e, axis=0) < GRID_MIN_SUM:  # a kept row far from every bin: the general path
            r = r * 0
    if r <= 0:
        m = tl.full([BLOCK_ROWS], lowest, ACC)
        sum_e = tl.zeros([BLOCK_ROWS], dtype=ACC)
        sum_eg = tl.zeros([BLOCK_ROWS], dtype=ACC)
        sum_eb0 = tl.zeros([BLOCK_ROWS], dtype=ACC)
        for start in range(0, K_pad, BLOCK_COMPS):
            cols = start + tl.arange(0, BLOCK_COMPS)
            delta0, delta1, delta2, delta3 = _deltas(cols, mu_ptr, K_pad, p0, p1, p2, p3, D)  # [BLOCK_COMPS, BLOCK_ROWS]
            beta0 = _beta_dim(0, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
            logit = tl.load(a2_ptr + cols)[:, None] + delta0 * beta0
            g = tl.load(g2_ptr + cols)[:, None] + beta0 * beta0
            if D > 1:
                beta1 = _beta_dim(1, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
                logit += delta1 * beta1
                g += beta1 * beta1
            if D > 2:
                beta2 = _beta_dim(2, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
                logit += delta2 * beta2
                g += beta2 * beta2
            if D > 3:
                beta3 = _beta_dim(3, cols, q_ptr, K_pad, delta0, delta1, delta2, delta3, D)
                logit += delta3 * beta3
                g += beta3 * beta3
            m_new = tl.maximum(m, tl.max(logit, axis=0))
            rescale = tl.exp2(m - m_new)
            e = tl.exp2(logit - m_new[None, :])                               # 0 on the padding
            sum_e = sum_e * rescale + tl.sum(e, axis=0)
            if COMPUTE_GRAD:
                sum_eg = sum_eg * rescale + tl.sum(e * g, axis=0)
                sum_eb0 = sum_eb0 * rescale + tl.sum(e * beta0, axis=0)
                if D > 1:
                    sum_eb1 = sum_eb1 * rescale + tl.sum(e * beta1, axis=0)
                if D > 2:
                    sum_eb2 = sum_eb2 * rescale + tl.sum(e * beta2, axis=0)
                if D > 3:
                    sum_eb3 = sum_eb3 * rescale + tl.sum(e * beta3, axis=0)
            m = m_new

    y0 = _load_dim(target_ptr, rows, 0, D, row_ok, ACC)
    if CHECK:
        _flag_rows(flag_ptr, p0, y0)
    u0 = p0 - y0                 # u = p - y
    sq_err = u0 * u0
    if D > 1:
        y1 = _load_dim(target_ptr, rows, 1, D, row_ok, ACC)
        if CHECK:
            _flag_rows(flag_ptr, p1, y1)
        u1 = p1 - y1
        sq_err += u1 * u1
    if D > 2:
        y2 = _load_dim(target_ptr, rows, 2, D, row_ok, ACC)
        if CHECK:
            _flag_rows(flag_ptr, p2, y2)
        u2 = p2 - y2
        sq_err += u2 * u2
    if D > 3:
        y3 = _load_dim(target_ptr, rows, 3, D, row_ok, ACC)
        if CHECK:
            _flag_rows(flag_ptr, p3, y3)
        u3 = p3 - y3
        sq_err += u3 * u3

    in_range = rows < N
    two_s2 = 2.0 * s2
    # The gradients first: only the loss can need the near-one pass, which then has less state around it.
    if COMPUTE_GRAD:
        inv_sum = 1.0 / sum_e
        grad_var = -sq_err * (1.0 / s2) + (2.0 * two_s2 * LN2 * LN2) * sum_eg * inv_sum
        grad_var = tl.where(row_ok, grad_var, 0.0)
        if REDUCTION == NONE:
            _store(grad_var_ptr, rows, in_range, grad_var)
        else:
            tl.store(grad_var_ptr + pid, tl.sum(grad_var, axis=0))
        w = tl.where(row_ok, reduction_scale(count_ptr, N, REDUCTION, HAS_MASK, ACC), 0.0)
        coef = 2.0 * two_s2 * LN2 * inv_sum
        _store(grad_pred_ptr, rows * D, in_range, w * (2.0 * u0 + coef * sum_eb0))
        if D > 1:
            _store(grad_pred_ptr, rows * D + 1, in_range, w * (2.0 * u1 + coef * sum_eb1))
        if D > 2:
            _store(grad_pred_ptr, rows * D + 2, in_range, w * (2.0 * u2 + coef * sum_eb2))
        if D > 3:
            _store(grad_pred_ptr, rows * D + 3, in_range, w * (2.0 * u3 + coef * sum_eb3))
    lse = LN2 * (m + tl.log2(sum_e))              # sum_e >= 1 (the max term), dropped rows included
    if ACC == tl.float32:
        near = row_ok & (sq_err + two_s2 * tl.abs(lse) < two_s2 * NEAR_ONE_BOUND)
        if tl.max(near.to(tl.int32), axis=0) > 0:
            lse = tl.where(near, _mixture_log_sum_near_one(n2_ptr, w_ptr, mu_ptr, q_ptr, K_pad, p0, p1, p2, p3,
                                                           lse, D, NEAR_ONE_BLOCK_COMPS), lse)
    # L = 2 s2 [e/(2 s2) + F] = e + 2 s2 F: no division per row.
    loss = tl.where(row_ok, sq_err + two_s2 * lse, 0.0)
    if REDUCTION == NONE:
        _store(loss_ptr, rows, in_range, loss)
    else:
        tl.store(loss_ptr + pid, tl.sum(loss, axis=0))


# --------------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------------


def _outputs(pred, noise_var, reduction, compute_grad, num_programs):
    """(loss, grad_pred, grad_var, row_or_partial_loss, row_or_partial_var) buffers."""
    n = pred.shape[0]
    acc = compute_dtype(pred.dtype)
    grad_pred = torch.empty(pred.shape if compute_grad else (0,), dtype=pred.dtype, device=pred.device)
    if reduction == NONE:
        loss = torch.empty(n, dtype=pred.dtype, device=pred.device)
        grad_var = torch.empty(n if compute_grad else 0, dtype=noise_var.dtype, device=pred.device)
        return loss, grad_pred, grad_var, loss, grad_var
    loss = torch.empty((), dtype=pred.dtype, device=pred.device)
    grad_var = torch.empty(() if compute_grad else (0,), dtype=noise_var.dtype, device=pred.device)
    partial_loss = torch.empty(num_programs, dtype=acc, device=pred.device)
    partial_var = torch.empty(num_programs if compute_grad else 0, dtype=acc, device=pred.device)
    return loss, grad_pred, grad_var, partial_loss, partial_var


def _kept_count(mask, reduction, fallback):
    """[] int32 number of kept rows on the device (only 'mean' with a mask reads it)."""
    if mask is not None and reduction == MEAN:
        return mask.sum(dtype=torch.int32)
    return fallback


def _check_rows(pred, target, mask, noise_var, reduction):
    if pred.dim() != 2 or target.shape != pred.shape:
        raise ValueError(f"pred and target must both be [N, d], got {tuple(pred.shape)} and {tuple(target.shape)}")
    if not 1 <= pred.shape[1] <= MAX_DIM:
        raise ValueError(f"the Triton Balanced MSE kernels support target dimension 1 <= d <= {MAX_DIM}, got "
                         f"d = {pred.shape[1]}; use backend='cpp' or backend='torch'")
    if not pred.is_floating_point() or target.dtype != pred.dtype:
        raise TypeError(f"pred and target must have the same floating dtype, got {pred.dtype} and {target.dtype}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (pred.shape[0],)):
        raise ValueError(f"mask must be a [N] = [{pred.shape[0]}] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    if noise_var.numel() != 1 or not noise_var.is_floating_point():
        raise ValueError(f"noise_var must be a floating scalar tensor, got {noise_var.dtype} {tuple(noise_var.shape)}")
    devices = {t.device for t in (pred, target, mask, noise_var) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"pred, target, mask and noise_var must be on one device, got {sorted(map(str, devices))}")
    if reduction not in (NONE, MEAN, SUM):
        raise ValueError(f"reduction must be {NONE.value} ('none'), {MEAN.value} ('mean') or {SUM.value} ('sum'), "
                         f"got {reduction}")


def bmc_fwd(pred, target, candidates, mask, noise_var, reduction: int, compute_grad: bool, *,
            check_finite: bool = False, block_rows: int | None = None, block_cands: int = BMC_BLOCK_CANDS):
    """BMC loss and its gradients in one streaming pass (contract of ``imbreg_fast::bmc_fwd``).

    pred, target [N, d]; candidates [M, d] or None (then the kept targets); mask [N] bool or None;
    noise_var [] = sigma^2; reduction one of the codes NONE / MEAN / SUM of ``common``.
    Returns (loss, grad_pred, grad_noise_var).
    O(N + M) memory: the N x M logits are never stored.
    ``check_finite``: the kernels flag a NaN / inf in a kept pred / target row or a given candidate while
    loading them; then ``common.raise_flagged`` (ValueError naming the argument; on CUDA an asynchronous
    device-side assert).
    """
    _check_rows(pred, target, mask, noise_var, reduction)
    n, d = pred.shape
    targets_as_cands = candidates is None
    if targets_as_cands:
        candidates = target
    elif (candidates.dim() != 2 or candidates.shape[1] != d or candidates.dtype != pred.dtype
          or candidates.device != pred.device):
        raise ValueError(f"candidates must be [M, {d}] of dtype {pred.dtype} on {pred.device}, got "
                         f"{candidates.dtype} {tuple(candidates.shape)} on {candidates.device}")
    pred, target, candidates = pred.contiguous(), target.contiguous(), candidates.contiguous()
    noise_var = noise_var.reshape(())
    cand_mask = mask if targets_as_cands else None
    block_rows = block_rows or bmc_block_rows(d, pred.dtype)
    m = candidates.shape[0]
    m_pad = triton.cdiv(m, block_cands) * block_cands
    m_unbiased = 0 if cand_mask is not None else (m // block_cands) * block_cands
    acc_t = compute_dtype(pred.dtype)
    acc = acc_dtype(pred.dtype)
    cand = torch.empty((d, m_pad), dtype=acc_t, device=pred.device)
    cand_scaled = torch.empty_like(cand)
    bias = torch.empty(m_pad, dtype=acc_t, device=pred.device)
    num_programs = max(triton.cdiv(n, block_rows), 1)
    loss, grad_pred, grad_var, loss_buf, var_buf = _outputs(pred, noise_var, reduction, compute_grad, num_programs)
    count = _kept_count(mask, reduction, loss_buf)
    check = bool(check_finite)
    flag = new_flag(pred) if check else count
    with device_guard(pred):
        if m_pad > 0:
            _bmc_candidates_kernel[(triton.cdiv(m_pad, PROLOGUE_BLOCK),)](
                candidates, candidates if cand_mask is None else cand_mask, noise_var, cand, cand_scaled, bias, flag,
                m, m_pad, D=d, HAS_MASK=cand_mask is not None, CHECK=check and not targets_as_cands, ACC=acc,
                BLOCK=PROLOGUE_BLOCK, num_warps=4)
        _bmc_fwd_kernel[(num_programs,)](
            pred, target, cand, cand_scaled, bias, pred if mask is None else mask, count, noise_var,
            loss_buf, grad_pred if compute_grad else loss_buf, var_buf if compute_grad else loss_buf, flag,
            n, m_pad, m_unbiased,
            D=d, TARGETS_AS_CANDS=targets_as_cands, HAS_MASK=mask is not None, REDUCTION=reduction,
            COMPUTE_GRAD=compute_grad, CHECK=check, ACC=acc, BLOCK_ROWS=block_rows, BLOCK_CANDS=block_cands,
            num_warps=BMC_NUM_WARPS)
        if reduction != NONE:
            finalize(loss_buf, count, loss, n, reduction, mask is not None, acc,
                     partial2=var_buf if compute_grad else None, out2=grad_var if compute_grad else None)
    if check:
        masked = mask is not None
        raise_flagged(flag, [non_finite_message("pred", masked), non_finite_message("target", masked),
                             non_finite_message("candidates", False)])
    return loss, grad_pred, grad_var


def mixture_grid_tables(log_weight, log_norm, means, precision, grad_var_bias, k_pad: int | None = None,
                        dtype: torch.dtype | None = None):
    """d = 1 mixture tables -> (grid_info [GRID_INFO_SIZE], gw [K_pad]) on the device, in the compute dtype:
    grid_info = [R, h, Q, B, A, qa, m0, first, last, qb] with R = 0 unless the tables are a BNI uniform grid with R > 2
    (the uniform-grid comment above); gw_k = 2^(a2_k - m0). dtype: the compute dtype (default: the tables').
    One one-program launch, no host sync."""
    k = log_weight.shape[0]
    k_pad = k_pad or triton.cdiv(k, MIXTURE_BLOCK_COMPS) * MIXTURE_BLOCK_COMPS
    dtype = compute_dtype(dtype or means.dtype)
    acc = acc_dtype(dtype)
    info = torch.zeros(GRID_INFO_SIZE, dtype=dtype, device=means.device)
    gw = torch.empty(k_pad, dtype=dtype, device=means.device)
    eps = torch.finfo(dtype).eps
    with device_guard(means):
        _mixture_grid_kernel[(1,)](log_weight, log_norm, means, precision, grad_var_bias, info, gw, k, k_pad,
                                   TOL_ULPS=GRID_TOL_ULPS, EPS=eps, ACC=acc, BLOCK=PROLOGUE_BLOCK, num_warps=4)
    return info, gw


def mixture_nll_fwd(pred, target, mask, noise_var, log_weight, log_norm, means, precision, grad_var_bias,
                    reduction: int, compute_grad: bool, *, check_finite: bool = False,
                    block_rows: int | None = None, block_comps: int = MIXTURE_BLOCK_COMPS, grid: bool = True):
    """GAI / BNI loss and gradients in one pass over the rows (contract of ``imbreg_fast::mixture_nll_fwd``).

    Tables (from ``gai_tables`` / ``bni_tables``): log_weight [K] (normalised), log_norm [K], means [K, d],
    precision [K, d, d] (symmetric), grad_var_bias [K].
    Returns (loss, grad_pred, grad_noise_var). ``check_finite``: as :func:`bmc_fwd` (pred and target).
    d = 1: BNI tables on a uniform grid of centres take the chunked recurrence (the device decides, from
    :func:`mixture_grid_tables`; no host sync); ``grid=False`` forces the general path (tests).
    """
    _check_rows(pred, target, mask, noise_var, reduction)
    n, d = pred.shape
    k = log_weight.shape[0] if log_weight.dim() == 1 else 0
    if (k < 1 or log_norm.shape != (k,) or means.shape != (k, d) or precision.shape != (k, d, d)
            or grad_var_bias.shape != (k,)):
        raise ValueError(f"mixture tables must be log_weight [K], log_norm [K], means [K, {d}], precision "
                         f"[K, {d}, {d}], grad_var_bias [K] with K >= 1; got {tuple(log_weight.shape)}, "
                         f"{tuple(log_norm.shape)}, {tuple(means.shape)}, {tuple(precision.shape)}, "
                         f"{tuple(grad_var_bias.shape)}")
    tables = [t.contiguous() for t in (log_weight, log_norm, means, precision, grad_var_bias)]
    if any(t.device != pred.device for t in tables):
        raise ValueError(f"mixture tables must be on {pred.device}")
    pred, target = pred.contiguous(), target.contiguous()
    noise_var = noise_var.reshape(())
    block_rows = block_rows or mixture_block_rows(d, pred.dtype)
    k_pad = triton.cdiv(k, block_comps) * block_comps
    acc_t = compute_dtype(pred.dtype)
    acc = acc_dtype(pred.dtype)
    a2, n2, w, g2 = torch.empty((4, k_pad), dtype=acc_t, device=pred.device)
    mu = torch.empty((d, k_pad), dtype=acc_t, device=pred.device)
    q = torch.empty((d * d, k_pad), dtype=acc_t, device=pred.device)
    num_programs = max(triton.cdiv(n, block_rows), 1)
    loss, grad_pred, grad_var, loss_buf, var_buf = _outputs(pred, noise_var, reduction, compute_grad, num_programs)
    count = _kept_count(mask, reduction, loss_buf)
    check = bool(check_finite)
    flag = new_flag(pred) if check else count
    grid = bool(grid) and d == 1
    grid_info, gw = (mixture_grid_tables(*tables, k_pad, acc_t) if grid else (a2, a2))
    with device_guard(pred):
        _mixture_tables_kernel[(triton.cdiv(k_pad, PROLOGUE_BLOCK),)](
            *tables, a2, n2, w, mu, q, g2, k, k_pad, D=d, ACC=acc, BLOCK=PROLOGUE_BLOCK, num_warps=4)
        _mixture_nll_fwd_kernel[(num_programs,)](
            pred, target, pred if mask is None else mask, count, noise_var, a2, n2, w, mu, q, g2, grid_info, gw,
            loss_buf, grad_pred if compute_grad else loss_buf, var_buf if compute_grad else loss_buf, flag,
            n, k_pad,
            D=d, HAS_MASK=mask is not None, REDUCTION=reduction, COMPUTE_GRAD=compute_grad, CHECK=check, GRID=grid,
            ACC=acc, BLOCK_ROWS=block_rows, BLOCK_COMPS=block_comps, num_warps=MIXTURE_NUM_WARPS)
        if reduction != NONE:
            finalize(loss_buf, count, loss, n, reduction, mask is not None, acc,
                     partial2=var_buf if compute_grad else None, out2=grad_var if compute_grad else None)
    if check:
        masked = mask is not None
        raise_flagged(flag, [non_finite_message("pred", masked), non_finite_message("target", masked)])
    return loss, grad_pred, grad_var
