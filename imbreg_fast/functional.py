"""Functional API of imbreg_fast (torch-style: ``imbreg_fast.functional.bmc_loss(pred, target, ...)``).

Common arguments of the Balanced MSE losses (methods.md §1):

- ``pred``, ``target``: ``[N]``, ``[N, d]`` or dense ``[B, 1, H, W]``, same shape and floating dtype.
- ``noise_var``: sigma^2 > 0, a float or a scalar tensor (differentiable: pass ``sigma ** 2`` of a
  learnable sigma, as :class:`imbreg_fast.nn.BMCLoss` does).
- ``mask``: optional bool tensor of the target's shape (per row, ``[N]``, for ``[N, d]``); dropped rows
  contribute nothing (BMC also drops them from the candidates).
- ``reduction``: ``'mean'`` over kept rows (0.0 when no row is kept, never NaN), ``'sum'``, or ``'none'``
  (the input's row shape, 0 on dropped rows).
- ``backend``: ``'auto'`` | ``'torch'`` | ``'cpp'`` | ``'triton'`` (see :mod:`imbreg_fast._dispatch`).
- ``check_finite``: validate values (no NaN/inf in pred/target at kept rows, sigma^2 > 0 and finite,
  GMM/bin parameters well formed). This reads tensor values (a device sync); pass ``False`` in a hot GPU
  loop once inputs are known good. Skipped while ``torch.compile`` traces.

Each loss is multiplied by ``sg(2 sigma^2)`` as in the reference, so it has the scale of the MSE.
"""
from __future__ import annotations

import torch

from . import _validation as V
from ._dispatch import resolve
from .ops import balanced_mse as _bmse  # noqa: F401  (registers the backends)
from .ops import balanced_mse_triton as _bmse_triton  # noqa: F401  (registers the triton backend)

__all__ = ["bmc_loss", "gai_loss", "bni_loss", "weighted_mse_loss", "weighted_l1_loss", "weighted_huber_loss",
           "weighted_focal_mse_loss", "weighted_focal_l1_loss"]


def _prepare(pred, target, noise_var, mask, reduction, check_finite):
    rows = V.as_rows(pred, target, mask)
    red = V.check_reduction(reduction)
    nv = V.noise_var_tensor(noise_var, rows.pred)
    check_values = check_finite and not V.is_tracing()
    if check_values:
        V.check_noise_var_value(nv)
        V.check_all_finite("pred", rows.pred, rows.mask)
        V.check_all_finite("target", rows.target, rows.mask)
    return rows, red, nv, check_values


def _finish(loss: torch.Tensor, rows: V.Rows, reduction: int) -> torch.Tensor:
    return loss.reshape(rows.loss_shape) if reduction == 0 else loss


def bmc_loss(pred, target, noise_var, *, candidates=None, mask=None, reduction="mean", backend="auto",
             check_finite=True):
    """Balanced MSE, batch Monte Carlo (BMC).

    Row i's loss is ``2 sigma^2 * cross_entropy(l_i., positive)`` with logits
    ``l_ij = -|pred_i - y_j|^2 / (2 sigma^2)`` over its candidate set: the kept targets of the batch
    (default; the positive is its own target), or ``{target_i} U candidates`` when ``candidates`` is given
    (``[M, d]``, or ``[M]`` for d = 1: e.g. M pixels sampled from a dense batch, or targets gathered from
    all ranks). The fused backends stream over the candidates (online softmax): O(N + M) memory, and the
    backward pass is O(N). With one row the loss is 0. The target is not differentiated.
    """
    rows, red, nv, check_values = _prepare(pred, target, noise_var, mask, reduction, check_finite)
    if candidates is not None:
        candidates = V.check_float_tensor("candidates", candidates)
        d = rows.pred.shape[1]
        if candidates.dim() == 1 and d == 1:
            candidates = candidates.reshape(-1, 1)
        if candidates.dim() != 2 or candidates.shape[1] != d:
            raise ValueError(f"candidates must be [M, {d}]" + (" or [M]" if d == 1 else "")
                             + f" for targets of dimension {d}, got shape {tuple(candidates.shape)}")
        if candidates.dtype != rows.pred.dtype:
            raise TypeError(f"candidates must have pred's dtype {rows.pred.dtype}, got {candidates.dtype}")
        V.check_same_device(pred=rows.pred, candidates=candidates)
        if check_values:
            V.check_all_finite("candidates", candidates)
    _, impl = resolve("bmc_loss", rows.pred, backend)
    return _finish(impl(rows.pred, rows.target, candidates, rows.mask, nv, red), rows, red)


