"""Functional API of imbreg_fast, torch-style: ``imbreg_fast.functional.bmc_loss(pred, target, ...)``.

Balanced MSE (docs/methods.md §1): :func:`bmc_loss`, :func:`gai_loss`, :func:`bni_loss`. Common arguments:

- ``pred``, ``target``: ``[N]``, ``[N, d]`` or dense ``[B, 1, H, W]``, same shape and floating dtype. The
  target (and BMC's ``candidates``) are data, never differentiated: one that requires grad raises
  ``ValueError`` on every backend (detach it).
- ``noise_var``: sigma^2 > 0, a float or a scalar tensor (differentiable: pass ``sigma ** 2`` of a
  learnable sigma, as :class:`imbreg_fast.nn.BMCLoss` does).
- ``mask``: optional bool tensor of the target's shape (per row, ``[N]``, for ``[N, d]``); dropped rows
  contribute nothing (BMC also drops them from the candidates).
- ``reduction``: ``'mean'`` over kept rows (0.0 when no row is kept, never NaN), ``'sum'``, or ``'none'``
  (the input's row shape, 0 on dropped rows).

Weighted regression losses (LDS re-weighting, Focal-R; docs/methods.md §2): :func:`weighted_mse_loss`,
:func:`weighted_l1_loss`, :func:`weighted_huber_loss`, :func:`weighted_focal_mse_loss`,
:func:`weighted_focal_l1_loss`. Common arguments:

- ``pred``, ``target``: same shape (any: ``[N]``, ``[N, 1]``, dense ``[B, 1, H, W]``, ...) and floating dtype;
  the loss is element-wise, e = pred - target. The target may require grad: it gets -d loss / d pred, on
  every backend.
- ``weight``: per-element weights (e.g. from :class:`imbreg_fast.lds.LabelWeights`), any shape that
  ``expand_as(target)`` accepts (``[B, 1]`` for ``[B, 1]`` targets, ``[B, 1, 1, 1]`` or ``[B, 1, H, W]`` for
  dense maps), >= 0; None means all ones. Weights are constants: detached, no gradient flows into them.
- ``mask``: optional bool tensor of the target's shape; dropped elements contribute nothing (NaN holes
  allowed there).
- ``reduction``: ``'mean'`` (default, as the reference: sum of w·l over the kept elements divided by their
  count — ``torch.mean(w * l)`` without a mask), ``'weighted_mean'`` (sum w·l / sum w over the kept elements,
  the convention of torch's own weighted losses; 0 when the weights sum to 0), ``'sum'``, ``'none'``
  (w·l per element, target's shape, 0 on dropped elements). With no kept element 'mean' is 0, never NaN.

Every op also takes:

- ``backend``: ``'auto'`` | ``'torch'`` | ``'cpp'`` | ``'triton'`` (the one rule: :mod:`imbreg_fast._dispatch`).
- ``check_finite``: validate values (no NaN/inf in the inputs at kept positions, sigma^2 > 0, weights >= 0,
  GMM/bin parameters well formed). On the fused backends the per-element checks run inside the kernels' own
  pass (no extra pass over the inputs); on CUDA they raise asynchronously (a device-side assert, no host
  sync; docs/methods.md §1.8). The torch backend checks explicitly (a device sync). Pass ``False`` under
  ``torch.vmap``. Skipped while ``torch.compile`` traces.

The fused backends (cpp, triton) compute the gradient in the forward pass, so they support first
derivatives only: differentiating a gradient of these losses (``create_graph=True``, a gradient penalty,
nested ``torch.func.grad``) raises ``RuntimeError`` — use ``backend='torch'`` for that. ``torch.func``
transforms (``grad``, ``vmap`` with ``check_finite=False``, ``jacrev``) work on every backend.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from . import _reduction
from . import _validation as V
from . import distributed as D
from ._dispatch import resolve
from .ops import weighted_losses as _wl   # importing imbreg_fast.ops registers every backend
from .ops import rnc as _rnc
from .ops import ranksim as _rs

__all__ = ["bmc_loss", "gai_loss", "bni_loss", "weighted_mse_loss", "weighted_l1_loss", "weighted_huber_loss",
           "weighted_focal_mse_loss", "weighted_focal_l1_loss", "rnc_loss", "conr_loss", "ranksim_loss"]


def _in_kernel(backend_name: str) -> bool:
    """Whether the value checks of the per-element inputs run inside the backend's kernels (the fused
    backends) rather than as explicit passes (the torch backend, the reference)."""
    return backend_name != "torch"


def _prepare(pred, target, noise_var, mask, reduction, check_finite, op, backend, kernel_checks=True):
    """Validated rows, reduction code, sigma^2 tensor, whether value checks run, the implementation, and
    whether the kernel checks pred/target itself (``check_finite`` argument of the fused impls; never with
    ``kernel_checks=False``: then every check runs here, explicitly)."""
    rows = V.as_rows(pred, target, mask)
    V.check_target_constant(target=target)
    red = V.check_reduction(reduction)
    nv = V.noise_var_tensor(noise_var, rows.pred)
    check_values = V.value_checks(check_finite, rows.pred)
    name, impl = resolve(op, rows.pred, backend)
    in_kernel = check_values and kernel_checks and _in_kernel(name)
    if check_values:
        V.check_noise_var_value(nv)
    if in_kernel:
        V.refuse_batched(rows.pred, rows.target)
    elif check_values and rows.pred.shape[0] > 0:          # an empty batch has no value to check
        V.check_all_finite("pred", rows.pred, rows.mask)
        V.check_all_finite("target", rows.target, rows.mask)
    return rows, red, nv, check_values, impl, in_kernel


def _call(impl, in_kernel: bool, *args):
    """Call a backend implementation; the fused ones get ``check_finite`` (their in-kernel value checks)."""
    return impl(*args, check_finite=True) if in_kernel else impl(*args)


def _finish(loss: torch.Tensor, rows: V.Rows, reduction: int) -> torch.Tensor:
    return loss.reshape(rows.loss_shape) if reduction == _reduction.NONE else loss


def bmc_loss(pred, target, noise_var, *, candidates=None, mask=None, reduction="mean", backend="auto",
             check_finite=True, sync=False, process_group=None):
    """Balanced MSE, batch Monte Carlo (BMC).

    Row i's loss is ``2 sigma^2 * cross_entropy(l_i., positive)`` with logits
    ``l_ij = -|pred_i - y_j|^2 / (2 sigma^2)`` over its candidate set: the kept targets of the batch
    (default; the positive is its own target), or ``{target_i} U candidates`` when ``candidates`` is given
    (``[M, d]``, or ``[M]`` for d = 1: e.g. M pixels sampled from a dense batch, or targets gathered from
    all ranks). The fused backends stream over the candidates (online softmax): O(N + M) memory, and the
    backward pass is O(N). With one row the loss is 0.

    ``sync=True`` (with ``process_group``, default the default group; see :mod:`imbreg_fast.distributed`):
    the candidates come from every process — the kept targets of every process's batch (default), or every
    process's ``candidates`` concatenated — while the rows stay local. Row i's loss and the gradient into
    this process's ``pred`` are then those of the single-process loss on the concatenated batch (same rows,
    same candidate set, docs/methods.md §7.1); ``'mean'`` and ``'sum'`` reduce over this process's rows. Under
    DDP's gradient averaging, ``'mean'`` gives the gradient of the global mean when every process keeps as
    many rows; otherwise use ``'sum'`` scaled by ``world_size / global kept count`` (§7.1). Two collectives
    per call (the sizes, then the targets); every process of the group must call it, an empty batch
    included. With the default candidates the fused op runs twice (this batch's targets, the other processes'
    targets) with ``reduction='none'``, and the rows are merged and reduced here.
    """
    group = D.sync_group(sync, process_group)
    if group is not None:
        return _bmc_loss_synced(group, pred, target, noise_var, candidates, mask, reduction, backend, check_finite)
    rows, red, nv, candidates, impl, in_kernel = _prepare_bmc(pred, target, noise_var, candidates, mask, reduction,
                                                              check_finite, backend)
    return _finish(_call(impl, in_kernel, rows.pred, rows.target, candidates, rows.mask, nv, red), rows, red)


def _prepare_bmc(pred, target, noise_var, candidates, mask, reduction, check_finite, backend, kernel_checks=True):
    rows, red, nv, check_values, impl, in_kernel = _prepare(pred, target, noise_var, mask, reduction, check_finite,
                                                            "bmc_loss", backend, kernel_checks)
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
        V.check_target_constant(candidates=candidates)
        if in_kernel:
            V.refuse_batched(candidates)
        elif check_values:
            V.check_all_finite("candidates", candidates)
    return rows, red, nv, candidates, impl, in_kernel


def _bmc_loss_synced(group, pred, target, noise_var, candidates, mask, reduction, backend, check_finite):
    """bmc_loss with the candidates of every process of ``group`` (docs/methods.md §7.1)."""
    # every check runs here, inside the agreement (a bad value on one process must raise on every process
    # before the collectives), not in the kernels
    with D.agreement(group, "bmc_loss", getattr(pred, "device", None)) as agreed:
        rows, red, nv, candidates, impl, in_kernel = _prepare_bmc(pred, target, noise_var, candidates, mask,
                                                                  reduction, check_finite, backend,
                                                                  kernel_checks=False)
        given = candidates is not None
        if given:
            local = candidates
        else:
            local = rows.target if rows.mask is None else rows.target[rows.mask]
        agreed.signature = {"target dimension": rows.pred.shape[1], "dtype": D.fingerprint(str(rows.pred.dtype)),
                            "whether candidates are given": int(given)}
        agreed.shared = (local.shape[0],)
    parts = D.all_gather(local.detach(), group, sizes=agreed.table[:, 0].tolist())
    if given:
        return _finish(_call(impl, in_kernel, rows.pred, rows.target, torch.cat(parts), rows.mask, nv, red), rows, red)
    # default candidates: this batch's kept targets (the fused default path, positive included) and the
    # other processes' kept targets (the candidates path), merged row by row
    me = D.rank(group)
    others = torch.cat([part for r, part in enumerate(parts) if r != me])
    if others.shape[0] == 0:
        return _finish(_call(impl, in_kernel, rows.pred, rows.target, None, rows.mask, nv, red), rows, red)
    own_rows = _call(impl, in_kernel, rows.pred, rows.target, None, rows.mask, nv, _reduction.NONE)
    other_rows = _call(impl, in_kernel, rows.pred, rows.target, others, rows.mask, nv, _reduction.NONE)
    loss_rows = _merge_candidate_sets(own_rows, other_rows, nv)
    return _finish(_reduction.reduce_rows(loss_rows, rows.mask, red).to(rows.pred.dtype), rows, red)


def _merge_candidate_sets(loss_a: torch.Tensor, loss_b: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
    """Per-row BMC loss over the union of two candidate sets that share only the positive.

    With t_j = l_ij - l_i,pos, each loss is s * a, a = LSE_j t_j over its set (positive included, t = 0), s =
    sg(2 sigma^2); so exp(a) + exp(b) - 1 is the sum over the union (the positive once), whose log is
        hi + log1p(exp(lo - hi) * (1 - exp(-lo))),    hi = max(a, b), lo = min(a, b):
    every term is in [0, 1] (no overflow, and no cancellation when a and b are small). Autograd carries
    d/da = e^a / (e^a + e^b - 1) (and the same for b) into the two fused ops' per-row gradients.
    """
    dtype = V.compute_dtype(loss_a.dtype)
    scale = (2 * noise_var).detach().to(dtype)
    a, b = loss_a.to(dtype) / scale, loss_b.to(dtype) / scale
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    return (hi + torch.log1p(torch.exp(lo - hi) * -torch.expm1(-lo))) * scale


_COMPAT = "imbreg_fast.compat.balanced_mse"


def _check_gai_order(noise_var, gmm) -> None:
    """The published ``gai_loss(pred, target, gmm, noise_var)`` order, or its GMM dict, refused with the fix."""
    scalar_gmm = isinstance(gmm, (int, float)) or (isinstance(gmm, torch.Tensor) and gmm.numel() == 1)
    # a str noise_var is the published GMM path only when gmm holds the noise variance (swapped arguments);
    # otherwise it falls through to the ordinary noise_var type error
    if isinstance(noise_var, (Mapping, tuple, list, os.PathLike)) or (isinstance(noise_var, str) and scalar_gmm):
        got = V.published_gmm_form(noise_var) or f"a {type(noise_var).__name__}"
        raise TypeError(f"gai_loss(pred, target, noise_var, gmm): noise_var must be a float or a scalar tensor, got "
                        f"{got}. This looks like the published order gai_loss(pred, target, gmm, noise_var): here "
                        "noise_var comes before gmm, and gmm is (weights [K], means [K, d], covariances [K, d, d]) "
                        f"tensors; or keep the published call with {_COMPAT}.gai_loss(pred, target, gmm, noise_var)")
    got = V.published_gmm_form(gmm)
    if got is not None:
        raise TypeError(f"gmm must be (weights [K], means [K, d], covariances [K, d, d]) tensors, got {got}, the "
                        "published GMM file/dict: pass (torch.as_tensor(g['weights']), torch.as_tensor(g['means']), "
                        f"torch.as_tensor(g['variances'])) of its dict g, or use {_COMPAT}.gai_loss / GAILoss, "
                        "which take the published dict (GAILoss also its file)")


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
    given = tuple(gmm)
    weights, means, covariances = weights.detach(), means.detach(), covariances.detach()
    if check_values:
        V.check_once("gmm", given, lambda: _check_gmm_values(weights, means, covariances, d))
    return weights, means, covariances


def _check_gmm_values(weights, means, covariances, d: int) -> None:
    """The prior's values: weights (finite, > 0, sum 1), means finite, covariances symmetric positive definite."""
    V.check_prior_weights("gmm weights", weights)
    if not bool(torch.isfinite(means).all()):
        raise ValueError("gmm means contain NaN or inf")
    cov64 = covariances.double()
    if d == 1:   # [K, 1, 1]: symmetric, and positive definite iff > 0 (no factorisation per call)
        info = (~(cov64.reshape(-1) > 0)).to(torch.int32)
        if not bool(torch.isfinite(cov64).all()):
            raise ValueError("gmm covariances must be finite and symmetric")
    else:
        if not bool(torch.isfinite(cov64).all()) or not torch.allclose(cov64, cov64.mT, rtol=1e-5, atol=1e-8):
            raise ValueError("gmm covariances must be finite and symmetric")
        _, info = torch.linalg.cholesky_ex(cov64)
    if bool((info != 0).any()):
        bad = int(torch.nonzero(info)[0])
        raise ValueError(f"gmm covariances must be symmetric positive definite; component {bad} is not")


