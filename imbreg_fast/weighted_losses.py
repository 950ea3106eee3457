"""Weighted regression losses of DIR (methods.md §2; reference: YyzHarry/imbalanced-regression ``loss.py``).

Re-exported by :mod:`imbreg_fast.functional`. Common arguments:

- ``pred``, ``target``: same shape (any: ``[N]``, ``[N, 1]``, dense ``[B, 1, H, W]``, ...) and floating dtype;
  the loss is element-wise, e = pred - target.
- ``weight``: per-element weights (e.g. from :class:`imbreg_fast.lds.LabelWeights`), any shape that
  ``expand_as(target)`` accepts (``[B, 1]`` for ``[B, 1]`` targets, ``[B, 1, 1, 1]`` or ``[B, 1, H, W]`` for dense
  maps), >= 0; None means all ones. Weights are constants: they are detached, no gradient flows into them
  (the reference reads them from the data loader).
- ``mask``: optional bool tensor of the target's shape; dropped elements contribute nothing (NaN holes
  allowed there).
- ``reduction``: ``'mean'`` (default, as the reference: sum of w·l over the kept elements divided by their
  count — ``torch.mean(w * l)`` without a mask), ``'weighted_mean'`` (sum w·l / sum w over the kept elements,
  the convention of torch's own weighted losses; 0 when the weights sum to 0), ``'sum'``, ``'none'``
  (w·l per element, target's shape, 0 on dropped elements). With no kept element 'mean' is 0, never NaN.
- ``backend``: ``'auto'`` | ``'torch'`` | ``'cpp'`` | ``'triton'`` (:mod:`imbreg_fast._dispatch`). The fused
  backends compute d loss / d pred in the forward pass; the target may require grad too (its gradient
  is -d loss / d pred).
- ``check_finite``: validate values (pred/target finite, weight finite and >= 0 at kept elements); a device
  sync; skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import math

import torch

from . import _validation as V
from ._dispatch import resolve
from .ops import weighted_losses as _ops
from .ops import weighted_losses_triton as _ops_triton  # noqa: F401  (registers the triton backend)

__all__ = ["weighted_mse_loss", "weighted_l1_loss", "weighted_huber_loss", "weighted_focal_mse_loss",
           "weighted_focal_l1_loss"]


def _check_reduction(reduction) -> int:
    if reduction not in _ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(_ops.REDUCTIONS)}, got {reduction!r}")
    return _ops.REDUCTIONS[reduction]


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    return gamma


def _check_activation(activation) -> int:
    if activation not in _ops.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ops.ACTIVATIONS)}, got {activation!r}")
    return _ops.ACTIVATIONS[activation]


def _as_weight(weight, target: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    V.check_float_tensor("weight", weight)
    if weight.device != target.device:
        raise ValueError(f"weight is on {weight.device} but target is on {target.device}")
    try:
        ok = weight.dim() <= target.dim() and torch.broadcast_shapes(weight.shape, target.shape) == target.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"weight of shape {tuple(weight.shape)} cannot be expanded to the target's shape "
                         f"{tuple(target.shape)} (weight.expand_as(target) must work)")
    return weight.detach().to(V.compute_dtype(target.dtype)).expand_as(target).reshape(-1)


def _check_values(p, y, w, m) -> None:
    """pred/target finite and weight finite and >= 0 at kept elements; one host sync when they are.

    Fast path: the sums of pred, target and weight are finite and min(weight) >= 0 (a NaN/inf anywhere
    makes a sum non-finite; NaN fails the comparison). Otherwise (a bad value, a masked-out hole, or a
    sum overflowing) the exact element-wise checks decide and name the argument.
    """
    if p.numel() == 0:
        return
    acc = V.compute_dtype(p.dtype)
    sums = [p.sum(dtype=acc), y.sum(dtype=acc)] + ([] if w is None else [w.sum(dtype=acc)])
    ok = torch.isfinite(torch.stack(sums)).all()
    if w is not None:
        ok = ok & (w.min() >= 0)
    if bool(ok):
        return
    V.check_all_finite("pred", p, m)
    V.check_all_finite("target", y, m)
    if w is not None:
        V.check_all_finite("weight", w, m)
        negative = w < 0 if m is None else (w < 0) & m
        if bool(negative.any()):
            raise ValueError("weight must be >= 0" + (" at kept elements" if m is not None else ""))


def _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, kind, beta=1.0, gamma=1.0,
                   activation=0):
    pred = V.check_float_tensor("pred", pred)
    target = V.check_float_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(pred.shape)} and "
                         f"target {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    V.check_same_device(pred=pred, target=target)
    red = _check_reduction(reduction)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != target.shape:
            raise ValueError(f"mask must have the target's shape {tuple(target.shape)}, got {tuple(mask.shape)}")
        V.check_same_device(target=target, mask=mask)
    shape = pred.shape
    w = _as_weight(weight, target)
    p, y = pred.reshape(-1), target.reshape(-1)
    m = None if mask is None else mask.reshape(-1)
    if check_finite and not V.is_tracing():
        _check_values(p, y, w, m)
    _, impl = resolve(_ops.OP, p, backend)
    loss = impl(p, y, w, m, kind, beta, gamma, activation, red)
    return loss.reshape(shape) if red == _ops.NONE else loss


def weighted_mse_loss(pred, target, weight=None, *, mask=None, reduction="mean", backend="auto",
                      check_finite=True):
    """Weighted MSE: element loss ``w (pred - target)^2`` (reference ``weighted_mse_loss``).

    See :mod:`imbreg_fast.weighted_losses` for the common arguments.
    """
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _ops.MSE)


def weighted_l1_loss(pred, target, weight=None, *, mask=None, reduction="mean", backend="auto", check_finite=True):
    """Weighted L1: element loss ``w |pred - target|`` (reference ``weighted_l1_loss``); its gradient is
    sign(e), 0 at e = 0."""
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _ops.L1)


def weighted_huber_loss(pred, target, weight=None, *, beta=1.0, mask=None, reduction="mean", backend="auto",
                        check_finite=True):
    """Weighted Huber (reference ``weighted_huber_loss``): with a = |pred - target|, element loss
    ``w a^2 / (2 beta)`` if a < beta else ``w (a - beta / 2)`` (torch's smooth-L1 form); ``beta`` > 0, default 1.
    """
    beta = _check_positive("beta", beta)
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _ops.HUBER, beta=beta)


def weighted_focal_mse_loss(pred, target, weight=None, *, activation="sigmoid", beta=0.2, gamma=1.0, mask=None,
                            reduction="mean", backend="auto", check_finite=True):
    """Weighted Focal-R MSE (reference ``weighted_focal_mse_loss``): element loss ``w e^2 f(|e|)`` with
    ``f(a) = (2 sigmoid(beta a) - 1)^gamma`` (``activation='sigmoid'``, default) or ``tanh(beta a)^gamma``
    (``'tanh'``); ``beta`` > 0 (default 0.2), ``gamma`` >= 0 (default 1). The gradient includes the
    factor's own dependence on e (exactly, as autograd through the reference).
    """
    beta, gamma, act = _check_positive("beta", beta), _check_gamma(gamma), _check_activation(activation)
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _ops.FOCAL_MSE, beta=beta,
                          gamma=gamma, activation=act)


def weighted_focal_l1_loss(pred, target, weight=None, *, activation="sigmoid", beta=0.2, gamma=1.0, mask=None,
                           reduction="mean", backend="auto", check_finite=True):
    """Weighted Focal-R L1 (reference ``weighted_focal_l1_loss``): element loss ``w |e| f(|e|)``, with the
    focal factor ``f`` of :func:`weighted_focal_mse_loss`.
    """
    beta, gamma, act = _check_positive("beta", beta), _check_gamma(gamma), _check_activation(activation)
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _ops.FOCAL_L1, beta=beta,
                          gamma=gamma, activation=act)