def _as_gmm(gmm, d: int, ref: torch.Tensor, check_values: bool):
    try:
        weights, means, covariances = gmm
    except (TypeError, ValueError):
        raise TypeError("gmm must be (weights [K], means [K, d], covariances [K, d, d]), e.g. the result of "
                        f"imbreg_fast.fit_gmm; got {type(gmm).__name__}") from None
    for name, x in (("gmm weights", weights), ("gmm means", means), ("gmm covariances", covariances)):
        V.check_float_tensor(name, x)
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but pred is on {ref.device}")
    k = weights.shape[0] if weights.dim() == 1 else -1
    if k < 1:
        raise ValueError(f"gmm weights must be [K] with K >= 1, got shape {tuple(weights.shape)}")
    if d == 1 and means.shape == (k,):
        means = means.reshape(k, 1)
    if d == 1 and covariances.shape in ((k,), (k, 1)):
        covariances = covariances.reshape(k, 1, 1)
    if means.shape != (k, d):
        raise ValueError(f"gmm means must be [K, d] = [{k}, {d}], got {tuple(means.shape)}")
    if covariances.shape != (k, d, d):
        raise ValueError(f"gmm covariances must be [K, d, d] = [{k}, {d}, {d}], got {tuple(covariances.shape)}")
    weights, means, covariances = weights.detach(), means.detach(), covariances.detach()
    if check_values:
        _check_weights("gmm weights", weights)
        if not bool(torch.isfinite(means).all()):
            raise ValueError("gmm means contain NaN or inf")
        cov64 = covariances.double()
        if not bool(torch.isfinite(cov64).all()) or not torch.allclose(cov64, cov64.mT, rtol=1e-5, atol=1e-8):
            raise ValueError("gmm covariances must be finite and symmetric")
        _, info = torch.linalg.cholesky_ex(cov64)
        if bool((info != 0).any()):
            bad = int(torch.nonzero(info)[0])
            raise ValueError(f"gmm covariances must be symmetric positive definite; component {bad} is not")
    return weights, means, covariances


def _check_weights(name: str, w: torch.Tensor) -> None:
    w64 = w.double()
    if not bool(torch.isfinite(w64).all()) or bool((w64 <= 0).any()):
        raise ValueError(f"{name} must be finite and > 0 (drop empty components/bins)")
    total = float(w64.sum())
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"{name} must sum to 1, got {total:.6g}; normalise them (w / w.sum())")


def gai_loss(pred, target, noise_var, gmm, *, mask=None, reduction="mean", backend="auto", check_finite=True):
    """Balanced MSE, GMM-based analytic integration (GAI).

    ``gmm = (weights [K], means [K, d], covariances [K, d, d])`` is the training-label prior (see
    :func:`imbreg_fast.fit_gmm`; for d = 1 means ``[K]`` and variances ``[K]`` are accepted too). It is a
    constant: no gradient flows into it. Row loss (d = 1):
    ``2 sigma^2 [ (p-y)^2/(2 sigma^2) + 1/2 log sigma^2 + LSE_k(log phi_k - 1/2 log(v_k+sigma^2) - (p-mu_k)^2/(2(v_k+sigma^2))) ]``,
    and the multivariate-normal form for d > 1. Fused backends: one pass over the rows, K components per
    row, no [N, K] temporaries, fp32 accumulation for half inputs.
    """
    rows, red, nv, check_values = _prepare(pred, target, noise_var, mask, reduction, check_finite)
    weights, means, covariances = _as_gmm(gmm, rows.pred.shape[1], rows.pred, check_values)
    _, impl = resolve("gai_loss", rows.pred, backend)
    return _finish(impl(rows.pred, rows.target, rows.mask, nv, weights, means, covariances, red), rows, red)


def bni_loss(pred, target, noise_var, bin_centers, bin_weights, *, mask=None, reduction="mean",
             backend="auto", check_finite=True):
    """Balanced MSE, bin-based numerical integration (BNI).

    ``bin_centers`` ``[K]`` (d = 1) or ``[K, d]`` and ``bin_weights`` ``[K]`` (> 0, summing to 1: the training
    label histogram with empty bins dropped, see :func:`imbreg_fast.bin_prior`). Row loss:
    ``2 sigma^2 [ |p-y|^2/(2 sigma^2) + LSE_k(log phi_k - |p-c_k|^2/(2 sigma^2)) ]`` (can be negative, as
    in the reference).
    """
    rows, red, nv, check_values = _prepare(pred, target, noise_var, mask, reduction, check_finite)
    d = rows.pred.shape[1]
    V.check_float_tensor("bin_centers", bin_centers)
    V.check_float_tensor("bin_weights", bin_weights)
    V.check_same_device(pred=rows.pred, bin_centers=bin_centers, bin_weights=bin_weights)
    if bin_weights.dim() != 1 or bin_weights.shape[0] < 1:
        raise ValueError(f"bin_weights must be [K] with K >= 1, got shape {tuple(bin_weights.shape)}")
    k = bin_weights.shape[0]
    if d == 1 and bin_centers.shape == (k,):
        bin_centers = bin_centers.reshape(k, 1)
    if bin_centers.shape != (k, d):
        raise ValueError(f"bin_centers must be [K, d] = [{k}, {d}]" + (" or [K]" if d == 1 else "")
                         + f", got {tuple(bin_centers.shape)}")
    bin_centers, bin_weights = bin_centers.detach(), bin_weights.detach()
    if check_values:
        _check_weights("bin_weights", bin_weights)
        if not bool(torch.isfinite(bin_centers).all()):
            raise ValueError("bin_centers contain NaN or inf")
    _, impl = resolve("bni_loss", rows.pred, backend)
    return _finish(impl(rows.pred, rows.target, rows.mask, nv, bin_centers, bin_weights, red), rows, red)


from .weighted_losses import (weighted_focal_l1_loss, weighted_focal_mse_loss, weighted_huber_loss,  # noqa: E402,F401
                              weighted_l1_loss, weighted_mse_loss)
