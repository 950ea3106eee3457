"""The API of jiawei-ren/BalancedMSE, on imbreg_fast's fused kernels.

Same names, signatures, argument order, accepted inputs and values as the published losses
(``imdb-wiki-dir/balanaced_mse.py``, ``nyud2-dir/balanaced_mse.py``, ``synthetic_benchmark/loss.py``), so a
ported script changes only its import::

    from imbreg_fast.compat.balanced_mse import GAILoss      # was: from balanaced_mse import GAILoss
    criterion = GAILoss(args.init_noise_sigma, args.gmm)       # the joblib file of preprocess_gmm.py
    optimizer.add_param_group({'params': criterion.noise_sigma, 'lr': args.sigma_lr, 'name': 'noise_sigma'})

Functions: :func:`bmc_loss` ``(pred, target, noise_var)``, :func:`bmc_loss_md`, :func:`gai_loss`
``(pred, target, gmm, noise_var)``, :func:`gai_loss_md`, :func:`bni_loss` ``(pred, target, noise_var,
bucket_centers, bucket_weights)``. Modules: :class:`BMCLoss` ``(init_noise_sigma)``, :class:`BMCLossMD`,
:class:`GAILoss` ``(init_noise_sigma, gmm)``, :class:`GAILossMD`, :class:`BNILoss` ``(init_noise_sigma,
bucket_centers, bucket_weights)``. Each returns the published value: the mean over the rows of
``sg(2 sigma^2) * NLL_i`` (docs/methods.md §1), with ``noise_var = sigma ** 2``.

Every loss is computed by :mod:`imbreg_fast.functional` (backend ``'auto'``: cpp on CPU, triton on CUDA;
keyword-only ``backend=`` to choose); this module only adapts the published inputs at the boundary:

- shapes: the 1-D functions take ``[N, 1]`` pred/target (``bmc_loss`` also a ``[N]`` target, which the
  published ``pred - target.T`` handles), the ``_md`` ones ``[N, d]``;
- ``noise_var``: a tensor (as published) or a number;
- the GMM: the dict ``{'means', 'variances', 'weights'}`` that ``preprocess_gmm.py`` writes with joblib
  (sklearn's ``means_ [K, 1]``, ``covariances_ [K, 1, 1]``, ``weights_ [K]``, numpy float64), as numpy
  arrays, tensors or lists; :class:`GAILoss` and :class:`GAILossMD` also take the file's path
  (:func:`load_gmm`);
- buckets: numpy, tensor or list; int64 centres (``get_bucket_info`` of the age datasets) and float64
  weights;
- weights that do not sum to 1 and zero weights: the published ``log(weights)`` gives them a constant
  offset ``2 sigma^2 log(sum w)`` and no term respectively; here the weights are normalised and
  zero-weight components dropped before the mainline call and the offset added back (same value, same
  gradients).

What differs, on purpose (docs/methods.md §1.6): no hard-coded ``.cuda()`` (everything on pred's device);
the loss is computed in pred's dtype (the published float64 GMM/bucket arrays silently promote the fp32
loss to float64; pass float64 inputs for float64 numerics); an empty batch gives 0, not NaN; inputs that
the published code broadcasts into a wrong value (a ``[N]`` pred, mismatched pred/target shapes) raise a
``ValueError``; targets are data (a target that requires grad raises, as in the mainline API).
"""
from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from .. import functional as F

__all__ = ["bmc_loss", "bmc_loss_md", "gai_loss", "gai_loss_md", "bni_loss", "BMCLoss", "BMCLossMD", "GAILoss",
           "GAILossMD", "BNILoss", "load_gmm"]

GMM_KEYS = ("means", "variances", "weights")
_MD = {"bmc_loss": "bmc_loss_md", "gai_loss": "gai_loss_md", "BMCLoss": "BMCLossMD", "GAILoss": "GAILossMD"}


# --------------------------------------------------------------------------------------------------
# Inputs at the boundary
# --------------------------------------------------------------------------------------------------