def gai_loss(pred, target, noise_var, gmm, *, mask=None, reduction="mean", backend="auto", check_finite=True):
    """Balanced MSE, GMM-based analytic integration (GAI).

    ``gmm = (weights [K], means [K, d], covariances [K, d, d])`` is the training-label prior (see
    :func:`imbreg_fast.fit_gmm`; for d = 1 means ``[K]`` and variances ``[K]`` are accepted too). It is a
    constant: no gradient flows into it. Row loss (d = 1):
    ``2 sigma^2 [ (p-y)^2/(2 sigma^2) + 1/2 log sigma^2 + LSE_k(log phi_k - 1/2 log(v_k+sigma^2) - (p-mu_k)^2/(2(v_k+sigma^2))) ]``,
    and the multivariate-normal form for d > 1. Fused backends: one pass over the rows, K components per
    row, no [N, K] temporaries, fp32 accumulation for half inputs.
    """
    _check_gai_order(noise_var, gmm)
    rows, red, nv, check_values, impl, in_kernel = _prepare(pred, target, noise_var, mask, reduction, check_finite,
                                                            "gai_loss", backend)
    weights, means, covariances = _as_gmm(gmm, rows.pred.shape[1], rows.pred, check_values)
    return _finish(_call(impl, in_kernel, rows.pred, rows.target, rows.mask, nv, weights, means, covariances, red),
                   rows, red)


