"""Loss modules of imbreg_fast, owning the learnable noise scale sigma (``noise_sigma``).

Each module keeps ``noise_sigma`` as an ``nn.Parameter`` (or, with ``learn_noise=False``, as a buffer), so
it is saved in ``state_dict`` and follows ``.to(device/dtype)``. Give it to the optimiser, typically with
its own learning rate, as the reference does::

    criterion = imbreg_fast.nn.BMCLoss(init_noise_sigma=1.0)
    optimizer.add_param_group({"params": criterion.noise_sigma, "lr": sigma_lr})
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _reduction
from . import _validation as V
from . import functional as F
from .fds import FDS
from .ops.weighted_losses import ACTIVATIONS

__all__ = ["BMCLoss", "GAILoss", "BNILoss", "FDS", "WeightedMSELoss", "WeightedL1Loss", "WeightedHuberLoss",
           "WeightedFocalMSELoss", "WeightedFocalL1Loss", "RnCLoss", "ConRLoss", "RankSimLoss"]


class _BalancedMSELoss(nn.Module):
    def __init__(self, init_noise_sigma: float, learn_noise: bool, reduction: str, backend: str,
                 check_finite: bool):
        super().__init__()
        sigma = torch.tensor(V.check_positive("init_noise_sigma", init_noise_sigma))
        V.check_reduction(reduction)
        if learn_noise:
            self.noise_sigma = nn.Parameter(sigma)
        else:
            self.register_buffer("noise_sigma", sigma)
        self.reduction = reduction
        self.backend = backend
        self.check_finite = check_finite

    @property
    def noise_var(self) -> torch.Tensor:
        return self.noise_sigma * self.noise_sigma

    def extra_repr(self) -> str:
        sigma = self.noise_sigma.detach()
        shown = f"{float(sigma):.4g}" if sigma.device.type != "meta" else "?"
        return (f"noise_sigma={shown}, learn_noise="
                f"{isinstance(self.noise_sigma, nn.Parameter)}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


_COMPAT = "imbreg_fast.compat.balanced_mse"


def _is_number(x) -> bool:
    """A real scalar: a Python or numpy number (not a bool) or a 0-dim tensor."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _scalar_text(x) -> str:
    return f"{float(x):g}" if _is_number(x) else "..."


def _check_gai_arguments(gmm) -> None:
    """The published ``GAILoss(init_noise_sigma, gmm)`` order and GMM forms, refused with the fix."""
    if _is_number(gmm):
        raise TypeError(f"GAILoss(gmm, init_noise_sigma=1.0, ...) takes the mixture first, got a number for gmm "
                        f"({_scalar_text(gmm)}): this is the published order GAILoss(init_noise_sigma, gmm). Write "
                        f"GAILoss(gmm, init_noise_sigma={_scalar_text(gmm)}) with gmm = (weights [K], means [K, d], "
                        "covariances [K, d, d]) tensors (e.g. imbreg_fast.fit_gmm(train_labels, 8)), or keep the "
                        f"published call with {_COMPAT}.GAILoss(init_noise_sigma, gmm), which takes the published "
                        "joblib file or dict")
    got = V.published_gmm_form(gmm)
    if got is not None:
        raise TypeError(f"GAILoss: gmm must be (weights [K], means [K, d], covariances [K, d, d]) tensors, got {got}, "
                        "the published GMM file/dict (preprocess_gmm.py): use "
                        f"{_COMPAT}.GAILoss(init_noise_sigma, gmm), which loads it, or fit the prior with "
                        "imbreg_fast.fit_gmm(train_labels, K)")
    try:
        parts = len(gmm)
    except TypeError:
        parts = None
    if parts != 3:
        raise TypeError("GAILoss: gmm must be (weights [K], means [K, d], covariances [K, d, d]), e.g. "
                        f"imbreg_fast.fit_gmm(train_labels, K); got {type(gmm).__name__}"
                        + (f" of length {parts}" if parts is not None else ""))