def _rows(fn: str, pred, target, *, md: bool, flat_target: bool = False):
    """pred/target as the published function takes them: ``[N, 1]`` (``md=False``) or ``[N, d]``."""
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if pred.dim() != 2 or (not md and pred.shape[1] != 1):
        if pred.dim() == 1:
            hint = " (pred.unsqueeze(1) for [N] predictions)"
        elif pred.dim() == 2 and fn in _MD:
            hint = f"; for [N, d] use {_MD[fn]}"
        elif pred.dim() == 2:
            hint = "; the published BNI is 1-D (imbreg_fast.functional.bni_loss takes [N, d])"
        else:
            hint = ""
        raise ValueError(f"{fn}: pred must be {'[N, d]' if md else '[N, 1]'}, as in the published code, got shape "
                         f"{tuple(pred.shape)}{hint}")
    if flat_target and target.dim() == 1 and target.shape[0] == pred.shape[0]:
        target = target.reshape(-1, 1)
    if target.shape != pred.shape:
        raise ValueError(f"{fn}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    return pred, target


def _noise_var(noise_var):
    """A tensor as it is (the mainline checks it); a real number as a float."""
    if isinstance(noise_var, numbers.Real) and not isinstance(noise_var, bool):
        return float(noise_var)
    return noise_var


def _real_tensor(name: str, x, device=None) -> torch.Tensor:
    """A tensor of real numbers from a tensor, numpy array or (nested) list; detached, on ``device``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, (list, tuple)) or hasattr(x, "__array__"):
        try:
            t = torch.as_tensor(x)
            if t.is_floating_point() and isinstance(x, (list, tuple)):
                t = torch.as_tensor(x, dtype=torch.float64)        # Python floats are doubles
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be an array of real numbers: {exc}") from None
    else:
        raise TypeError(f"{name} must be a tensor, numpy array or list, got {type(x).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    return t if device is None else t.to(device)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_floating_point() else t.to(torch.float64)


def _mixture_weights(name: str, weights: torch.Tensor):
    """(float64 weights normalised to sum 1, index of the kept (> 0) components or None, log of their sum).

    The published ``log(weights)`` accepts any weights >= 0: a zero weight contributes no term, and a sum
    s != 1 adds ``log s`` to every row's balancing term (``2 sigma^2 log s`` to the loss after the rescaling).
    """
    w = weights.double()
    bad, has_zero = torch.stack([~torch.isfinite(w).all() | (w < 0).any() | ~(w > 0).any(), (w == 0).any()]).tolist()
    if bad:
        raise ValueError(f"{name} must be finite and >= 0, with at least one > 0")
    keep = torch.nonzero(w > 0).reshape(-1) if has_zero else None
    if keep is not None:
        w = w[keep]
    total = w.sum()
    return w / total, keep, torch.log(total)


def _gmm_tensors(gmm, fn: str) -> dict:
    """The published GMM dict as float tensors (shapes not checked); ``fn`` names the caller in errors."""
    if not isinstance(gmm, Mapping):
        if isinstance(gmm, (str, os.PathLike)):
            raise TypeError(f"{fn}: gmm must be the GMM dict, got a path ({os.fspath(gmm)!r}); load it once with "
                            "load_gmm(path) (GAILoss(init_noise_sigma, path) does)")
        raise TypeError(f"{fn}: gmm must be a dict with keys {list(GMM_KEYS)} (the dict preprocess_gmm.py writes), "
                        f"got {type(gmm).__name__}")
    missing = [k for k in GMM_KEYS if k not in gmm]
    if missing:
        raise ValueError(f"{fn}: gmm is missing key(s) {missing}; expected {list(GMM_KEYS)} (sklearn's means_, "
                         f"covariances_, weights_), got {sorted(map(str, gmm))}")
    return {k: _float(_real_tensor(f"gmm[{k!r}]", gmm[k])) for k in GMM_KEYS}


def _gmm_shapes(g: dict, d: int | None, fn: str):
    """(weights [K], means [K, d], covariances [K, d, d]) views of the published GMM tensors.

    ``d=None``: the 1-D code, which flattens every array (K values each); else the multi-dimensional code's
    ``means [K, d]`` and full ``variances [K, d, d]`` (for d = 1 also ``[K]`` / ``[K, 1]``)."""
    w, mu, var = g["weights"].reshape(-1), g["means"], g["variances"]
    k = w.shape[0]
    if k < 1:
        raise ValueError(f"{fn}: gmm['weights'] is empty")
    if d is None:
        for key, x in (("means", mu), ("variances", var)):
            if x.numel() != k:
                raise ValueError(f"{fn}: gmm[{key!r}] must hold one value per component (K = {k}, the size of "
                                 f"gmm['weights']) for the 1-D GMM, got shape {tuple(x.shape)}; for d > 1 use "
                                 f"{_MD.get(fn, 'gai_loss_md')}")
        return w, mu.reshape(k, 1), var.reshape(k, 1, 1)
    if d == 1 and mu.numel() == k:
        mu = mu.reshape(k, 1)
    if d == 1 and var.numel() == k:
        var = var.reshape(k, 1, 1)
    if tuple(mu.shape) != (k, d):
        raise ValueError(f"{fn}: gmm['means'] must be [K, d] = [{k}, {d}], got {tuple(mu.shape)}")
    if tuple(var.shape) != (k, d, d):
        raise ValueError(f"{fn}: gmm['variances'] must be the full covariances [K, d, d] = [{k}, {d}, {d}], got "
                         f"{tuple(var.shape)}")
    return w, mu, var


def _gai(fn: str, pred, target, gmm, noise_var, md: bool, backend: str):
    pred, target = _rows(fn, pred, target, md=md)
    g = _gmm_tensors(gmm, fn)
    w, mu, var = _gmm_shapes(g, pred.shape[1] if md else None, fn)
    w, keep, log_total = _mixture_weights("gmm['weights']", w.to(pred.device))
    mu, var = mu.to(pred.device), var.to(pred.device)
    if keep is not None:
        mu, var = mu[keep], var[keep]
    noise_var = _noise_var(noise_var)
    loss = F.gai_loss(pred, target, noise_var, (w, mu, var), backend=backend)
    return _add_offset(loss, noise_var, log_total)


def _add_offset(loss: torch.Tensor, noise_var, log_total: torch.Tensor) -> torch.Tensor:
    """loss + sg(2 sigma^2) log(sum w): the published value for weights that do not sum to 1 (0 when they do)."""
    scale = 2 * (noise_var.detach() if isinstance(noise_var, torch.Tensor) else noise_var)
    return loss + (scale * log_total).to(loss.dtype)


# --------------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------------


def bmc_loss(pred, target, noise_var, *, backend: str = "auto") -> torch.Tensor:
    """Published 1-D BMC: pred/target ``[N, 1]`` (target ``[N]`` too), ``noise_var`` a tensor (e.g.
    ``noise_sigma ** 2``) or a number. ``cross_entropy`` of the ``[N, N]`` logits ``-(pred_i - target_j)^2 /
    (2 noise_var)`` with labels ``arange(N)``, times ``(2 noise_var).detach()``: a scalar, 0 for N = 1."""
    pred, target = _rows("bmc_loss", pred, target, md=False, flat_target=True)
    return F.bmc_loss(pred, target, _noise_var(noise_var), backend=backend)


def bmc_loss_md(pred, target, noise_var, *, backend: str = "auto") -> torch.Tensor:
    """Published multi-dimensional BMC: pred/target ``[N, d]``; the logits ``MVN(pred_i, noise_var I)
    .log_prob(target_j)`` (their normalising constant cancels in the cross-entropy). Same value as
    :func:`bmc_loss` for d = 1."""
    pred, target = _rows("bmc_loss_md", pred, target, md=True)
    return F.bmc_loss(pred, target, _noise_var(noise_var), backend=backend)


def gai_loss(pred, target, gmm, noise_var, *, backend: str = "auto") -> torch.Tensor:
    """Published 1-D GAI: pred/target ``[N, 1]``; ``gmm`` the dict ``{'means', 'variances', 'weights'}`` (K
    values each, any shapes: sklearn's ``[K, 1]``, ``[K, 1, 1]``, ``[K]``; numpy arrays, tensors or lists).

    Row loss ``(p - y)^2 / (2 v) + log(v) / 2 + LSE_k(log w_k - log(var_k + v) / 2 - (p - mu_k)^2 / (2 (var_k + v)))``
    with ``v = noise_var``, times ``(2 v).detach()``, mean over the rows."""
    return _gai("gai_loss", pred, target, gmm, noise_var, False, backend)


def gai_loss_md(pred, target, gmm, noise_var, *, backend: str = "auto") -> torch.Tensor:
    """Published multi-dimensional GAI: pred/target ``[N, d]``; ``gmm['means'] [K, d]``, ``gmm['variances']``
    the full covariances ``[K, d, d]``, ``gmm['weights'] [K]``. Row loss ``-log N(y; p, v I) +
    LSE_k(log w_k + log N(p; mu_k, Sigma_k + v I))``, times ``(2 v).detach()``, mean over the rows."""
    return _gai("gai_loss_md", pred, target, gmm, noise_var, True, backend)


def bni_loss(pred, target, noise_var, bucket_centers, bucket_weights, *, backend: str = "auto") -> torch.Tensor:
    """Published BNI: pred/target ``[N, 1]``; ``bucket_centers [K]`` (int or float: ``get_bucket_info``
    returns int64 ages and float depths) and ``bucket_weights [K]`` (numpy arrays, tensors or lists).

    Row loss ``(p - y)^2 / (2 v) + LSE_k(log w_k - (p - c_k)^2 / (2 v))`` (no ``log v`` terms: it can be
    negative), times ``(2 v).detach()``, mean over the rows."""
    pred, target = _rows("bni_loss", pred, target, md=False)
    centers = _real_tensor("bucket_centers", bucket_centers, pred.device)
    weights = _float(_real_tensor("bucket_weights", bucket_weights, pred.device))
    centers, weights = _bucket_shapes(centers, weights)
    weights, keep, log_total = _mixture_weights("bucket_weights", weights)
    if keep is not None:
        centers = centers[keep]
    noise_var = _noise_var(noise_var)
    loss = F.bni_loss(pred, target, noise_var, centers, weights, backend=backend)
    return _add_offset(loss, noise_var, log_total)


def _bucket_shapes(centers: torch.Tensor, weights: torch.Tensor):
    if weights.dim() != 1 or weights.shape[0] < 1:
        raise ValueError(f"bucket_weights must be [K] with K >= 1, got shape {tuple(weights.shape)}")
    k = weights.shape[0]
    if centers.shape not in ((k,), (k, 1)):
        raise ValueError(f"bucket_centers must be [K] = [{k}] (one per bucket weight), got shape "
                         f"{tuple(centers.shape)}")
    return centers.reshape(k), weights


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def load_gmm(path) -> dict:
    """The GMM dict that ``preprocess_gmm.py`` writes with ``joblib.dump`` (keys ``'means'``, ``'variances'``,
    ``'weights'``, numpy arrays). Read with joblib when it is installed, else with pickle (a plain pickle of
    the dict; a joblib file of numpy arrays needs joblib). Like the published code this unpickles the file:
    load only files you trust."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"gmm path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gmm: no such file {path!r} (the GMM file written by preprocess_gmm.py)")
    try:
        import joblib
    except ImportError:
        joblib = None
    if joblib is not None:
        obj = joblib.load(path)
    else:
        with open(path, "rb") as f:
            try:
                obj = pickle.load(f)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] == "joblib":
                    raise ImportError(f"gmm file {path!r} was written by joblib (numpy arrays); install joblib to "
                                      "read it, or pass the dict itself") from None
                raise
            except pickle.UnpicklingError as exc:
                raise ValueError(f"gmm file {path!r} is not a pickle file ({exc}); a compressed joblib file needs "
                                 "joblib installed") from None
    if not isinstance(obj, Mapping):
        raise TypeError(f"gmm file {path!r} holds a {type(obj).__name__}, expected the dict with keys "
                        f"{list(GMM_KEYS)}")
    return dict(obj)


def _sigma(init_noise_sigma, cls: str, mainline: str) -> torch.Tensor:
    """The initial sigma as the published ``torch.tensor(init_noise_sigma)``: a Python float in the default
    dtype, a numpy scalar or tensor in its own dtype (an int becomes a float: published, it fails)."""
    if isinstance(init_noise_sigma, torch.Tensor):
        if not init_noise_sigma.is_floating_point() or init_noise_sigma.numel() != 1:
            raise TypeError(f"{cls}: init_noise_sigma must be a number or a one-element floating tensor, got "
                            f"{init_noise_sigma.dtype} of shape {tuple(init_noise_sigma.shape)}")
        sigma = init_noise_sigma.detach().clone().reshape(())
    elif isinstance(init_noise_sigma, numbers.Real) and not isinstance(init_noise_sigma, bool):
        value = float(init_noise_sigma) if isinstance(init_noise_sigma, numbers.Integral) else init_noise_sigma
        sigma = torch.tensor(value)
        if not sigma.is_floating_point():
            sigma = sigma.to(torch.get_default_dtype())
    else:
        raise TypeError(f"{cls}: init_noise_sigma must be a number, got {type(init_noise_sigma).__name__}; this "
                        f"class takes the published order {cls}(init_noise_sigma, ...), the mainline order is "
                        f"imbreg_fast.nn.{mainline}")
    value = float(sigma)
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"{cls}: init_noise_sigma must be finite and nonzero, got {value}")
    return sigma