def bni_loss(pred, target, noise_var, bin_centers, bin_weights, *, mask=None, reduction="mean",
             backend="auto", check_finite=True):
    """Balanced MSE, bin-based numerical integration (BNI).

    ``bin_centers`` ``[K]`` (d = 1) or ``[K, d]`` and ``bin_weights`` ``[K]`` (>= 0, summing to 1: the training
    label histogram, see :func:`imbreg_fast.bin_prior`; an empty bin has weight 0 and contributes nothing).
    On evenly spaced d = 1 centres (``bin_prior``'s bins with the empty ones kept) the fused kernels take a
    recurrence with 2 exps per chunk of up to 16 bins instead of one per bin (docs/methods.md §1.5). Row loss:
    ``2 sigma^2 [ |p-y|^2/(2 sigma^2) + LSE_k(log phi_k - |p-c_k|^2/(2 sigma^2)) ]`` (can be negative, as
    in the reference). Integer centres (the reference's ``get_bucket_info`` returns int64 ages) are cast to
    pred's dtype (float32 for half inputs).
    """
    rows, red, nv, check_values, impl, in_kernel = _prepare(pred, target, noise_var, mask, reduction, check_finite,
                                                            "bni_loss", backend)
    d = rows.pred.shape[1]
    _check_bin_tensor("bin_centers", bin_centers)
    _check_bin_tensor("bin_weights", bin_weights)
    V.check_real_tensor("bin_centers", bin_centers)
    V.check_float_tensor("bin_weights", bin_weights)
    V.check_same_device(pred=rows.pred, bin_centers=bin_centers, bin_weights=bin_weights)
    given = (bin_centers, bin_weights)
    if not bin_centers.is_floating_point():
        bin_centers = bin_centers.to(V.compute_dtype(rows.pred.dtype))
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
        V.check_once("bni", given, lambda: _check_bin_values(bin_centers, bin_weights))
    return _finish(_call(impl, in_kernel, rows.pred, rows.target, rows.mask, nv, bin_centers, bin_weights, red),
                   rows, red)


