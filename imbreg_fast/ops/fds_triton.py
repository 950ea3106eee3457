"""Triton backend of the FDS ops (methods.md §3): ``imbreg_fast::triton_fds_accumulate`` and
``imbreg_fast::triton_fds_recolor``, registered as opaque ``torch.library.custom_op`` s around the
launchers of ``imbreg_fast.triton_kernels.fds`` (imported lazily: importing this module never imports
triton). Fake kernels and the recolouring autograd are the shared ones of :mod:`imbreg_fast.ops.fds`;
the op contract (layout, dtypes, semantics) is documented there.
"""
from __future__ import annotations

import torch

from .fds import accumulate_fake, recolor_fake, register_fused_backend, register_recolor_autograd

__all__ = ["triton_fds_accumulate", "triton_fds_recolor"]


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


triton_fds_accumulate.register_fake(accumulate_fake)
triton_fds_recolor.register_fake(recolor_fake)
register_recolor_autograd("imbreg_fast::triton_fds_recolor")


register_fused_backend("triton", torch.ops.imbreg_fast.triton_fds_accumulate, torch.ops.imbreg_fast.triton_fds_recolor)