class _PublishedLoss(_Loss):
    """A published loss module: ``noise_sigma`` (``nn.Parameter``), ``forward(pred, target)``."""

    _mainline = ""

    def __init__(self, init_noise_sigma, backend: str):
        super().__init__()
        self.noise_sigma = nn.Parameter(_sigma(init_noise_sigma, type(self).__name__, self._mainline))
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend

    @property
    def noise_var(self) -> torch.Tensor:
        return self.noise_sigma ** 2

    def extra_repr(self) -> str:
        sigma = self.noise_sigma.detach()
        shown = f"{float(sigma):.4g}" if sigma.device.type != "meta" else "?"
        return f"noise_sigma={shown}, backend={self.backend!r}"


class BMCLoss(_PublishedLoss):
    """Published ``BMCLoss(init_noise_sigma)``: :func:`bmc_loss` with ``noise_var = noise_sigma ** 2``."""

    _mainline = "BMCLoss"

    def __init__(self, init_noise_sigma, *, backend: str = "auto"):
        super().__init__(init_noise_sigma, backend)

    def forward(self, pred, target):
        return bmc_loss(pred, target, self.noise_var, backend=self.backend)


class BMCLossMD(BMCLoss):
    """Published ``BMCLossMD(init_noise_sigma)`` (synthetic benchmark): :func:`bmc_loss_md`."""

    def forward(self, pred, target):
        return bmc_loss_md(pred, target, self.noise_var, backend=self.backend)