def _check_bin_values(bin_centers, bin_weights) -> None:
    V.check_prior_weights("bin_weights", bin_weights, allow_zero=True)
    if not bool(torch.isfinite(bin_centers).all()):
        raise ValueError("bin_centers contain NaN or inf")


def _check_bin_tensor(name: str, x) -> None:
    """A numpy array or list (the published ``get_bucket_info`` result) is refused with the fix."""
    if not isinstance(x, torch.Tensor) and (hasattr(x, "__array__") or isinstance(x, (list, tuple))):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}: convert it with "
                        f"torch.as_tensor({name}, device=pred.device), or keep the published arrays with "
                        f"{_COMPAT}.bni_loss / BNILoss")


# --------------------------------------------------------------------------------------------------
# Weighted regression losses (LDS re-weighting, Focal-R)
# --------------------------------------------------------------------------------------------------


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
    """pred/target finite and weight finite and >= 0 at kept elements; one host sync when they are. (The
    torch backend's checks: the fused kernels make the same checks in their own pass.)

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
    if not V.any_true(~ok):
        return
    V.check_all_finite("pred", p, m)
    V.check_all_finite("target", y, m)
    if w is not None:
        V.check_all_finite("weight", w, m)
        negative = w < 0 if m is None else (w < 0) & m
        if V.any_true(negative):
            raise ValueError("weight must be >= 0" + (" at kept elements" if m is not None else ""))


def _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, kind, beta=1.0, gamma=1.0,
                   activation="sigmoid"):
    pred, target = V.check_pair(pred, target)
    red = V.check_reduction(reduction, _reduction.WEIGHTED_LOSS_REDUCTIONS)
    V.check_mask(mask, tuple(target.shape), target, "target")
    shape = pred.shape
    w = _as_weight(weight, target)
    p, y = pred.reshape(-1), target.reshape(-1)
    m = None if mask is None else mask.reshape(-1)
    name, impl = resolve(_wl.OP, p, backend)
    in_kernel = V.value_checks(check_finite, p) and _in_kernel(name)
    if in_kernel:
        V.refuse_batched(p, y, w)
    elif V.value_checks(check_finite, p):
        _check_values(p, y, w, m)
    loss = _call(impl, in_kernel, p, y, w, m, kind, beta, gamma, _wl.ACTIVATIONS[activation], red)
    return loss.reshape(shape) if red == _reduction.NONE else loss


def weighted_mse_loss(pred, target, weight=None, *, mask=None, reduction="mean", backend="auto",
                      check_finite=True):
    """Weighted MSE: element loss ``w (pred - target)^2`` (reference ``weighted_mse_loss``).

    See the module docstring for the common arguments.
    """
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _wl.MSE)


def weighted_l1_loss(pred, target, weight=None, *, mask=None, reduction="mean", backend="auto", check_finite=True):
    """Weighted L1: element loss ``w |pred - target|`` (reference ``weighted_l1_loss``); its gradient is
    sign(e), 0 at e = 0."""
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _wl.L1)


def weighted_huber_loss(pred, target, weight=None, *, beta=1.0, mask=None, reduction="mean", backend="auto",
                        check_finite=True):
    """Weighted Huber (reference ``weighted_huber_loss``): with a = |pred - target|, element loss
    ``w a^2 / (2 beta)`` if a < beta else ``w (a - beta / 2)`` (torch's smooth-L1 form); ``beta`` > 0, default 1.
    """
    beta = V.check_positive("beta", beta)
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _wl.HUBER, beta=beta)


def weighted_focal_mse_loss(pred, target, weight=None, *, activation="sigmoid", beta=0.2, gamma=1.0, mask=None,
                            reduction="mean", backend="auto", check_finite=True):
    """Weighted Focal-R MSE (reference ``weighted_focal_mse_loss``): element loss ``w e^2 f(|e|)`` with
    ``f(a) = (2 sigmoid(beta a) - 1)^gamma`` (``activation='sigmoid'``, default) or ``tanh(beta a)^gamma``
    (``'tanh'``); ``beta`` > 0 (default 0.2), ``gamma`` >= 0 (default 1). The gradient includes the
    factor's own dependence on e (exactly, as autograd through the reference).
    """
    beta, gamma = V.check_positive("beta", beta), V.check_nonnegative("gamma", gamma)
    act = V.check_choice("activation", activation, _wl.ACTIVATIONS)
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _wl.FOCAL_MSE, beta=beta,
                          gamma=gamma, activation=act)


def weighted_focal_l1_loss(pred, target, weight=None, *, activation="sigmoid", beta=0.2, gamma=1.0, mask=None,
                           reduction="mean", backend="auto", check_finite=True):
    """Weighted Focal-R L1 (reference ``weighted_focal_l1_loss``): element loss ``w |e| f(|e|)``, with the
    focal factor ``f`` of :func:`weighted_focal_mse_loss`.
    """
    beta, gamma = V.check_positive("beta", beta), V.check_nonnegative("gamma", gamma)
    act = V.check_choice("activation", activation, _wl.ACTIVATIONS)
    return _weighted_loss(pred, target, weight, mask, reduction, backend, check_finite, _wl.FOCAL_L1, beta=beta,
                          gamma=gamma, activation=act)


RNC_LABEL_DISTANCES = ("l1",)      # the published LabelDifference options
RNC_FEATURE_SIMILARITIES = ("l2",)  # the published FeatureSimilarity options


def rnc_loss(features, labels, *, temperature=2.0, label_distance="l1", feature_similarity="l2",
             reduction="mean", backend="auto", check_finite=True):
    """Rank-N-Contrast loss (Zha et al., NeurIPS 2023; published ``RnCLoss``), exact in O(n^2 log n).

    For anchors i and k != i: ``-log(e^{s_ik} / sum_{j != i, d_ij >= d_ik} e^{s_ij})`` with
    ``s_ij = -||f_i - f_j||_2 / temperature`` (``feature_similarity='l2'``) and the label distance
    ``d_ij = sum_c |y_ic - y_jc|`` (``label_distance='l1'``); ties (d_ij = d_ik) are in the denominator.

    Args:
        features: ``[B, V, d]`` views (the published ``[B, 2, d]``; flattened view-major as the published code)
            or a flat ``[n, d]`` batch. Any floating dtype; fp16/bf16 are computed in fp32.
        labels: ``[B]`` / ``[B, L]`` (repeated per view) or ``[n]`` / ``[n, L]``; floating (integer labels raise
            TypeError: pass ``labels.float()``). Labels are data: never differentiated.
        temperature: tau > 0 (the paper's default 2).
        reduction: ``'mean'`` (mean over the n (n - 1) pairs, as published), ``'sum'`` (sum over anchors of the
            per-anchor means, = n * 'mean') or ``'none'``: the per-anchor means ``(1 / (n - 1)) sum_k l_ik``,
            shaped ``[n]`` (flat input) or ``[B, V]`` (views); 'mean' and 'sum' are the mean and sum of 'none'.
            Fewer than 2 anchors: loss 0.
        backend, check_finite: as every loss (features and labels checked for NaN/inf before the kernel;
            on CUDA an asynchronous device-side assert, no host sync).
    """
    V.check_positive("temperature", temperature)
    V.check_choice("label_distance", label_distance, RNC_LABEL_DISTANCES)
    V.check_choice("feature_similarity", feature_similarity, RNC_FEATURE_SIMILARITIES)
    batch = V.as_contrast_batch(features, labels)
    red = V.check_reduction(reduction)
    _, impl = resolve(_rnc.OP, batch.features, backend)
    if V.value_checks(check_finite, batch.features) and batch.features.numel() > 0:
        V.check_all_finite_async("features", batch.features.detach())
        V.check_all_finite_async("labels", batch.labels)
    loss = impl(batch.features, batch.labels, float(temperature), red)
    if red == _reduction.NONE and batch.views is not None:
        loss = loss.reshape(batch.views, batch.batch).transpose(0, 1)
    return loss


def conr_loss(features, targets, preds, *, weights=None, window=1.0, temperature=0.07, pushing=0.01,
              published_denominator=True, reduction="mean", backend="auto", check_finite=True):
    """ConR, contrastive regularisation for imbalanced regression (Keramati et al., ICLR 2024;
    docs/methods.md, ConR section). Add ``beta * conr_loss(...)`` (the paper: beta = 4) to a DIR loss.

    For each anchor i of the batch, with z = features / |features| (rows; F.normalize's eps 1e-12) and
    S_ij = z_i . z_j / temperature: positives P_i = {j != i: |y_i - y_j| <= window}, negatives
    N_i = {j: |y_i - y_j| > window and |p_i - p_j| <= window} (p: preds), and

        L_i = omega_i (log D_i - mean_{j in P_i} S_ij),
        D_i = sum_{P_i} e^{S_ij} + sum_{N_i} omega_i e^{pushing |y_i - y_j|} e^{S_ij} + m_i.

    An anchor with no negative (as published) or no positive (the published code returns NaN for the whole
    batch then) contributes 0; ``'mean'`` divides by the number of all anchors n, as published.

    Args:
        features: ``[n, d]`` floating; the published code's batch is the two augmented views stacked along
            dim 0 (n = 2B), any flat batch works. Gradients flow into it only.
        targets: ``[n]`` or ``[n, 1]`` floating labels (data: must not require grad).
        preds: ``[n]`` or ``[n, 1]`` floating predictions; detached (never differentiated), as published.
        weights: ``[n]`` / ``[n, 1]`` omega_i >= 0 (e.g. LDS weights) or None (all ones); constants. They
            scale the anchor's loss and its negatives' pushing weight.
        window: w, the label (and prediction) similarity window (>= 0).
        temperature: tau > 0. The default 0.07 is the value the published AgeDB code actually uses (it
            ignores its ``t`` argument).
        pushing: e, the negatives' pushing strength exp(e |y_i - y_j|).
        published_denominator: True (default) reproduces the published code's m_i = n - |P_i|: its masked
            similarity matrix keeps exp(0) = 1 in every non-positive column (undocumented; it changes the
            value). False: the clean denominator (m_i = 0).
        reduction: ``'mean'`` (sum over anchors / n), ``'sum'`` or ``'none'`` ([n] per anchor).
        backend, check_finite: as every op (module docstring).

    fp16 / bf16 features are computed in fp32, in log space (max-shifted log-sum-exp): no overflow at
    e^{1/0.07} (the published code returns NaN in fp16). The result has features' dtype.
    """
    inputs = V.conr_inputs(features, targets, preds, weights)
    window = V.check_nonnegative("window", window)
    temperature = V.check_positive("temperature", temperature)
    pushing = V.check_real("pushing", pushing)
    if not isinstance(published_denominator, bool):
        raise TypeError(f"published_denominator must be a bool, got {type(published_denominator).__name__}")
    red = V.check_reduction(reduction)
    check_values = V.value_checks(check_finite, inputs.features)
    name, impl = resolve("conr_loss", inputs.features, backend)
    in_kernel = check_values and _in_kernel(name)
    if in_kernel:
        V.refuse_batched(*inputs)
    elif check_values:
        V.check_conr_values(inputs)
    return _call(impl, in_kernel, inputs.features, inputs.targets, inputs.preds, inputs.weights, window,
                 temperature, pushing, published_denominator, red)


# --------------------------------------------------------------------------------------------------
# RankSim (Gong et al., ICML 2022)
# --------------------------------------------------------------------------------------------------


def unique_label_layout(targets: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The published subsample (one random sample per distinct label) as a fixed-size layout, computed on
    the targets' device without a host read: ``(index [n] int64, count [] int64)``. ``index`` lists the kept
    rows first, in ascending label order, then the others; ``count`` is the number kept. When the labels are
    all distinct the published rule keeps the batch as is: ``index`` is then ``arange(n)`` and ``count`` n.

    Vectorised form of the published per-label ``random.choice``: a random permutation (``generator``, on
    the targets' device; None: torch's global generator), a stable sort of the permuted labels, and the
    first row of each run of equal labels — a uniformly random member of each label."""
    y = targets.reshape(-1)
    n = y.shape[0]
    perm = torch.randperm(n, generator=generator, device=y.device)
    values, order = torch.sort(y[perm], stable=True)
    first = torch.ones(n, dtype=torch.bool, device=y.device)
    first[1:] = values[1:] != values[:-1]
    by_label = perm[order]
    # the kept rows (first of their label) in label order, then the rest: a stable partition
    kept_first = by_label[torch.sort((~first).to(torch.uint8), stable=True).indices]
    count = first.sum()
    index = torch.where(count == n, torch.arange(n, device=y.device), kept_first)
    return index, count


def unique_label_subsample(targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Rows of one random sample per distinct label, in ascending label order; None when the labels are all
    distinct (the published rule: then the batch is used as is, in its own order). The same draw as
    :func:`unique_label_layout` with the same generator state, cut to its kept rows: this form reads the
    number of distinct labels on the host (a sync on a GPU; the output's size depends on the data), which
    ``ranksim_loss``'s default path does not."""
    index, count = unique_label_layout(targets, generator)
    kept = int(count)
    return None if kept == index.shape[0] else index[:kept]


def ranksim_loss(features, targets, *, interpolation_lambda=2.0, subsample="unique_labels", generator=None,
                 reduction="sum", backend="auto", check_finite=True):
    """RankSim regulariser (Gong et al., ICML 2022): the ranks of each row of the features' cosine-similarity
    matrix should match the ranks of the same row of the label similarities -|y_i - y_j|.

    With z_i = x_i / max(|x_i|, 1e-12), S = z z^T and, per row i of the m kept samples,
    ``R_f,i = rank(S_i)``, ``R_y,i = rank(-|y_i - y|)``, ``L_i = mean_j (R_f,ij - R_y,ij)^2``; the published
    value is ``sum_i L_i``. ``rank(v)_j = (r_j + 1) / m``, r_j the 0-based descending position; ties: the
    later index first (the published STS-B code's stable rule; deterministic on every backend).

    Gradient: the blackbox-solver surrogate of the published code, dL/dS_i = (rank(S_i + lambda G_i) -
    rank(S_i)) / lambda, G_i the incoming gradient on R_f,i, then exactly through the cosine similarity.

    .. warning::
        The gradient is NOT linear in the incoming gradient. Multiplying the loss by gamma (as
        :class:`imbreg_fast.nn.RankSimLoss` does, and the published training code), an AMP ``GradScaler``'s
        loss scale, the 1/k of gradient accumulation or DDP's averaging all change the perturbation
        lambda·G and therefore the DIRECTION of the gradient, not only its size. This op uses exactly the
        incoming gradient, as the published method does: apply these scalings as the published code did to
        reproduce its training. It cannot be differentiated twice (RuntimeError).

    Args:
        features: ``[n, d]`` (or ``[n, ...]``, flattened per sample) floating; the encoder's output.
        targets: ``[n]`` or ``[n, 1]`` labels (floating or integer); not differentiated.
        interpolation_lambda: lambda > 0 of the blackbox gradient (paper: 2; the published scripts' flag
            defaults to 1).
        subsample: ``'unique_labels'`` (default, published): when labels repeat, keep one random sample per
            distinct label (``generator`` makes it reproducible), rows in ascending label order; when all
            labels are distinct the batch is kept as is. Computed without a host sync: the kept rows are
            laid out first and their number stays on the device (:func:`unique_label_layout`;
            ``reduction='none'`` alone reads it, to return the ``[m]`` kept rows). ``None``: every row. An
            integer index tensor: those rows, in that order (deterministic).
        generator: ``torch.Generator`` on the targets' device for ``'unique_labels'`` (None: global RNG).
        reduction: ``'sum'`` (default, published: sum over the m kept rows), ``'mean'`` (over the kept rows;
            0 for m = 0), ``'none'`` (``[m]``, the kept rows in subsample order).
        backend, check_finite: as every op (module docstring). ``check_finite`` checks features and targets
            before the kernel (CPU: ValueError naming the argument; CUDA: an asynchronous device-side assert,
            no host sync).
    """
    x, y = V.check_ranksim_inputs(features, targets)
    lam = V.check_positive("interpolation_lambda", interpolation_lambda)
    red = V.check_reduction(reduction)
    check_values = V.value_checks(check_finite, x)
    if check_values and x.numel() > 0:
        V.check_all_finite_async("features", x.detach())
        if y.is_floating_point():
            V.check_all_finite_async("targets", y)
    count = None
    if isinstance(subsample, torch.Tensor):
        index = V.check_subsample_index(subsample, x.shape[0], x.device, check_values)
    elif subsample is None:
        index = None
    elif isinstance(subsample, str) and subsample == "unique_labels":
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        index, count = unique_label_layout(y, generator)
    else:
        raise ValueError(f"subsample must be 'unique_labels', None or an integer index tensor, got {subsample!r}")
    if index is not None:
        x, y = x[index], y[index]
    name, impl = resolve(_rs.OP, x, backend)
    if count is None:
        return impl(x, y.detach(), lam, red)
    loss = impl(x, y.detach(), lam, red, count)
    # 'none' returns the kept rows only: its size depends on the data, the one host read of this path
    return loss[:int(count)] if red == _reduction.NONE else loss
