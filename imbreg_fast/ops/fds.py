"""FDS (feature distribution smoothing, docs/methods.md §3): backend implementations and the pieces shared by
every backend (layout helpers, fake kernels, the recolouring autograd).

Layout (the op contract, shared with the Triton kernels): features are seen as a strided 3-D tensor
``[B, C, P]`` without a copy -- dense ``[B, C, H, W]`` -> ``x.flatten(2)``, rows ``[N, C]`` ->
``x.t().unsqueeze(0)`` = ``[1, C, N]`` with strides ``(.., 1, C)``. ``bins`` is int64 ``[B, P]``
contiguous: the bin of each pixel in ``[0, num_bins)``, or -1 for a pixel to skip (masked out).

Public dispatch ops (``imbreg_fast._dispatch.register(op, backend)``):

- ``"fds_accumulate"``: ``impl(features3, bins, num_bins, full) -> (count [nb], mean [nb, C], m2)``, all
  float64; per-bin statistics of this batch, centred: ``mean`` = batch mean of the bin, ``m2`` =
  ``sum (z - mean)(z - mean)^T`` ``[nb, C, C]`` (``full``) or its diagonal ``[nb, C]``. Empty bins: 0.
  Not differentiable (the FDS module calls it under ``no_grad`` with detached features).
- ``"fds_recolor"``: ``impl(features3, bins, transform, shift) -> out [B, C, P]`` contiguous, a new tensor:
  ``out[b, :, p] = transform[k] @ z + shift[k]`` (diag: ``transform[k] * z + shift[k]``) with
  ``k = bins[b, p]``; ``out = z`` where ``k = -1``. Gradient ``dz = transform[k]^T @ g`` (identity where
  ``k = -1``), computed by the same op with the transform transposed and a zero shift; no gradient into
  ``transform``/``shift`` (statistics). Features fp32/fp64 (half types: fp32 compute, output in the input
  dtype); ``transform``/``shift`` in the compute dtype.

Backends: ``torch`` (plain PyTorch, also the GPU fallback), ``cpp`` (ops ``imbreg_fast::fds_accumulate`` /
``imbreg_fast::fds_recolor``, csrc/cpu/fds_kernel.cpp) and ``triton`` (``imbreg_fast::triton_fds_*``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import lds
from .._dispatch import register
from .._validation import compute_dtype
from ._registration import FusedOp, register_fused_op

__all__ = ["as_pixels", "bin_index", "register_backends", "restore_layout"]

# --------------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------------


def as_pixels(features: torch.Tensor) -> torch.Tensor:
    """View features ``[N, C]`` or ``[B, C, H, W]`` as ``[B, C, P]`` (``[1, C, N]`` for rows), no copy
    unless H and W cannot be merged into one stride (then ``flatten`` copies once)."""
    if features.dim() == 2:
        return features.t().unsqueeze(0)
    if features.dim() == 4:
        return features.flatten(2)
    raise ValueError(f"features must be [N, C] or [B, C, H, W], got shape {tuple(features.shape)}")


def restore_layout(out3: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_pixels` for a ``[B, C, P]`` result: ``[N, C]`` (a transposed view of the
    contiguous ``[1, C, N]``) or ``[B, C, H, W]`` (a view)."""
    if like.dim() == 2:
        return out3[0].t()
    return out3.reshape(like.shape)


