"""Triton kernels of FDS (docs/methods.md §3): per-bin batch statistics and per-bin recolouring of features.

Installed as ``imbreg_fast.triton_kernels.fds``; imported lazily by ``imbreg_fast.ops.fds_triton``.
Layout (the FDS op contract): features ``[B, C, P]`` read through their strides (dense NCHW, channels_last
and ``[N, C]`` rows seen as ``[1, C, N]`` alike, never permute-copied); ``bins`` int64 ``[B, P]``
contiguous, ``-1`` = skipped pixel. Values outside ``[0, num_bins)`` are treated as ``-1`` (the kernels
never index out of bounds; validating the values would need a device-to-host sync).

Design. The full recolouring and the statistics group the pixels by bin first, with a stable counting
sort on the device (no host sync, deterministic):
  1. ``_fds_bin_histogram_kernel``: per block of ``sort_block`` pixels, the count of each bin
     (``tl.histogram``); skipped pixels go to a spare group ``num_bins`` (last).
  2. host-side torch ops on the tiny [blocks, nb + 1] count table: exclusive prefix sums in (bin, block)
     order -> where each block's pixels of each bin start in the grouped order.
  3. ``_fds_bin_scatter_kernel``: per block, ``tl.sort`` of the keys ``bin * BLOCK + local index`` gives
     each pixel its rank among the block's pixels of its bin; it writes its id ``b * P + p`` there.
Work is then cut into tiles of pixels of ONE bin. The number of tiles depends on the data, so the grid
is the upper bound ``cdiv(N, TILE) + groups`` (each group adds at most one partial tile); a program
finds its (bin, tile) from the per-group tile prefix sums and exits when it is past the end.

Recolouring, full transform (``out = A_k z + s_k``). Per pixel this is a C x C mat-vec: 2 C^2 flop
against 2 C elements moved (8 C bytes in fp32), i.e. C / 4 flop/byte: 16 at C = 64, 32 at C = 128.
  - A per-pixel gather of A_k rows (no sort) reads C^2 values of A per pixel from L2 (64 KB per pixel
    at C = 128, 64x the pixel's own 1 KB of HBM traffic; 2.5M pixels -> 160 GB of L2 traffic, ~16 ms on an H100
    against ~0.8 ms of HBM traffic), and its mat-vec cannot use tensor cores.
  - With pixels grouped by bin, a program multiplies a [TILE, C] tile of one bin's pixels by that bin's
    A_k^T with ``tl.dot``: A_k is read once per tile (C^2 / TILE values per pixel: 2 at C = 128 with
    TILE = 64) and the product runs on tensor cores (tf32 when torch's float32 matmul precision allows
    it, else exact fp32 FMA). The sort adds ~35 bytes per pixel (int64 bins read twice, int32 ids
    written and read, the count table) against 8 C bytes of features: 3-7%. This is what is implemented.
    (H100 ridge point for fp32 FMA: 67 TFLOP/s / 3.35 TB/s = 20 flop/byte, so exact fp32 is compute-bound
    from C ~ 80; tf32 tensor cores keep it memory-bound. See BENCHMARKS.md.)
Diagonal transform: element-wise ``a_k * z + s_k``; no sort (the [nb, C] tables stay in L1/L2); tiles of
[BLOCK_C, BLOCK_P] read coalesced along whichever of C or P has stride 1.

Statistics (``count, mean, M2``), two levels, no float atomics, deterministic (fixed chunking of the
stable grouped order, fixed merge order):
  1. ``_fds_chunk_stats_kernel``: one program per (chunk of <= ``stats_chunk`` pixels of one bin,
     channel tile i, channel tile j >= i); it streams the chunk in sub-blocks of ``BLOCK_P`` pixels of
     y = z - shift_k (shift_k = the bin's first pixel, so that fp32 means of y keep their digits when
     |mean| >> spread), centres each sub-block on its own mean, ``tl.dot`` gives the sub-block's centred
     cross products, and Chan's parallel update merges the sub-blocks (in the compute dtype: fp32, fp64
     for fp64 features).
  2. ``_fds_merge_kernel``: one program per (bin, i, j >= i) merges the bin's chunk partials in order
     with Chan's update in fp64, adds shift_k back to the mean, writes the fp64 result and mirrors the
     (j, i) tile.
  Chan: n = n_a + n_b, d = mean_b - mean_a, mean = mean_a + d n_b / n,
        M2 = M2_a + M2_b + d d^T n_a n_b / n  -- never E[zz^T] - mu mu^T, so no cancellation.
  Splitting a bin into chunks keeps the load balanced when one bin holds most of the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import compute_dtype

__all__ = ["FDSConfig", "fds_accumulate", "fds_recolor", "group_by_bin"]

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class FDSConfig:
    """Block sizes of the FDS kernels (powers of two; the ``tl.dot`` dimensions must be >= 16)."""
    sort_block: int = 256         # pixels per counting-sort program (tl.sort of the block)
    recolor_tile: int = 64        # pixels of one bin per recolouring program (tl.dot M)
    recolor_block_co: int = 128   # max output channels per recolouring program (tl.dot N)
    recolor_block_ci: int = 32    # input-channel step (tl.dot K)
    diag_block_p: int = 128       # pixels per diagonal-recolouring program
    diag_block_c: int = 32        # channel step of the diagonal recolouring
    stats_chunk: int = 2048       # max pixels of one bin per statistics program
    stats_block_p: int = 64       # pixel sub-block of the statistics (tl.dot K)
    stats_block_c: int = 64       # channel tile of the statistics (tl.dot M and N)
    num_warps: int = 4

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if value < 1 or value & (value - 1):
                raise ValueError(f"FDSConfig.{name} must be a power of two, got {value}")
        for name in ("recolor_tile", "recolor_block_co", "recolor_block_ci", "stats_block_p",
                     "stats_block_c"):
            if getattr(self, name) < 16:
                raise ValueError(f"FDSConfig.{name} must be >= 16 (tl.dot), got {getattr(self, name)}")


DEFAULT_CONFIG = FDSConfig()


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


# --------------------------------------------------------------------------------------------------
# Grouping pixels by bin: a stable counting sort
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fds_bin_histogram_kernel(
    bins_ptr,       # [N] int64, bins[B, P] flattened; -1 or out of range = skipped
    counts_ptr,     # [num_blocks, num_bins + 1] int32 out; column num_bins counts the skipped pixels
    n_pixels, num_bins,
    NB_HIST: tl.constexpr,   # power of two >= num_bins + 1
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_pixels
    k = tl.load(bins_ptr + offs, mask=in_range, other=-1)
    k = tl.where((k >= 0) & (k < num_bins), k, num_bins).to(tl.int32)
    hist = tl.histogram(k, NB_HIST, mask=in_range)
    cols = tl.arange(0, NB_HIST)
    tl.store(counts_ptr + pid * (num_bins + 1) + cols, hist, mask=cols <= num_bins)


@triton.jit
def _fds_bin_scatter_kernel(
    bins_ptr,       # [N] int64
    base_ptr,       # [num_blocks, num_bins + 1] int32: position in the grouped order of the block's first
                    #   pixel of bin k, minus the number of the block's pixels of bins < k
    perm_ptr,       # [N] int32 out: pixel ids b * P + p grouped by bin, stable
    n_pixels, num_bins,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offs = pid * BLOCK + local
    in_range = offs < n_pixels
    k = tl.load(bins_ptr + offs, mask=in_range, other=-1)
    k = tl.where((k >= 0) & (k < num_bins), k, num_bins).to(tl.int32)
    # sorted position s of a pixel = (#pixels of bins < k in the block) + (its rank within bin k), so
    # base[k] + s is its place in the grouped order; lanes past the end sort last and are dropped.
    key = tl.where(in_range, k * BLOCK + local, (num_bins + 1) * BLOCK + local)
    key = tl.sort(key)
    k_sorted = key // BLOCK
    keep = k_sorted <= num_bins
    dest = tl.load(base_ptr + pid * (num_bins + 1) + k_sorted, mask=keep, other=0) + local   # + s
    tl.store(perm_ptr + dest, pid * BLOCK + key % BLOCK, mask=keep)


def group_by_bin(bins: torch.Tensor, num_bins: int, block: int):
    """Stable grouping of the pixels by bin, on the device (no host sync).

    Args:
        bins: int64 ``[B, P]`` contiguous; values outside ``[0, num_bins)`` form the last group.
        num_bins: number of bins ``nb``.
        block: pixels per sort program (power of two).

    Returns:
        ``perm`` int32 ``[N]`` (pixel ids ``b * P + p``, grouped by bin, in pixel order within a bin),
        ``group_start`` int32 ``[nb + 1]`` and ``group_count`` int64 ``[nb + 1]`` (group ``nb``: skipped).
    """
    flat = bins.reshape(-1)
    n = flat.numel()
    nb1 = num_bins + 1
    n_blocks = triton.cdiv(n, block)
    counts = torch.empty((n_blocks, nb1), dtype=torch.int32, device=bins.device)
    _fds_bin_histogram_kernel[(n_blocks,)](flat, counts, n, num_bins, NB_HIST=_pow2(nb1), BLOCK=block)
    by_bin = counts.t().reshape(-1)                                     # (bin, block) order
    first_global = (by_bin.cumsum(0) - by_bin).reshape(nb1, n_blocks).t()
    first_local = counts.cumsum(1) - counts
    base = (first_global - first_local).to(torch.int32).contiguous()
    perm = torch.empty(n, dtype=torch.int32, device=bins.device)
    _fds_bin_scatter_kernel[(n_blocks,)](flat, base, perm, n, num_bins, BLOCK=block)
    group_count = counts.sum(0)
    group_start = (group_count.cumsum(0) - group_count).to(torch.int32)
    return perm, group_start, group_count


def _sort_block(cfg: FDSConfig, n: int) -> int:
    """Sort block: the configured one, smaller for a problem that fits in one smaller block."""
    return min(cfg.sort_block, _pow2(n, 16))


def _tile_starts(group_count: torch.Tensor, tile: int) -> torch.Tensor:
    """int32 [groups + 1]: exclusive prefix sums of cdiv(count, tile) per group, the total last."""
    tiles = (group_count + (tile - 1)) // tile
    return torch.cat([tiles.new_zeros(1), tiles.cumsum(0)]).to(torch.int32)


@triton.jit
def _find_group(j, tile_start_ptr, n_groups, NB_PAD: tl.constexpr):
    """(group, tile index within the group) of work item j; group == n_groups past the last tile.
    tile_start_ptr: [n_groups + 1] int32 exclusive prefix sums of tiles per group, the total last."""
    g = tl.arange(0, NB_PAD)
    ends = tl.load(tile_start_ptr + 1 + g, mask=g < n_groups, other=2147483647)
    group = tl.sum((ends <= j).to(tl.int32), axis=0)
    return group, j - tl.load(tile_start_ptr + group)


# --------------------------------------------------------------------------------------------------
# Recolouring
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fds_recolor_full_kernel(
    z_ptr,              # [B, C, P] features, strided
    out_ptr,            # [B, C, P] contiguous out, features' dtype
    a_ptr,              # [nb, C, C] contiguous transforms A_k (compute dtype)
    s_ptr,              # [nb, C] contiguous shifts s_k
    perm_ptr,           # [N] int32 pixel ids grouped by bin (group nb = skipped pixels)
    group_start_ptr,    # [nb + 1] int32 first position of each group in perm
    group_count_ptr,    # [nb + 1] int64 pixels per group
    tile_start_ptr,     # [nb + 2] int32 prefix sums of tiles per group
    num_bins, C, P, stride_b, stride_c, stride_p,
    NB_PAD: tl.constexpr, TILE: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # one 1-D grid, output-channel block fastest: the programs sharing a pixel tile run together and
    # read its features from L2 after the first one
    n_co = tl.cdiv(C, BLOCK_CO)
    pid = tl.program_id(0)
    k, t = _find_group(pid // n_co, tile_start_ptr, num_bins + 1, NB_PAD)
    if k > num_bins:
        return
    n_rows = tl.minimum(tl.load(group_count_ptr + k) - t * TILE, TILE)
    rows = tl.arange(0, TILE)
    row_ok = rows < n_rows
    pix = tl.load(perm_ptr + tl.load(group_start_ptr + k) + t * TILE + rows, mask=row_ok, other=0).to(tl.int64)
    b = pix // P
    p = pix - b * P
    z_rows = z_ptr + b * stride_b + p * stride_p                     # [TILE] pointers to z[b, 0, p]
    out_rows = out_ptr + b * C * P + p
    co = (pid % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C
    out_mask = row_ok[:, None] & co_ok[None, :]
    if k == num_bins:
        # skipped pixels: out = z
        z = tl.load(z_rows[:, None] + co[None, :] * stride_c, mask=out_mask, other=0.0)
        tl.store(out_rows[:, None] + co[None, :] * P, z.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # out[rows, co] = sum_ci z[rows, ci] A_k[co, ci] + s_k[co]: a [TILE, C] x [C, BLOCK_CO] product
        acc = tl.zeros((TILE, BLOCK_CO), dtype=a_ptr.dtype.element_ty)
        a_k = a_ptr + k * C * C
        for c0 in range(0, C, BLOCK_CI):
            ci = c0 + tl.arange(0, BLOCK_CI)
            ci_ok = ci < C
            z = tl.load(z_rows[:, None] + ci[None, :] * stride_c, mask=row_ok[:, None] & ci_ok[None, :],
                        other=0.0).to(a_ptr.dtype.element_ty)
            a_t = tl.load(a_k + co[None, :] * C + ci[:, None], mask=ci_ok[:, None] & co_ok[None, :],
                          other=0.0)                                         # [BLOCK_CI, BLOCK_CO] = A_k^T
            acc = tl.dot(z, a_t, acc=acc, input_precision=INPUT_PRECISION)
        acc += tl.load(s_ptr + k * C + co, mask=co_ok, other=0.0)[None, :]
        tl.store(out_rows[:, None] + co[None, :] * P, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _fds_recolor_diag_kernel(
    z_ptr,              # [B, C, P] features, strided
    out_ptr,            # [B, C, P] contiguous out
    a_ptr,              # [nb, C] contiguous scales a_k (compute dtype)
    s_ptr,              # [nb, C] contiguous shifts s_k
    bins_ptr,           # [B, P] int64
    num_bins, C, P, stride_b, stride_c, stride_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    k = tl.load(bins_ptr + b * P + p, mask=p_ok, other=-1)
    keep = (k >= 0) & (k < num_bins)
    k_row = tl.where(keep, k, 0).to(tl.int32) * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = c_ok[:, None] & p_ok[None, :]
        z = tl.load(z_ptr + b * stride_b + c[:, None] * stride_c + p[None, :] * stride_p, mask=mask,
                    other=0.0).to(a_ptr.dtype.element_ty)
        table = k_row[None, :] + c[:, None]
        table_mask = c_ok[:, None] & keep[None, :]
        a = tl.load(a_ptr + table, mask=table_mask, other=1.0)
        s = tl.load(s_ptr + table, mask=table_mask, other=0.0)
        y = tl.where(keep[None, :], a * z + s, z)
        tl.store(out_ptr + b * C * P + c[:, None] * P + p[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_common(features: torch.Tensor, bins: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("features must be a floating torch.Tensor [B, C, P]")
    if features.dim() != 3:
        raise ValueError(f"features must be [B, C, P], got shape {tuple(features.shape)}")
    if not isinstance(bins, torch.Tensor) or bins.dtype != torch.int64:
        raise TypeError(f"bins must be an int64 tensor [B, P], got "
                        f"{bins.dtype if isinstance(bins, torch.Tensor) else type(bins).__name__}")
    b, _, p = features.shape
    if tuple(bins.shape) != (b, p):
        raise ValueError(f"bins must have shape {(b, p)} for features {tuple(features.shape)}, "
                         f"got {tuple(bins.shape)}")
    if bins.device != features.device:
        raise ValueError(f"bins is on {bins.device} but features is on {features.device}")
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(features.shape, features.stride()))
    if max(extent, features.numel()) > _INT32_MAX:
        raise ValueError(f"features {tuple(features.shape)} (strides {features.stride()}) span more than 2^31 - 1 "
                         "elements, beyond the 32-bit channel offsets of the Triton FDS kernels; split the batch")


def _matmul_precision(dtype: torch.dtype) -> str:
    """fp64: exact; fp32: tf32 tensor cores only when torch's float32 matmul precision allows it."""
    if dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def fds_recolor(features: torch.Tensor, bins: torch.Tensor, transform: torch.Tensor, shift: torch.Tensor,
                config: FDSConfig | None = None) -> torch.Tensor:
    """Per-bin affine map of every pixel: ``out[b, :, p] = A_k z + s_k`` (``a_k * z + s_k`` for a diagonal
    transform), ``k = bins[b, p]``; ``out = z`` where ``k`` is -1 (or outside ``[0, nb)``).

    Args:
        features: ``[B, C, P]`` floating, any strides.
        bins: int64 ``[B, P]``.
        transform: ``[nb, C, C]`` (full) or ``[nb, C]`` (diagonal); cast to the compute dtype (fp32, fp64 for
            fp64 features).
        shift: ``[nb, C]``.
        config: block sizes (default :data:`DEFAULT_CONFIG`).

    Returns:
        A new contiguous ``[B, C, P]`` tensor of the features' dtype.
    """
    cfg = config or DEFAULT_CONFIG
    _check_common(features, bins)
    b, c, p = features.shape
    dtype = compute_dtype(features.dtype)
    if not isinstance(transform, torch.Tensor) or transform.dim() not in (2, 3):
        raise ValueError("transform must be a tensor [nb, C, C] (full) or [nb, C] (diagonal)")
    nb = transform.shape[0]
    full = transform.dim() == 3
    want = (nb, c, c) if full else (nb, c)
    if tuple(transform.shape) != want:
        raise ValueError(f"transform must have shape {want} for C = {c}, got {tuple(transform.shape)}")
    if not isinstance(shift, torch.Tensor) or tuple(shift.shape) != (nb, c):
        raise ValueError(f"shift must have shape {(nb, c)}, got "
                         f"{tuple(shift.shape) if isinstance(shift, torch.Tensor) else type(shift).__name__}")
    if transform.device != features.device or shift.device != features.device:
        raise ValueError("transform and shift must be on the features' device")
    out = torch.empty((b, c, p), dtype=features.dtype, device=features.device)
    if out.numel() == 0:
        return out
    transform = transform.to(dtype).contiguous()
    shift = shift.to(dtype).contiguous()
    bins = bins.contiguous()
    sb, sc, sp = features.stride()
    if not full:
        block_c = min(cfg.diag_block_c, _pow2(c))
        grid = (triton.cdiv(p, cfg.diag_block_p), b)
        _fds_recolor_diag_kernel[grid](features, out, transform, shift, bins, nb, c, p, sb, sc, sp,
                                       BLOCK_C=block_c, BLOCK_P=cfg.diag_block_p, num_warps=cfg.num_warps)
        return out
    perm, group_start, group_count = group_by_bin(bins, nb, _sort_block(cfg, b * p))
    tile = cfg.recolor_tile
    tile_start = _tile_starts(group_count, tile)
    block_co = min(cfg.recolor_block_co, _pow2(c, 16))
    block_ci = min(cfg.recolor_block_ci, _pow2(c, 16))
    grid = ((triton.cdiv(b * p, tile) + nb + 1) * triton.cdiv(c, block_co),)
    _fds_recolor_full_kernel[grid](features, out, transform, shift, perm, group_start, group_count, tile_start,
                                   nb, c, p, sb, sc, sp, NB_PAD=_pow2(nb + 1), TILE=tile, BLOCK_CO=block_co,
                                   BLOCK_CI=block_ci, INPUT_PRECISION=_matmul_precision(dtype),
                                   num_warps=cfg.num_warps)
    return out


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bin_shift(z_ptr, perm_ptr, group_start_ptr, k, c, c_ok, P, stride_b, stride_c, stride_p, has_pixels):
    """[BLOCK_C] features of bin k's first pixel (0 for an empty bin): the shift of the bin's statistics."""
    pix = tl.load(perm_ptr + tl.where(has_pixels, tl.load(group_start_ptr + k), 0)).to(tl.int64)
    b = pix // P
    z = tl.load(z_ptr + b * stride_b + (pix - b * P) * stride_p + c * stride_c, mask=c_ok, other=0.0)
    return tl.where(has_pixels, z, 0.0)


