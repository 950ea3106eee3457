"""Triton kernels of RankSim (docs/methods.md, RankSim): forward and backward launchers.

Installed as ``imbreg_fast.triton_kernels.ranksim``; the registered ops that call the launchers
(``imbreg_fast::triton_ranksim_fwd`` / ``triton_ranksim_bwd``) live in ``imbreg_fast/ops/ranksim.py`` and
follow the contract of the C++ ops ``imbreg_fast::ranksim_fwd`` / ``ranksim_bwd`` (csrc/ranksim.cpp).

Ranks by counting, no sort: for row i and column j,
    r_ij = #{k: v_k before v_j},  "before" = greater, NaN above every number, equal values: the later index
the published stable rule. A program per row streams the row's column blocks J against column tiles K
(an O(m) count per entry, O(m^2) per row); integer counts, so the ranks are exact and deterministic.
Forward: (1) normalise the rows, (2) S = z z^T in [BLOCK_I, BLOCK_J] tiles (tl.dot, IEEE fp32 / fp64),
(3) per row the two rank rows and the row loss mean_j (R_f - R_y)^2 (a fixed-order sum of block sums);
the reduction over rows is a torch sum on the device (no host sync). Backward: (4) per row the ranks of
S_i + lam G_i, dS = (rank' - R_f) / lam; (5) per row block the chain through the cosine similarity,
dz_i = sum_j (dS_ij + dS_ji) z_j and dx_i = (dz_i - z_i (z_i . dz_i)) / |x_i|, where
z_i . dz_i = sum_j (dS_ij + dS_ji) S_ij needs no second pass over dz.
Kept rows: an optional count tensor c (read by the kernels, never by the host) keeps the first c rows and
columns only; a program of a row not kept writes zeros, and the rank loops run over the c kept columns.
Precision: inputs are float32 / float64 (the glue casts half types), everything is computed in that dtype;
lam is passed as a one-element tensor (a Python float argument would be typed fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _reduction
from .common import MEAN, NONE, acc_dtype, device_guard

__all__ = ["ranksim_fwd", "ranksim_bwd"]

NORM_EPS = 1e-12
BLOCK_I = 16      # rows per program (normalise, similarity, chain)
BLOCK_J = 32      # columns per block (similarity, chain)
BLOCK_D = 32      # feature values per block
BLOCK_R = 64      # rank kernels: column block and comparison tile


@triton.jit
def _before(a, ia, b, ib):
    """[BK, 1] x [1, BJ] (or any broadcast): a (index ia) comes before b (index ib) in the rank order."""
    na = a != a
    nb = b != b
    both = ~na & ~nb
    later = ia > ib
    return (na & (~nb | later)) | (both & ((a > b) | ((a == b) & later)))


@triton.jit
def _normalize_kernel(
    x_ptr,        # [m, d] features
    z_ptr,        # [m, d] out: x_i / max(|x_i|, eps)
    norm_ptr,     # [m] out: |x_i|
    m, d, eps,
    ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < m
    sumsq = tl.zeros((BLOCK_I,), dtype=ACC)
    for k0 in range(0, d, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < d)[None, :]
        v = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=ok, other=0.0).to(ACC)
        sumsq += tl.sum(v * v, axis=1)
    n = tl.sqrt(sumsq)
    tl.store(norm_ptr + rows, n, mask=row_ok)
    c = tl.maximum(n, eps)
    for k0 in range(0, d, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < d)[None, :]
        v = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=ok, other=0.0).to(ACC)
        tl.store(z_ptr + rows[:, None] * d + cols[None, :], v / c[:, None], mask=ok)


@triton.jit
def _active_count(count_ptr, m, HAS_COUNT: tl.constexpr):
    """The number c of kept rows (the first c of the m): the count tensor's value clamped to [0, m] (read on
    the device: a bad count never reaches memory beyond the rows; the C++ op raises instead), or m."""
    if HAS_COUNT:
        c = tl.minimum(tl.maximum(tl.load(count_ptr), 0), m).to(tl.int32)
    else:
        c = m + tl.zeros((), dtype=tl.int32)
    return c


@triton.jit
def _similarity_kernel(
    z_ptr,        # [m, d] normalised rows
    count_ptr,    # [1] int64: the first c rows are kept (HAS_COUNT; else c = m)
    s_ptr,        # [m, m] out: z z^T on the kept block, 0 outside
    m, d,
    HAS_COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = tl.load(z_ptr + rows[:, None] * d + ks[None, :], mask=(rows < m)[:, None] & (ks < d)[None, :], other=0.0)
        b = tl.load(z_ptr + cols[None, :] * d + ks[:, None], mask=(cols < m)[None, :] & (ks < d)[:, None], other=0.0)
        acc = tl.dot(a, b, acc=acc, input_precision="ieee")
    c = _active_count(count_ptr, m, HAS_COUNT)
    acc = tl.where((rows < c)[:, None] & (cols < c)[None, :], acc, 0.0)
    tl.store(s_ptr + rows[:, None] * m + cols[None, :], acc, mask=(rows < m)[:, None] & (cols < m)[None, :])


@triton.jit
def _rank_fwd_kernel(
    s_ptr,        # [m, m] similarities
    y_ptr,        # [m] labels (their own dtype: the label distances are computed in it)
    count_ptr,    # [1] int64: the first c rows are kept (HAS_COUNT; else c = m)
    rf_ptr,       # [m, m] out: rank(S_i) among the kept columns, 0 outside the kept block
    ry_ptr,       # [m, m] out: rank(-|y_i - y|), the same
    rows_ptr,     # [m] out: mean_j (R_f - R_y)^2 over the kept columns (0 for a row not kept)
    m,
    HAS_COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    c = _active_count(count_ptr, m, HAS_COUNT)
    w = tl.where(i < c, c, 0)          # the row's kept columns (none for a row not kept)
    yi = tl.load(y_ptr + i)
    total = tl.zeros((), dtype=ACC)
    for j0 in range(0, m, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        j_ok = js < m
        j_kept = js < w
        v = tl.load(s_ptr + i * m + js, mask=j_kept, other=0.0)
        kv = -tl.abs(yi - tl.load(y_ptr + js, mask=j_kept, other=0.0))
        count_f = tl.zeros((BLOCK,), dtype=tl.int32)
        count_y = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(0, w, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            k_ok = ks < w
            sk = tl.load(s_ptr + i * m + ks, mask=k_ok, other=0.0)
            yk = -tl.abs(yi - tl.load(y_ptr + ks, mask=k_ok, other=0.0))
            # [BLOCK_K, BLOCK_J]: does column k come before column j?
            bf = _before(sk[:, None], ks[:, None], v[None, :], js[None, :]) & k_ok[:, None]
            by = _before(yk[:, None], ks[:, None], kv[None, :], js[None, :]) & k_ok[:, None]
            count_f += tl.sum(bf.to(tl.int32), axis=0)
            count_y += tl.sum(by.to(tl.int32), axis=0)
        rf = tl.where(j_kept, (count_f + 1).to(ACC) / c, 0.0)
        ry = tl.where(j_kept, (count_y + 1).to(ACC) / c, 0.0)
        tl.store(rf_ptr + i * m + js, rf, mask=j_ok)
        tl.store(ry_ptr + i * m + js, ry, mask=j_ok)
        e = rf - ry
        total += tl.sum(e * e, axis=0)
    tl.store(rows_ptr + i, total / tl.maximum(c, 1))


@triton.jit
def _perturbed(s_ptr, rf_ptr, ry_ptr, offs, ok, c, lam):
    """S_ij + lam G_ij with G_ij = c (2 (R_f - R_y)_ij), c = g_i / (kept count)."""
    s = tl.load(s_ptr + offs, mask=ok, other=0.0)
    rf = tl.load(rf_ptr + offs, mask=ok, other=0.0)
    ry = tl.load(ry_ptr + offs, mask=ok, other=0.0)
    return s + lam * (c * (2.0 * (rf - ry))), rf


@triton.jit
def _rank_bwd_kernel(
    grad_ptr,     # [] or [m] ('none'): incoming gradient of the loss
    lam_ptr,      # [1] lambda
    s_ptr, rf_ptr, ry_ptr,   # [m, m] saved by the forward
    count_ptr,    # [1] int64: the first c rows are kept (HAS_COUNT; else c = m)
    ds_ptr,       # [m, m] out: (rank(S_i + lam G_i) - R_f,i) / lam on the kept block, 0 outside
    m,
    REDUCTION: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    c = _active_count(count_ptr, m, HAS_COUNT)
    w = tl.where(i < c, c, 0)
    lam = tl.load(lam_ptr)
    if REDUCTION == NONE:
        g = tl.load(grad_ptr + i)
    elif REDUCTION == MEAN:
        g = tl.load(grad_ptr) / tl.maximum(c, 1)
    else:
        g = tl.load(grad_ptr)
    g_row = g / tl.maximum(c, 1)
    for j0 in range(0, m, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        j_ok = js < m
        j_kept = js < w
        v, rf = _perturbed(s_ptr, rf_ptr, ry_ptr, i * m + js, j_kept, g_row, lam)
        count = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(0, w, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            k_ok = ks < w
            vk, _ = _perturbed(s_ptr, rf_ptr, ry_ptr, i * m + ks, k_ok, g_row, lam)
            before = _before(vk[:, None], ks[:, None], v[None, :], js[None, :]) & k_ok[:, None]
            count += tl.sum(before.to(tl.int32), axis=0)
        rank_p = (count + 1).to(rf.dtype) / c
        tl.store(ds_ptr + i * m + js, tl.where(j_kept, (rank_p - rf) / lam, 0.0), mask=j_ok)


@triton.jit
def _chain_kernel(
    ds_ptr,       # [m, m] dL/dS (before symmetrisation)
    s_ptr,        # [m, m] S
    z_ptr,        # [m, d] normalised rows
    norm_ptr,     # [m] |x_i|
    gx_ptr,       # [m, d] out: dL/dx
    m, d, eps,
    ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < m
    # z_i . dz_i = sum_j A_ij S_ij,  A = dS + dS^T
    proj = tl.zeros((BLOCK_I,), dtype=ACC)
    for j0 in range(0, m, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        ok = row_ok[:, None] & (cols < m)[None, :]
        a = (tl.load(ds_ptr + rows[:, None] * m + cols[None, :], mask=ok, other=0.0)
             + tl.load(ds_ptr + cols[None, :] * m + rows[:, None], mask=ok, other=0.0))
        proj += tl.sum(a * tl.load(s_ptr + rows[:, None] * m + cols[None, :], mask=ok, other=0.0), axis=1)
    n = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    big = n >= eps
    inv = 1.0 / tl.where(big, n, eps)
    proj = tl.where(big, proj, 0.0)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < d
        dz = tl.zeros((BLOCK_I, BLOCK_D), dtype=ACC)
        for j0 in range(0, m, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            ok = row_ok[:, None] & (cols < m)[None, :]
            a = (tl.load(ds_ptr + rows[:, None] * m + cols[None, :], mask=ok, other=0.0)
                 + tl.load(ds_ptr + cols[None, :] * m + rows[:, None], mask=ok, other=0.0))
            zj = tl.load(z_ptr + cols[:, None] * d + ks[None, :], mask=(cols < m)[:, None] & k_ok[None, :], other=0.0)
            dz = tl.dot(a, zj, acc=dz, input_precision="ieee")
        zi = tl.load(z_ptr + rows[:, None] * d + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # |x| >= eps: (dz - z (z . dz)) / |x|;  |x| < eps: dz / eps
        gx = (dz - zi * proj[:, None]) * inv[:, None]
        tl.store(gx_ptr + rows[:, None] * d + ks[None, :], gx, mask=row_ok[:, None] & k_ok[None, :])


def _check(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ranksim (Triton): {name} must be float32 or float64, got {t.dtype}")


def _count_arg(count, ref: torch.Tensor):
    """(pointer argument, HAS_COUNT) of the optional kept-row count ([] or [1] int64 on the device)."""
    if count is None:
        return ref, False
    if count.dtype != torch.int64 or count.numel() != 1 or count.device != ref.device:
        raise TypeError(f"ranksim (Triton): count must be a one-element int64 tensor on {ref.device}, got "
                        f"{count.dtype} {tuple(count.shape)} on {count.device}")
    return count.reshape(1), True


def ranksim_fwd(features: torch.Tensor, labels: torch.Tensor, count, lam: float, reduction: int,
                compute_grad: bool):
    """(loss, z, norms, S, R_f, R_y); see the C++ op ``imbreg_fast::ranksim_fwd``."""
    _check("features", features)
    _check("labels", labels)
    x = features.contiguous()
    y = labels.contiguous()
    m, d = x.shape
    acc = acc_dtype(x.dtype)
    count_arg, has_count = _count_arg(count, x)
    z, norms = torch.empty_like(x), x.new_empty(m)
    s, rf, ry = (x.new_empty(m, m) for _ in range(3))
    rows = x.new_empty(m)
    if m > 0:
        with device_guard(x):
            _normalize_kernel[(triton.cdiv(m, BLOCK_I),)](x, z, norms, m, d, NORM_EPS, ACC=acc, BLOCK_I=BLOCK_I,
                                                          BLOCK_D=BLOCK_D)
            _similarity_kernel[(triton.cdiv(m, BLOCK_I), triton.cdiv(m, BLOCK_J))](
                z, count_arg, s, m, d, HAS_COUNT=has_count, ACC=acc, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
                BLOCK_D=BLOCK_D)
            _rank_fwd_kernel[(m,)](s, y, count_arg, rf, ry, rows, m, HAS_COUNT=has_count, ACC=acc, BLOCK=BLOCK_R)
    kept = None if count is None else torch.arange(m, device=x.device) < count.reshape(())   # as the kernels' clamp
    loss = _reduction.reduce_rows(rows, kept, reduction)      # on the device: no host sync
    if not compute_grad:
        return (loss,) + tuple(x.new_empty(0) for _ in range(5))   # distinct tensors: outputs may not alias
    return loss, z, norms, s, rf, ry


def ranksim_bwd(grad_loss, z, norms, s, rank_f, rank_y, count, lam: float, reduction: int) -> torch.Tensor:
    """d loss / d features [m, d]; see the C++ op ``imbreg_fast::ranksim_bwd``."""
    _check("z", z)
    m, d = z.shape
    gx = torch.empty_like(z)
    if m == 0:
        return gx
    acc = acc_dtype(z.dtype)
    count_arg, has_count = _count_arg(count, z)
    g = grad_loss.to(z.dtype).contiguous()
    lam_t = torch.full((1,), lam, dtype=z.dtype, device=z.device)
    ds = z.new_empty(m, m)
    with device_guard(z):
        _rank_bwd_kernel[(m,)](g, lam_t, s, rank_f, rank_y, count_arg, ds, m, REDUCTION=int(reduction),
                               HAS_COUNT=has_count, BLOCK=BLOCK_R)
        _chain_kernel[(triton.cdiv(m, BLOCK_I),)](ds, s, z, norms, gx, m, d, NORM_EPS, ACC=acc, BLOCK_I=BLOCK_I,
                                                  BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D)
    return gx