class GAILoss(_PublishedLoss):
    """Published ``GAILoss(init_noise_sigma, gmm)``: :func:`gai_loss` with ``noise_var = noise_sigma ** 2``.

    ``gmm``: the path of the joblib/pickle file ``preprocess_gmm.py`` writes (as published), or its dict.
    Converted once into the buffers ``gmm_means``, ``gmm_variances``, ``gmm_weights`` (their given shapes,
    float64 from numpy), so ``.to(device)`` moves them and ``state_dict`` saves them; ``gmm`` returns them
    as the published dict of tensors.
    """

    _mainline = "GAILoss"
    _md = False

    def __init__(self, init_noise_sigma, gmm, *, backend: str = "auto"):
        super().__init__(init_noise_sigma, backend)
        name = type(self).__name__
        g = _gmm_tensors(load_gmm(gmm) if isinstance(gmm, (str, os.PathLike)) else gmm, name)
        d = (g["means"].shape[1] if g["means"].dim() == 2 else 1) if self._md else None   # MD: checked again per call
        w, _, _ = _gmm_shapes(g, d, name)
        _mixture_weights("gmm['weights']", w)
        for key in GMM_KEYS:
            self.register_buffer(f"gmm_{key}", g[key].clone())

    @property
    def gmm(self) -> dict:
        """The mixture as the published module's ``gmm`` attribute: ``{'means', 'variances', 'weights'}``."""
        return {key: getattr(self, f"gmm_{key}") for key in GMM_KEYS}

    def forward(self, pred, target):
        return _gai(type(self).__name__, pred, target, self.gmm, self.noise_var, self._md, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", components={self.gmm_weights.numel()}"


class GAILossMD(GAILoss):
    """Published ``GAILossMD(init_noise_sigma, gmm)`` (synthetic benchmark): :func:`gai_loss_md`; ``gmm`` the
    dict (as published: ``means [K, d]``, full ``variances [K, d, d]``, ``weights [K]``) or its file."""

    _md = True


class BNILoss(_PublishedLoss):
    """Published ``BNILoss(init_noise_sigma, bucket_centers, bucket_weights)``: :func:`bni_loss`.

    The buckets (numpy arrays as ``get_bucket_info`` returns them, tensors or lists) become the buffers
    ``bucket_centers`` (int64 centres stay int64, as published) and ``bucket_weights`` (float64 from numpy).
    """

    _mainline = "BNILoss"

    def __init__(self, init_noise_sigma, bucket_centers, bucket_weights, *, backend: str = "auto"):
        super().__init__(init_noise_sigma, backend)
        centers = _real_tensor("bucket_centers", bucket_centers)
        weights = _float(_real_tensor("bucket_weights", bucket_weights))
        centers, weights = _bucket_shapes(centers, weights)
        _mixture_weights("bucket_weights", weights)
        if centers.is_floating_point() and not bool(torch.isfinite(centers).all()):
            raise ValueError("bucket_centers contain NaN or inf")
        self.register_buffer("bucket_centers", centers.clone())
        self.register_buffer("bucket_weights", weights.clone())

    def forward(self, pred, target):
        return bni_loss(pred, target, self.noise_var, self.bucket_centers, self.bucket_weights, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", buckets={self.bucket_weights.numel()}"