def bin_index(labels: torch.Tensor, edges: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bin of each label as :func:`imbreg_fast.lds.bin_index` (bin b is ``[e_b, e_{b+1})``; labels outside
    the range fall into the edge bins, as the reference clamps), with -1 where ``mask`` is False.
    ``labels`` (any shape, real) and ``mask`` (its shape, bool) -> int64 of the same shape."""
    k = lds.bin_index(labels, edges)
    if mask is not None:
        k = k.masked_fill(~mask, -1)
    return k


# --------------------------------------------------------------------------------------------------
# Fake kernels and the recolouring autograd, shared by the C++ and Triton ops.
# --------------------------------------------------------------------------------------------------


def _accumulate_fake(args):
    """Output metadata of ``fds_accumulate``: (count [nb], mean [nb, C], m2 [nb, C, C] or [nb, C]), fp64."""
    features, bins, num_bins = args.features, args.bins, args.num_bins
    torch._check(features.dim() == 3, lambda: "features must be [B, C, P]")
    torch._check(bins.dim() == 2, lambda: "bins must be [B, P]")
    c = features.shape[1]
    count = features.new_empty((num_bins,), dtype=torch.float64)
    mean = features.new_empty((num_bins, c), dtype=torch.float64)
    m2 = features.new_empty((num_bins, c, c) if args.full else (num_bins, c), dtype=torch.float64)
    return count, mean, m2


def _recolor_fake(args):
    """Output metadata of ``fds_recolor``: a contiguous ``[B, C, P]`` tensor of the features' dtype."""
    torch._check(args.features.dim() == 3, lambda: "features must be [B, C, P]")
    torch._check(args.bins.dim() == 2, lambda: "bins must be [B, P]")
    torch._check(args.transform.dim() in (2, 3), lambda: "transform must be [nb, C, C] or [nb, C]")
    return args.features.new_empty(args.features.shape)


def _transpose_transform(transform: torch.Tensor) -> torch.Tensor:
    return transform.mT.contiguous() if transform.dim() == 3 else transform


def _register_recolor(qualname: str) -> FusedOp:
    """Fake kernel and autograd of a recolouring op (``imbreg_fast::fds_recolor`` or its Triton twin).

    out = A_k z + s_k is linear in z with A_k, s_k constant (statistics), so
      d z = A_k^T g         (g where k = -1)
    which is the same op applied to g with the transposed transform and a zero shift. No gradient
    flows into transform or shift. The backward is the same linear op again, so it is differentiable
    (second derivatives are exact: zero).
    """
    op: FusedOp

    def setup_context(ctx, args, output):
        ctx.features_dtype = args.features.dtype
        return args.bins, args.transform

    def backward(ctx, saved, grad_out):
        if not ctx.needs_grad["features"]:
            return {}
        bins, transform = saved
        zero_shift = transform.new_zeros((transform.shape[0], transform.shape[1]))
        return {"features": op(grad_out.to(ctx.features_dtype), bins, _transpose_transform(transform), zero_shift)}

    op = register_fused_op(qualname, fake=_recolor_fake, setup_context=setup_context, backward=backward,
                           twice_differentiable=True)
    return op


# --------------------------------------------------------------------------------------------------
# torch backend: plain PyTorch ops, sync-free (no boolean indexing, no .item(), static shapes, so it also
# runs under torch.compile and on CUDA). The same plan as the C++ kernels: pixels sorted by bin (stable
# argsort), each bin's rows cut into chunks of _CHUNK rows laid out in a zero-padded [G, _CHUNK, C]
# buffer (G = N // _CHUNK + bins + 1 chunks at most, a static bound), then one batched matmul over the
# chunks with each chunk's bin matrix. No [N, C, C] tensor: memory O(N C + bins _CHUNK C + G C^2).
# --------------------------------------------------------------------------------------------------

_CHUNK = 256  # rows per chunk


def _rows_and_bins(features: torch.Tensor, bins: torch.Tensor, num_bins: int):
    """[B, C, P] -> rows [N, C] (copy) and bins [N] with skipped pixels sent to a spare bin num_bins."""
    c = features.shape[1]
    z = features.permute(0, 2, 1).reshape(-1, c)
    k = bins.reshape(-1)
    k = torch.where(k >= 0, k, torch.full_like(k, num_bins))
    return z, k


class _Chunks(NamedTuple):
    order: torch.Tensor        # [N] pixel of each sorted position
    slot: torch.Tensor         # [N] row of sorted position s in the padded [G * _CHUNK] buffer
    chunk_bin: torch.Tensor    # [G] bin of each chunk (the spare bin for unused chunks)
    num_chunks: int            # G


def _chunk_layout(k: torch.Tensor, groups: int) -> _Chunks:
    """Chunked sorted layout of rows with group ids k [N] in [0, groups)."""
    n = k.shape[0]
    order = torch.argsort(k, stable=True)
    ks = k[order]
    counts = torch.zeros(groups, dtype=torch.int64, device=k.device).index_add_(0, k, torch.ones_like(k))
    first_row = torch.cumsum(counts, 0) - counts
    chunks = (counts + _CHUNK - 1) // _CHUNK
    chunk_end = torch.cumsum(chunks, 0)
    rank = torch.arange(n, device=k.device) - first_row[ks]
    slot = (chunk_end[ks] - chunks[ks] + rank // _CHUNK) * _CHUNK + rank % _CHUNK
    num_chunks = n // _CHUNK + groups + 1                  # >= sum_b ceil(count_b / _CHUNK)
    chunk_bin = torch.bucketize(torch.arange(num_chunks, device=k.device), chunk_end, right=True)
    return _Chunks(order, slot, chunk_bin.clamp_(max=groups - 1), num_chunks)


def _padded(rows: torch.Tensor, layout: _Chunks) -> torch.Tensor:
    """[N, C] rows in pixel order -> [G, _CHUNK, C] sorted, zero-padded chunks."""
    buf = rows.new_zeros(layout.num_chunks * _CHUNK, rows.shape[1])
    buf.index_copy_(0, layout.slot, rows[layout.order])
    return buf.view(layout.num_chunks, _CHUNK, rows.shape[1])


def accumulate_torch(features, bins, num_bins, full):
    c = features.shape[1]
    z, k = _rows_and_bins(features, bins, num_bins)
    z = z.to(torch.float64)
    nb1 = num_bins + 1
    count = z.new_zeros(nb1).index_add_(0, k, z.new_ones(k.shape[0]))
    total = z.new_zeros(nb1, c).index_add_(0, k, z)
    mean = total / count.clamp(min=1.0).unsqueeze(1)
    centred = z - mean[k]                                                        # two-pass: no cancellation
    if full:
        layout = _chunk_layout(k, nb1)
        chunks = _padded(centred, layout)                                        # [G, _CHUNK, C]
        m2 = z.new_zeros(nb1, c, c).index_add_(0, layout.chunk_bin, torch.bmm(chunks.mT, chunks))
    else:
        m2 = z.new_zeros(nb1, c).index_add_(0, k, centred * centred)
    return count[:num_bins], mean[:num_bins], m2[:num_bins]


def _recolor_rows(z: torch.Tensor, k: torch.Tensor, transform: torch.Tensor, shift: torch.Tensor):
    """Rows z [N, C] (compute dtype), bins k [N] with -1 kept as identity -> [N, C]."""
    keep = (k >= 0).unsqueeze(1)
    num_bins = transform.shape[0]
    kc = torch.where(k >= 0, k, torch.full_like(k, num_bins))                   # skipped: spare bin
    if transform.dim() == 2:
        y = transform[kc.clamp(max=num_bins - 1)] * z + shift[kc.clamp(max=num_bins - 1)]
        return torch.where(keep, y, z)
    layout = _chunk_layout(kc, num_bins + 1)
    eye = torch.eye(z.shape[1], dtype=transform.dtype, device=transform.device).unsqueeze(0)
    matrices = torch.cat([transform, eye])[layout.chunk_bin]                    # [G, C, C]
    y_chunks = torch.bmm(_padded(z, layout), matrices.mT)                       # row z -> A_k z
    y_sorted = y_chunks.view(-1, z.shape[1])[layout.slot]
    y = torch.empty_like(z).index_copy_(0, layout.order, y_sorted)
    shift_ext = torch.cat([shift, shift.new_zeros(1, shift.shape[1])])
    return torch.where(keep, y + shift_ext[kc], z)


def _recolor_torch_nograd(features, bins, transform, shift):
    out_dtype = features.dtype
    b, c, p = features.shape
    dtype = compute_dtype(out_dtype)
    z = features.to(dtype).permute(0, 2, 1).reshape(-1, c)
    y = _recolor_rows(z, bins.reshape(-1), transform.to(dtype), shift.to(dtype))
    return y.reshape(b, p, c).permute(0, 2, 1).contiguous().to(out_dtype)


class _RecolorTorch(torch.autograd.Function):
    """Gradient as in :func:`_register_recolor`: the same computation with A^T and zero shift
    (autograd through the chunked products would keep the [G, C, C] gathered matrices alive)."""

    @staticmethod
    def forward(features, bins, transform, shift):
        return _recolor_torch_nograd(features, bins, transform, shift)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, bins, transform, _ = inputs
        ctx.save_for_backward(bins, transform)

    @staticmethod
    def backward(ctx, grad_out):
        bins, transform = ctx.saved_tensors
        zero_shift = transform.new_zeros((transform.shape[0], transform.shape[1]))
        return _RecolorTorch.apply(grad_out, bins, _transpose_transform(transform), zero_shift), None, None, None


def recolor_torch(features, bins, transform, shift):
    return _RecolorTorch.apply(features, bins, transform.detach(), shift.detach())


# --------------------------------------------------------------------------------------------------
# Fused backends (cpp, triton)
# --------------------------------------------------------------------------------------------------


def _fused_impls(accumulate_op, recolor_op) -> dict:
    """The public ops on one backend's fused ops: no gradient into the statistics, transforms contiguous."""

    def accumulate(features, bins, num_bins, full):
        return accumulate_op(features.detach(), bins, num_bins, full)

    def recolor(features, bins, transform, shift):
        return recolor_op(features, bins, transform.detach().contiguous(), shift.detach().contiguous())

    return {"fds_accumulate": accumulate, "fds_recolor": recolor}


@torch.library.custom_op("imbreg_fast::triton_fds_accumulate", mutates_args=())
def triton_fds_accumulate(features: torch.Tensor, bins: torch.Tensor, num_bins: int,
                          full: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin centred statistics ``(count [nb], mean [nb, C], m2 [nb, C, C] or [nb, C])``, float64."""
    from ..triton_kernels import fds as kernels

    return kernels.fds_accumulate(features, bins, num_bins, full)


@torch.library.custom_op("imbreg_fast::triton_fds_recolor", mutates_args=())
def triton_fds_recolor(features: torch.Tensor, bins: torch.Tensor, transform: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
    """``out[b, :, p] = transform[k] @ z + shift[k]`` (diag: ``transform[k] * z + shift[k]``), ``out = z``
    where ``k = bins[b, p] = -1``; a new contiguous ``[B, C, P]`` tensor."""
    from ..triton_kernels import fds as kernels

    return kernels.fds_recolor(features, bins, transform, shift)


def register_backends(cpp: bool) -> None:
    """Register the family's backends with the dispatcher: torch, then cpp (when the extension is
    loaded), then triton."""
    register("fds_accumulate", "torch")(accumulate_torch)
    register("fds_recolor", "torch")(recolor_torch)
    backends = [("triton", "imbreg_fast::triton_fds_accumulate", "imbreg_fast::triton_fds_recolor")]
    if cpp:
        backends.insert(0, ("cpp", "imbreg_fast::fds_accumulate", "imbreg_fast::fds_recolor"))
    for backend, accumulate_name, recolor_name in backends:
        impls = _fused_impls(register_fused_op(accumulate_name, fake=_accumulate_fake),
                             _register_recolor(recolor_name))
        for op, impl in impls.items():
            register(op, backend)(impl)
