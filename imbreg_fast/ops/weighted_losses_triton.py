"""Triton backend of the weighted regression losses (MSE, L1, Huber, Focal-R).

Registers the op ``imbreg_fast::triton_weighted_regression_fwd`` with the argument list and output contract
of the C++ op ``imbreg_fast::weighted_regression_fwd`` (csrc/weighted_losses.cpp), its fake kernel and
autograd (shared with the C++ op, see ``ops/weighted_losses.py``), and the ``triton`` implementation of
the public op. An opaque ``torch.library.custom_op`` around the host launcher: it runs eagerly, under
``torch.compile(fullgraph=True)`` and ``opcheck``, on CUDA and on CPU tensors under TRITON_INTERPRET=1.
Importing this module does not import triton: the kernel module is imported on the first call.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import register
from .weighted_losses import OP, compute_grad_flag, fused_fake, register_fused_autograd


def _kernels():
    from ..triton_kernels import weighted_losses
    return weighted_losses


@torch.library.custom_op("imbreg_fast::triton_weighted_regression_fwd", mutates_args=())
def triton_weighted_regression_fwd(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                                   mask: Optional[torch.Tensor], loss: int, beta: float, gamma: float,
                                   activation: int, reduction: int,
                                   compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton weighted regression loss: (loss, d loss/d pred); see ``imbreg_fast::weighted_regression_fwd``."""
    return _kernels().weighted_regression_fwd(pred, target, weight, mask, loss, beta, gamma, activation, reduction,
                                              compute_grad)


triton_weighted_regression_fwd.register_fake(fused_fake)
register_fused_autograd("imbreg_fast::triton_weighted_regression_fwd")


@register(OP, "triton")
def weighted_regression_triton(pred, target, weight, mask, kind, beta, gamma, activation, reduction):
    grad = compute_grad_flag(pred, target)
    w = None if weight is None else weight.contiguous()
    m = None if mask is None else mask.contiguous()
    return torch.ops.imbreg_fast.triton_weighted_regression_fwd(pred.contiguous(), target.contiguous(), w, m, kind,
                                                                float(beta), float(gamma), activation, reduction,
                                                                grad)[0]