def _check_bni_arguments(bin_centers) -> None:
    """The published ``BNILoss(init_noise_sigma, bucket_centers, bucket_weights)`` order, refused with the fix."""
    if _is_number(bin_centers):
        raise TypeError(f"BNILoss(bin_centers, bin_weights, init_noise_sigma=1.0, ...) takes the bins first, got a "
                        f"number for bin_centers ({_scalar_text(bin_centers)}): this is the published order "
                        "BNILoss(init_noise_sigma, bucket_centers, bucket_weights). Write BNILoss(bucket_centers, "
                        f"bucket_weights, init_noise_sigma={_scalar_text(bin_centers)}) (numpy arrays and integer "
                        f"centres are accepted), or keep the published call with {_COMPAT}.BNILoss")


class BMCLoss(_BalancedMSELoss):
    """Balanced MSE with batch Monte Carlo; see :func:`imbreg_fast.functional.bmc_loss`.

    ``forward(pred, target, *, candidates=None, mask=None)``.

    ``sync=True``: candidates from every process of ``process_group`` (default group), see
    :func:`imbreg_fast.functional.bmc_loss` and docs/methods.md §7.1. Under DistributedDataParallel the
    gradient of ``noise_sigma`` must be averaged like the model's: make the criterion a submodule of the
    wrapped module (its loss computed in that module's ``forward``), or all-reduce ``noise_sigma.grad``
    yourself; otherwise each process's sigma drifts apart.
    """

    def __init__(self, init_noise_sigma: float = 1.0, *, learn_noise: bool = True, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True, sync: bool = False, process_group=None):
        super().__init__(init_noise_sigma, learn_noise, reduction, backend, check_finite)
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        self.sync = sync
        self.process_group = process_group

    def forward(self, pred, target, *, candidates=None, mask=None):
        return F.bmc_loss(pred, target, self.noise_var, candidates=candidates, mask=mask,
                          reduction=self.reduction, backend=self.backend, check_finite=self.check_finite,
                          sync=self.sync, process_group=self.process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sync=True" if self.sync else "")


class GAILoss(_BalancedMSELoss):
    """Balanced MSE with GMM analytic integration; see :func:`imbreg_fast.functional.gai_loss`.

    ``gmm = (weights [K], means [K, d], covariances [K, d, d])`` (e.g. :func:`imbreg_fast.fit_gmm`) is stored
    as buffers ``gmm_weights``, ``gmm_means``, ``gmm_covariances``.
    """

    def __init__(self, gmm, init_noise_sigma: float = 1.0, *, learn_noise: bool = True, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True):
        _check_gai_arguments(gmm)
        super().__init__(init_noise_sigma, learn_noise, reduction, backend, check_finite)
        weights, means, covariances = (torch.as_tensor(x).detach().clone() for x in gmm)
        self.register_buffer("gmm_weights", weights)
        self.register_buffer("gmm_means", means)
        self.register_buffer("gmm_covariances", covariances)

    def forward(self, pred, target, *, mask=None):
        gmm = (self.gmm_weights, self.gmm_means, self.gmm_covariances)
        return F.gai_loss(pred, target, self.noise_var, gmm, mask=mask, reduction=self.reduction,
                          backend=self.backend, check_finite=self.check_finite)


class BNILoss(_BalancedMSELoss):
    """Balanced MSE with bin-based numerical integration; see :func:`imbreg_fast.functional.bni_loss`.

    ``bin_centers``/``bin_weights`` (e.g. from :func:`imbreg_fast.bin_prior`; tensors, numpy arrays or lists)
    are stored as buffers. Integer centres (the reference's ``get_bucket_info``) stay integer and are cast to
    the prediction's dtype at each call.
    """

    def __init__(self, bin_centers, bin_weights, init_noise_sigma: float = 1.0, *, learn_noise: bool = True,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True):
        _check_bni_arguments(bin_centers)
        super().__init__(init_noise_sigma, learn_noise, reduction, backend, check_finite)
        self.register_buffer("bin_centers", torch.as_tensor(bin_centers).detach().clone())
        self.register_buffer("bin_weights", torch.as_tensor(bin_weights).detach().clone())

    def forward(self, pred, target, *, mask=None):
        return F.bni_loss(pred, target, self.noise_var, self.bin_centers, self.bin_weights, mask=mask,
                          reduction=self.reduction, backend=self.backend, check_finite=self.check_finite)


# --------------------------------------------------------------------------------------------------
# Weighted regression losses (LDS re-weighting, Focal-R): see imbreg_fast.functional.
# --------------------------------------------------------------------------------------------------


class _WeightedLoss(nn.Module):
    _fn = None

    def __init__(self, reduction: str = "mean", backend: str = "auto", check_finite: bool = True, **options):
        super().__init__()
        V.check_reduction(reduction, _reduction.WEIGHTED_LOSS_REDUCTIONS)
        self.reduction, self.backend, self.check_finite, self.options = reduction, backend, check_finite, options

    def forward(self, pred, target, weight=None, *, mask=None):
        return type(self)._fn(pred, target, weight, mask=mask, reduction=self.reduction, backend=self.backend,
                              check_finite=self.check_finite, **self.options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"reduction={self.reduction!r}, backend={self.backend!r}{opts}"


class WeightedMSELoss(_WeightedLoss):
    """``forward(pred, target, weight=None, *, mask=None)``; see :func:`imbreg_fast.functional.weighted_mse_loss`."""
    _fn = staticmethod(F.weighted_mse_loss)


class WeightedL1Loss(_WeightedLoss):
    """See :func:`imbreg_fast.functional.weighted_l1_loss`."""
    _fn = staticmethod(F.weighted_l1_loss)


class WeightedHuberLoss(_WeightedLoss):
    """See :func:`imbreg_fast.functional.weighted_huber_loss`."""
    _fn = staticmethod(F.weighted_huber_loss)

    def __init__(self, beta: float = 1.0, *, reduction: str = "mean", backend: str = "auto", check_finite: bool = True):
        super().__init__(reduction, backend, check_finite, beta=V.check_positive("beta", beta))


class _WeightedFocalLoss(_WeightedLoss):
    def __init__(self, activation: str = "sigmoid", beta: float = 0.2, gamma: float = 1.0, *, reduction: str = "mean",
                 backend: str = "auto", check_finite: bool = True):
        super().__init__(reduction, backend, check_finite, activation=V.check_choice("activation", activation, ACTIVATIONS),
                         beta=V.check_positive("beta", beta), gamma=V.check_nonnegative("gamma", gamma))


class WeightedFocalMSELoss(_WeightedFocalLoss):
    """Focal-R MSE; see :func:`imbreg_fast.functional.weighted_focal_mse_loss`."""
    _fn = staticmethod(F.weighted_focal_mse_loss)


class WeightedFocalL1Loss(_WeightedFocalLoss):
    """Focal-R L1; see :func:`imbreg_fast.functional.weighted_focal_l1_loss`."""
    _fn = staticmethod(F.weighted_focal_l1_loss)



class RnCLoss(nn.Module):
    """Rank-N-Contrast loss; ``forward(features, labels)``: see :func:`imbreg_fast.functional.rnc_loss`.

    Defaults are the paper's: ``temperature=2``, L1 label distance, negative L2 feature distance, mean over the
    n (n - 1) pairs. ``features`` [B, 2, d] (two views, as published) or [n, d]."""

    def __init__(self, temperature: float = 2.0, label_distance: str = "l1", feature_similarity: str = "l2", *,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True):
        super().__init__()
        self.temperature = V.check_positive("temperature", temperature)
        self.label_distance = V.check_choice("label_distance", label_distance, F.RNC_LABEL_DISTANCES)
        self.feature_similarity = V.check_choice("feature_similarity", feature_similarity,
                                                 F.RNC_FEATURE_SIMILARITIES)
        V.check_reduction(reduction)
        self.reduction, self.backend, self.check_finite = reduction, backend, check_finite

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.rnc_loss(features, labels, temperature=self.temperature, label_distance=self.label_distance,
                          feature_similarity=self.feature_similarity, reduction=self.reduction,
                          backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, label_distance={self.label_distance!r}, "
                f"feature_similarity={self.feature_similarity!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class ConRLoss(nn.Module):
    """ConR regulariser: ``forward(features, targets, preds, weights=None)``; see
    :func:`imbreg_fast.functional.conr_loss`.

    The paper's defaults: window w = 1, temperature tau = 0.07 (the value the published AgeDB code uses),
    pushing e = 0.01; the published training adds ``beta * ConR`` with beta = 4 to the regression loss (beta
    is not part of this module: multiply the result). ``published_denominator=True`` reproduces the published
    code's extra n - |P_i| in each denominator.
    """

    def __init__(self, window: float = 1.0, temperature: float = 0.07, pushing: float = 0.01, *,
                 published_denominator: bool = True, reduction: str = "mean", backend: str = "auto",
                 check_finite: bool = True):
        super().__init__()
        self.window = V.check_nonnegative("window", window)
        self.temperature = V.check_positive("temperature", temperature)
        self.pushing = V.check_real("pushing", pushing)
        self.published_denominator = published_denominator
        V.check_reduction(reduction)
        self.reduction, self.backend, self.check_finite = reduction, backend, check_finite

    def forward(self, features, targets, preds, weights=None):
        return F.conr_loss(features, targets, preds, weights=weights, window=self.window,
                           temperature=self.temperature, pushing=self.pushing,
                           published_denominator=self.published_denominator, reduction=self.reduction,
                           backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"window={self.window}, temperature={self.temperature}, pushing={self.pushing}, "
                f"published_denominator={self.published_denominator}, reduction={self.reduction!r}")


class RankSimLoss(nn.Module):
    """RankSim regulariser times its balancing weight: ``gamma * ranksim_loss(features, targets, ...)``
    (paper defaults gamma = 100, lambda = 2; see :func:`imbreg_fast.functional.ranksim_loss`).

    gamma multiplies the loss, as the published training code (``loss += gamma * regularizer``): the
    blackbox gradient then sees an incoming gradient of gamma, which sets the size of its perturbation —
    RankSim's gradient is NOT linear in the incoming gradient, so gamma (and any loss scale, accumulation
    division or DDP averaging applied after this module) changes the gradient's direction, not only its
    size. ``forward(features, targets, generator=None)``."""

    def __init__(self, gamma: float = 100.0, interpolation_lambda: float = 2.0, *, subsample="unique_labels",
                 reduction: str = "sum", backend: str = "auto", check_finite: bool = True):
        super().__init__()
        self.gamma = V.check_real("gamma", gamma)
        self.interpolation_lambda = V.check_positive("interpolation_lambda", interpolation_lambda)
        V.check_reduction(reduction)
        if not (subsample is None or (isinstance(subsample, str) and subsample == "unique_labels")):
            raise ValueError(f"subsample must be 'unique_labels' or None for the module (pass an index tensor to "
                             f"imbreg_fast.functional.ranksim_loss), got {subsample!r}")
        self.subsample, self.reduction, self.backend, self.check_finite = subsample, reduction, backend, check_finite

    def forward(self, features, targets, generator=None):
        return self.gamma * F.ranksim_loss(features, targets, interpolation_lambda=self.interpolation_lambda,
                                           subsample=self.subsample, generator=generator, reduction=self.reduction,
                                           backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, interpolation_lambda={self.interpolation_lambda}, subsample={self.subsample!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


