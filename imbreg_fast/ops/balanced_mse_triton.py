"""Triton backend of the Balanced MSE family (BMC, GAI, BNI).

Registers the ops ``imbreg_fast::triton_bmc_fwd`` and ``imbreg_fast::triton_mixture_nll_fwd``, with the
argument lists and output contract of the C++ ops ``bmc_fwd`` / ``mixture_nll_fwd`` (csrc/balanced_mse.cpp),
their fake kernels and autograd (shared with the C++ ops, see ``ops/balanced_mse.py``), and the ``triton``
implementations of ``bmc_loss``, ``gai_loss`` and ``bni_loss``.

The ops are opaque ``torch.library.custom_op``s around the host launchers: this form runs eagerly, under
``torch.compile(fullgraph=True)`` and ``opcheck``, on CUDA and on CPU tensors under TRITON_INTERPRET=1
(a ``triton_op`` + ``wrap_triton`` op lets Inductor see the kernels, but fails under torch.compile with
the interpreter's CPU tensors). Importing this module does not import triton: the kernel module is
imported on the first call.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import register
from .._validation import compute_dtype
from .balanced_mse import (BMC_ARGS, MIXTURE_ARGS, bni_tables, call_bmc_op, call_mixture_op, fused_loss_fake,
                           gai_tables, register_fused_autograd)

MAX_DIM = 4  # = imbreg_fast.triton_kernels.balanced_mse.MAX_DIM (not imported here: it imports triton)


def _kernels():
    from ..triton_kernels import balanced_mse
    return balanced_mse


@torch.library.custom_op("imbreg_fast::triton_bmc_fwd", mutates_args=())
def triton_bmc_fwd(pred: torch.Tensor, target: torch.Tensor, candidates: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], noise_var: torch.Tensor, reduction: int,
                   compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton BMC: (loss, d loss/d pred, d loss/d sigma^2); see ``imbreg_fast::bmc_fwd``."""
    return _kernels().bmc_fwd(pred, target, candidates, mask, noise_var, reduction, compute_grad)


@triton_bmc_fwd.register_fake
def _triton_bmc_fake(pred, target, candidates, mask, noise_var, reduction, compute_grad):
    return fused_loss_fake(pred, noise_var, reduction, compute_grad)


@torch.library.custom_op("imbreg_fast::triton_mixture_nll_fwd", mutates_args=())
def triton_mixture_nll_fwd(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                           noise_var: torch.Tensor, log_weight: torch.Tensor, means: torch.Tensor,
                           precision: torch.Tensor, grad_var_bias: torch.Tensor, log_noise_coef: float,
                           reduction: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GAI/BNI mixture NLL: (loss, d loss/d pred, d loss/d sigma^2); see ``imbreg_fast::mixture_nll_fwd``."""
    return _kernels().mixture_nll_fwd(pred, target, mask, noise_var, log_weight, means, precision, grad_var_bias,
                                      log_noise_coef, reduction, compute_grad)


@triton_mixture_nll_fwd.register_fake
def _triton_mixture_fake(pred, target, mask, noise_var, log_weight, means, precision, grad_var_bias,
                         log_noise_coef, reduction, compute_grad):
    return fused_loss_fake(pred, noise_var, reduction, compute_grad)


register_fused_autograd("imbreg_fast::triton_bmc_fwd", **BMC_ARGS)
register_fused_autograd("imbreg_fast::triton_mixture_nll_fwd", **MIXTURE_ARGS)


def _supports(pred: torch.Tensor) -> str | None:
    if pred.shape[1] > MAX_DIM:
        return f"the Triton kernels support targets of dimension d <= {MAX_DIM}, got d = {pred.shape[1]}"
    return None


@register("bmc_loss", "triton", supports=_supports)
def bmc_triton(pred, target, candidates, mask, noise_var, reduction):
    return call_bmc_op(torch.ops.imbreg_fast.triton_bmc_fwd, pred, target, candidates, mask, noise_var, reduction)


def mixture_triton(pred, target, mask, noise_var, tables, reduction):
    return call_mixture_op(torch.ops.imbreg_fast.triton_mixture_nll_fwd, pred, target, mask, noise_var, tables,
                           reduction)


@register("gai_loss", "triton", supports=_supports)
def gai_triton(pred, target, mask, noise_var, weights, means, covariances, reduction):
    tables = gai_tables(noise_var, weights, means, covariances, compute_dtype(pred.dtype))
    return mixture_triton(pred, target, mask, noise_var, tables, reduction)


@register("bni_loss", "triton", supports=_supports)
def bni_triton(pred, target, mask, noise_var, bin_centers, bin_weights, reduction):
    tables = bni_tables(noise_var, bin_centers, bin_weights, compute_dtype(pred.dtype))
    return mixture_triton(pred, target, mask, noise_var, tables, reduction)
