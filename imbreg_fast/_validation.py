"""Argument checks shared by every public op: clear ``TypeError``/``ValueError`` naming the argument.

Value checks (finiteness, positivity, normalisation) read tensor values and so synchronise with the
device; they run when ``check_finite=True`` (the default of every public entry point) and are skipped
while ``torch.compile`` traces (they would break the graph). Shape, dtype and device checks are free and
always run.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def is_tracing() -> bool:
    return torch.compiler.is_compiling()


def check_reduction(reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def check_float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to the same device")


def check_all_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise if ``x`` (restricted to rows kept by ``mask`` [N] when given, x being [N, ...]) has NaN/inf."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad.reshape(mask.shape[0], -1) & mask.reshape(-1, 1)
    if bool(bad.any()):
        raise ValueError(f"{name} contains NaN or inf" + (" at kept positions" if mask is not None else "")
                         + " (pass check_finite=False to skip this check)")


def check_labels_finite(labels: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise if floating ``labels`` hold NaN/inf where ``mask`` (the labels' shape) keeps them."""
    if not labels.is_floating_point():
        return
    bad = ~torch.isfinite(labels)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        raise ValueError("labels contain NaN or inf" + (" at kept positions" if mask is not None else "")
                         + " (mask them out, or pass check_finite=False)")


class Rows(NamedTuple):
    """pred/target flattened to rows: [N, d] tensors, mask [N] (bool) or None, and the shape of the
    'none'-reduced loss."""
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor | None
    loss_shape: tuple


def as_rows(pred, target, mask=None) -> Rows:
    """Validate pred/target/mask and view them as rows.

    Accepted layouts: [N] (d = 1), [N, d], dense [B, 1, H, W] (N = B*H*W pixels, d = 1). The mask has
    the target's shape, except for [N, d] targets where it is per row, [N].
    """
    pred = check_float_tensor("pred", pred)
    target = check_float_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                         f"and target {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    check_same_device(pred=pred, target=target)
    if pred.dim() == 1:
        n, d, row_shape = pred.shape[0], 1, tuple(pred.shape)
    elif pred.dim() == 2:
        n, d, row_shape = pred.shape[0], pred.shape[1], (pred.shape[0],)
    elif pred.dim() == 4 and pred.shape[1] == 1:
        n, d, row_shape = pred.numel(), 1, tuple(pred.shape)
    else:
        raise ValueError("pred must be [N], [N, d] or dense [B, 1, H, W], got shape "
                         f"{tuple(pred.shape)}")
    if d < 1:
        raise ValueError(f"pred must have a target dimension d >= 1, got shape {tuple(pred.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        check_same_device(pred=pred, mask=mask)
        if tuple(mask.shape) != row_shape:
            raise ValueError(f"mask must have shape {row_shape} for pred/target of shape "
                             f"{tuple(pred.shape)}, got {tuple(mask.shape)}")
        mask = mask.reshape(n)
    return Rows(pred.reshape(n, d), target.reshape(n, d), mask, row_shape)


def noise_var_tensor(noise_var, ref: torch.Tensor) -> torch.Tensor:
    """noise_var as a 0-dim floating tensor on ref's device (a Python number becomes ref's dtype,
    fp32 for half types)."""
    if isinstance(noise_var, torch.Tensor):
        if not noise_var.is_floating_point():
            raise TypeError(f"noise_var must have a floating dtype, got {noise_var.dtype}")
        if noise_var.numel() != 1:
            raise ValueError(f"noise_var must be a scalar (one element), got shape {tuple(noise_var.shape)}")
        if noise_var.device != ref.device:
            raise ValueError(f"noise_var is on {noise_var.device} but pred is on {ref.device}")
        return noise_var.reshape(())
    if isinstance(noise_var, bool) or not isinstance(noise_var, (int, float)):
        raise TypeError(f"noise_var must be a float or a scalar tensor, got {type(noise_var).__name__}")
    dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.tensor(float(noise_var), dtype=dtype, device=ref.device)


def check_noise_var_value(noise_var: torch.Tensor) -> None:
    v = noise_var.detach()
    if not bool(torch.isfinite(v)) or not bool(v > 0):
        raise ValueError(f"noise_var must be finite and > 0, got {float(v)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in the input dtype, with fp32 for half types."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