@triton.jit
def _fds_chunk_stats_kernel(
    z_ptr,              # [B, C, P] features, strided
    perm_ptr,           # [N] int32 pixel ids grouped by bin
    group_start_ptr,    # [nb + 1] int32
    group_count_ptr,    # [nb + 1] int64
    chunk_start_ptr,    # [nb + 1] int32 prefix sums of chunks per bin (skipped pixels excluded)
    part_mean_ptr,      # [G, C] out, compute dtype: mean of each chunk of y = z - shift_k
    part_m2_ptr,        # [G, C, C] (FULL: tiles j >= i written) or [G, C] out: centred M2 of each chunk
    num_bins, C, P, stride_b, stride_c, stride_p,
    FULL: tl.constexpr, NB_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # one 1-D grid, channel tiles fastest: the programs of one chunk run together and share its
    # features through L2
    pid = tl.program_id(0)
    n_ct = tl.cdiv(C, BLOCK_C)
    if FULL:
        g = pid // (n_ct * n_ct)
        ti = (pid // n_ct) % n_ct
        tj = pid % n_ct
    else:
        g = pid // n_ct
        ti = pid % n_ct
        tj = ti
    if tj < ti:
        return                       # M2 is symmetric: the merge kernel mirrors tile (i, j) into (j, i)
    k, t = _find_group(g, chunk_start_ptr, num_bins, NB_PAD)
    if k >= num_bins:
        return
    dtype = part_mean_ptr.dtype.element_ty
    n_rows = tl.minimum(tl.load(group_count_ptr + k) - t * CHUNK, CHUNK).to(tl.int32)
    first = tl.load(group_start_ptr + k) + t * CHUNK
    ci = ti * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = tj * BLOCK_C + tl.arange(0, BLOCK_C)
    ci_ok = ci < C
    cj_ok = cj < C
    # Statistics of y = z - shift_k, shift_k = the bin's first pixel (shared by all its chunks): y is of
    # the size of the spread, so the fp32 means and mean differences below keep their digits even when
    # |mean| >> spread; the merge kernel adds shift_k back in fp64.
    shift_i = _bin_shift(z_ptr, perm_ptr, group_start_ptr, k, ci, ci_ok, P, stride_b, stride_c, stride_p,
                         True).to(dtype)
    mean_i = tl.zeros((BLOCK_C,), dtype=dtype)
    if FULL:
        shift_j = _bin_shift(z_ptr, perm_ptr, group_start_ptr, k, cj, cj_ok, P, stride_b, stride_c,
                             stride_p, True).to(dtype)
        mean_j = tl.zeros((BLOCK_C,), dtype=dtype)
        m2 = tl.zeros((BLOCK_C, BLOCK_C), dtype=dtype)
    else:
        m2 = tl.zeros((BLOCK_C,), dtype=dtype)
    for r0 in range(0, n_rows, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        row_ok = rows < n_rows
        pix = tl.load(perm_ptr + first + rows, mask=row_ok, other=0).to(tl.int64)
        b = pix // P
        z_rows = z_ptr + b * stride_b + (pix - b * P) * stride_p
        # every sub-block but the last is full, so n_a = r0 pixels were merged before this one
        n_a = tl.cast(r0, dtype)
        n_b = tl.minimum(n_rows - r0, BLOCK_P).to(dtype)
        f = n_b / (n_a + n_b)
        mask_i = row_ok[:, None] & ci_ok[None, :]
        yi = tl.load(z_rows[:, None] + ci[None, :] * stride_c, mask=mask_i, other=0.0).to(dtype)
        yi = tl.where(mask_i, yi - shift_i[None, :], 0.0)                  # [BLOCK_P, BLOCK_C]
        mean_bi = tl.sum(yi, axis=0) / n_b
        dyi = tl.where(mask_i, yi - mean_bi[None, :], 0.0)
        di = mean_bi - mean_i
        mean_i += di * f
        if FULL:
            mask_j = row_ok[:, None] & cj_ok[None, :]
            yj = tl.load(z_rows[:, None] + cj[None, :] * stride_c, mask=mask_j, other=0.0).to(dtype)
            yj = tl.where(mask_j, yj - shift_j[None, :], 0.0)
            mean_bj = tl.sum(yj, axis=0) / n_b
            dyj = tl.where(mask_j, yj - mean_bj[None, :], 0.0)
            dj = mean_bj - mean_j
            mean_j += dj * f
            # Chan: M2 = M2_a + M2_b + (mean_b - mean_a)(mean_b - mean_a)^T n_a n_b / n,
            # M2_b = dy_i^T dy_j of the sub-block centred on its own mean
            m2 = tl.dot(tl.trans(dyi), dyj, acc=m2, input_precision=INPUT_PRECISION)
            m2 += (di * (n_a * f))[:, None] * dj[None, :]
        else:
            m2 += tl.sum(dyi * dyi, axis=0) + di * di * (n_a * f)
    g = g.to(tl.int64)                   # G * C * C may exceed 2^31
    if ti == tj:
        tl.store(part_mean_ptr + g * C + ci, mean_i, mask=ci_ok)
    if FULL:
        tl.store(part_m2_ptr + g * C * C + ci[:, None] * C + cj[None, :], m2,
                 mask=ci_ok[:, None] & cj_ok[None, :])
    else:
        tl.store(part_m2_ptr + g * C + ci, m2, mask=ci_ok)


@triton.jit
def _fds_merge_kernel(
    z_ptr,              # [B, C, P] features (for the shift), strided
    perm_ptr,           # [N] int32 pixel ids grouped by bin
    group_start_ptr,    # [nb + 1] int32
    group_count_ptr,    # [nb + 1] int64
    chunk_start_ptr,    # [nb + 1] int32
    part_mean_ptr,      # [G, C] chunk means of y = z - shift_k
    part_m2_ptr,        # [G, C, C] or [G, C] chunk M2
    mean_ptr,           # [nb, C] float64 out
    m2_ptr,             # [nb, C, C] or [nb, C] float64 out
    C, P, stride_b, stride_c, stride_p,
    FULL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0)
    ti = tl.program_id(1)
    if FULL:
        tj = tl.program_id(2)
    else:
        tj = ti
    if tj < ti:
        return
    ci = ti * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = tj * BLOCK_C + tl.arange(0, BLOCK_C)
    ci_ok = ci < C
    cj_ok = cj < C
    count = tl.load(group_count_ptr + k)
    g0 = tl.load(chunk_start_ptr + k)
    g1 = tl.load(chunk_start_ptr + k + 1)
    mean_i = tl.zeros((BLOCK_C,), dtype=tl.float64)
    mean_j = tl.zeros((BLOCK_C,), dtype=tl.float64)
    if FULL:
        m2 = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float64)
    else:
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for g32 in range(g0, g1):
        g = tl.cast(g32, tl.int64)       # G * C * C may exceed 2^31
        # every chunk of a bin but the last is full
        done = (g - g0) * CHUNK
        n_a = done.to(tl.float64)
        n_b = tl.minimum(count - done, CHUNK).to(tl.float64)
        f = n_b / (n_a + n_b)
        di = tl.load(part_mean_ptr + g * C + ci, mask=ci_ok, other=0.0).to(tl.float64) - mean_i
        mean_i += di * f
        if FULL:
            dj = tl.load(part_mean_ptr + g * C + cj, mask=cj_ok, other=0.0).to(tl.float64) - mean_j
            mean_j += dj * f
            m2_b = tl.load(part_m2_ptr + g * C * C + ci[:, None] * C + cj[None, :],
                           mask=ci_ok[:, None] & cj_ok[None, :], other=0.0).to(tl.float64)
            m2 += m2_b + (di * (n_a * f))[:, None] * dj[None, :]
        else:
            m2_b = tl.load(part_m2_ptr + g * C + ci, mask=ci_ok, other=0.0).to(tl.float64)
            m2 += m2_b + di * di * (n_a * f)
    if ti == tj:
        shift = _bin_shift(z_ptr, perm_ptr, group_start_ptr, k, ci, ci_ok, P, stride_b, stride_c, stride_p,
                           count > 0).to(tl.float64)
        tl.store(mean_ptr + k * C + ci, mean_i + shift, mask=ci_ok)      # empty bin: 0 + 0
    if FULL:
        out_k = m2_ptr + k * C * C
        if ti != tj:
            tl.store(out_k + cj[:, None] * C + ci[None, :], tl.trans(m2), mask=cj_ok[:, None] & ci_ok[None, :])
        else:
            m2 = 0.5 * (m2 + tl.trans(m2))       # rounding left the diagonal tile slightly asymmetric
        tl.store(out_k + ci[:, None] * C + cj[None, :], m2, mask=ci_ok[:, None] & cj_ok[None, :])
    else:
        tl.store(m2_ptr + k * C + ci, m2, mask=ci_ok)


def fds_accumulate(features: torch.Tensor, bins: torch.Tensor, num_bins: int, full: bool,
                   config: FDSConfig | None = None):
    """Centred per-bin statistics of one batch.

    Args:
        features: ``[B, C, P]`` floating, any strides (read in fp32, fp64 for fp64 features).
        bins: int64 ``[B, P]``; -1 (or any value outside ``[0, num_bins)``) skips the pixel.
        num_bins: number of bins ``nb`` (>= 1).
        full: full ``C x C`` second moments, else their diagonal.
        config: block sizes (default :data:`DEFAULT_CONFIG`).

    Returns:
        ``count [nb]``, ``mean [nb, C]``, ``m2 [nb, C, C]`` (full) or ``[nb, C]``, all float64, with
        ``m2 = sum (z - mean)(z - mean)^T`` over the bin's pixels; empty bins are all zero.
    """
    cfg = config or DEFAULT_CONFIG
    _check_common(features, bins)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    b, c, p = features.shape
    device = features.device
    f64 = dict(dtype=torch.float64, device=device)
    mean = torch.zeros((num_bins, c), **f64)
    m2 = torch.zeros((num_bins, c, c) if full else (num_bins, c), **f64)
    if b * p == 0 or c == 0:
        return torch.zeros(num_bins, **f64), mean, m2
    dtype = compute_dtype(features.dtype)
    perm, group_start, group_count = group_by_bin(bins.contiguous(), num_bins, _sort_block(cfg, b * p))
    chunk = cfg.stats_chunk
    chunk_start = _tile_starts(group_count[:num_bins], chunk)
    n_chunks = triton.cdiv(b * p, chunk) + num_bins
    block_c = min(cfg.stats_block_c, _pow2(c, 16))
    n_ct = triton.cdiv(c, block_c)
    part_mean = torch.empty((n_chunks, c), dtype=dtype, device=device)
    part_m2 = torch.empty((n_chunks, c, c) if full else (n_chunks, c), dtype=dtype, device=device)
    tiles = (n_ct, n_ct) if full else (n_ct,)
    sb, sc, sp = features.stride()
    _fds_chunk_stats_kernel[(n_chunks * math.prod(tiles),)](
        features, perm, group_start, group_count, chunk_start, part_mean, part_m2,
        num_bins, c, p, sb, sc, sp, FULL=full, NB_PAD=_pow2(num_bins), CHUNK=chunk,
        BLOCK_P=cfg.stats_block_p, BLOCK_C=block_c, INPUT_PRECISION="ieee", num_warps=cfg.num_warps)
    _fds_merge_kernel[(num_bins, *tiles)](
        features, perm, group_start, group_count, chunk_start, part_mean, part_m2, mean, m2, c, p, sb, sc, sp,
        FULL=full, CHUNK=chunk, BLOCK_C=block_c, num_warps=cfg.num_warps)
    return group_count[:num_bins].to(torch.float64), mean, m2
