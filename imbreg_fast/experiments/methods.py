"""The DIR methods as training recipes, shared by ``train depth`` and ``train tabular``.

One method = one way to train the same model on the same batches. Every method here is built from the
library (:mod:`imbreg_fast.functional`, :mod:`imbreg_fast.nn`, :class:`imbreg_fast.FDS`,
:mod:`imbreg_fast.lds`, :mod:`imbreg_fast.priors`, :mod:`imbreg_fast.reg_cls`, :mod:`imbreg_fast.optim`,
:mod:`imbreg_fast.rrt`) and passes ``backend=`` to every library call.

Layouts (what a training batch ``(x, y, mask)`` looks like):

- dense: ``y`` ``[B, 1, H, W]`` (one label per pixel), ``mask`` bool ``[B, 1, H, W]`` (valid pixels) or None;
  the encoder gives features ``[B, C, h, w]`` (``h, w`` = ``H, W`` or an integer fraction of them);
- rows: ``y`` ``[B, 1]`` (one label per row), ``mask`` bool ``[B, 1]`` or None; features ``[B, C]``.

The model contract: ``model_factory(out_channels) -> nn.Module`` with two submodules, ``model.encoder``
(``x -> features``, channels at dim 1) and ``model.head`` (``features -> output``, ``out_channels`` channels
at dim 1, the labels' spatial shape). Channel 0 of the output is the prediction; reg+cls asks for
``1 + num_classes`` channels, channels 1.. being the class logits. ``model(x)`` must equal
``model.head(model.encoder(x))``: FDS is inserted between the two (``encoder -> FDS -> head``), and RRT
re-trains the head alone.

Methods (:data:`METHODS`: CLI name -> display name):

- ``mse`` "MSE": plain (masked) MSE, :func:`~imbreg_fast.functional.weighted_mse_loss`.
- ``lds`` "LDS (inv-sqrt weighted MSE)": MSE weighted by :class:`~imbreg_fast.lds.LabelWeights` (``sqrt_inv``
  of the LDS-smoothed label density).
- ``fds`` "FDS (full cov.)": MSE on features re-coloured by :class:`~imbreg_fast.FDS` (full covariance);
  statistics accumulated at every step, folded at the end of every epoch.
- ``bmc`` "BMC (sampled candidates)": :class:`~imbreg_fast.nn.BMCLoss`. A batch with more than
  ``bmc_candidates`` label rows (a dense map) gets that many candidates, drawn with replacement from its
  valid labels; a smaller batch uses its own labels.
- ``gai`` "GAI": :class:`~imbreg_fast.nn.GAILoss`, prior :func:`~imbreg_fast.fit_gmm`.
- ``bni`` "BNI": :class:`~imbreg_fast.nn.BNILoss`, prior :func:`~imbreg_fast.bin_prior`.
- ``regcls`` "reg+cls": MSE plus a class-balanced cross-entropy (:class:`~imbreg_fast.RegClsLoss`).
- ``bsam`` "BSAM": SAM around Adam (:class:`~imbreg_fast.BSAM`), ``sqrt_inv``-weighted MSE in both passes
  (the published recipe).
- ``rrt`` "RRT": regressor re-training. Stage one is the MSE run's model; its encoder is frozen
  (:func:`imbreg_fast.rrt.freeze_for_retraining`), its head re-initialised and re-trained with LDS-smoothed
  inverse weights (``MethodConfig.rrt_scheme``).

Use::

    priors = fit_priors(train_y, train_mask, MethodConfig(), methods=names)    # once, from the training labels
    mse = build("mse", priors, model_factory, device=dev, backend="auto", total_steps=epochs * steps)
    train(mse, lambda epoch: batches(epoch), epochs)                           # run.step / run.end_epoch
    pred = mse.predict(x_test)                                                 # channel 0, eval mode
    rrt = build("rrt", priors, model_factory, pretrained=mse.model, ...)       # stage two of RRT

The steps add no host synchronisation of their own: the library calls get ``check_finite=False`` (the labels
are validated once, when the priors are fitted), and :func:`train` reads the summed loss once per epoch,
stopping with an error on a non-finite loss.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dispatch
from .. import nn as inn
from ..fds import FDS
from ..functional import weighted_mse_loss
from ..lds import LabelWeights, bin_edges, label_histogram
from ..optim import BSAM, bsam_step
from ..priors import GMM, bin_prior, fit_gmm
from ..reg_cls import ClassBins, RegClsLoss
from ..rrt import freeze_for_retraining

__all__ = ["METHODS", "METHOD_OPS", "REFERENCE", "MethodConfig", "LabelPriors", "MethodRun", "TrainResult",
           "parse_methods", "fit_priors", "build", "train", "evaluate", "labels_at", "method_backends"]

METHODS: dict[str, str] = {
    "mse": "MSE",
    "lds": "LDS (inv-sqrt weighted MSE)",
    "fds": "FDS (full cov.)",
    "bmc": "BMC (sampled candidates)",
    "gai": "GAI",
    "bni": "BNI",
    "regcls": "reg+cls",
    "bsam": "BSAM",
    "rrt": "RRT",
}
"""CLI name -> display name, in the order the experiments run and print them."""

METHOD_OPS: dict[str, tuple[str, ...]] = {
    "mse": ("weighted_regression_loss",),
    "lds": ("weighted_regression_loss",),
    "fds": ("fds_recolor", "fds_accumulate", "weighted_regression_loss"),
    "bmc": ("bmc_loss",),
    "gai": ("gai_loss",),
    "bni": ("bni_loss",),
    "regcls": ("weighted_regression_loss",),
    "bsam": ("weighted_regression_loss",),
    "rrt": ("weighted_regression_loss",),
}
"""The library ops (public dispatch names) each method's training step calls; the first is the one that
characterises the method (its backend is the method's backend in the reports)."""


REFERENCE: dict[str, str] = {
    "mse": "published weighted MSE, per-pixel weights (ones) built on the host",
    "lds": "published weighted MSE, per-pixel LDS weights looked up on the host (Python loop)",
    "fds": "per-bin Python loops: masked accumulate + masked re-colouring, full covariance",
    "bmc": "published-style BMC, [N, 1 + M] logits materialised",
    "gai": "published GAI, [N, K] terms materialised",
    "bni": "published BNI, [N, K] terms materialised",
    "bsam": "BSAM with the published weighted MSE and host-side per-pixel weights, both passes",
    "rrt": "published weighted MSE, per-pixel inverse weights looked up on the host (Python loop)",
}
"""The methods whose training step has a published formulation (``build(..., reference=True)``), and what
that formulation is (:mod:`.published`). reg+cls has none here: its published code is ours plus a
per-sample class lookup."""


def parse_methods(text: str) -> list[str]:
    """``'mse,bmc'`` -> ``['mse', 'bmc']`` (order of :data:`METHODS`, duplicates dropped); ``ValueError``
    naming the unknown names and listing the valid ones."""
    if not isinstance(text, str):
        raise TypeError(f"methods must be a comma-separated string, got {type(text).__name__}")
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no method given; choose among {','.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"valid names: {','.join(METHODS)}")
    return [n for n in METHODS if n in names]


# --------------------------------------------------------------------------------------------------
# configuration and priors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters of the methods (one set for all of them; the defaults follow the published code
    where it has one).

    Optimisation: Adam with learning rate ``lr`` and ``weight_decay`` for the model, cosine-annealed over
    ``total_steps`` when :func:`build` is given them; the learnable noise scale sigma of BMC/GAI/BNI has its
    own ``sigma_lr`` (no decay), starting at ``init_noise_sigma`` (in label units).

    Label grid: ``bins`` equal-width bins over ``label_range`` (default: the training labels' min and max);
    LDS, FDS, BNI and reg+cls all bin on it. LDS: window ``lds_kernel``/``lds_ks``/``lds_sigma`` with
    boundary ``lds_mode`` ('constant' as the age code, 'reflect' as the depth code); ``inv_clip`` clamps the
    counts of the ``'inv'`` scheme (RRT; the reference's (5, 1000) for ages, None for depth pixel counts).
    FDS: ``fds_*`` as :class:`imbreg_fast.FDS`. BMC: ``bmc_candidates`` (M) candidates per batch.
    GAI: ``gmm_components`` fitted on at most ``gmm_samples`` training labels (a seeded subsample).
    reg+cls: ``regcls_classes`` equalised classes, weight ``regcls_lam``. BSAM: radius ``bsam_rho``.
    RRT: ``rrt_scheme`` of the re-training weights (LDS-smoothed), ``rrt_batchnorm`` for the frozen
    encoder's normalisation layers (see :func:`imbreg_fast.rrt.freeze_for_retraining`).
    """
    lr: float = 1e-3
    weight_decay: float = 0.0
    bins: int = 100
    label_range: Optional[tuple[float, float]] = None
    lds_kernel: str = "gaussian"
    lds_ks: int = 5
    lds_sigma: float = 2.0
    lds_mode: str = "constant"
    inv_clip: Optional[tuple[float, float]] = (5.0, 1000.0)
    fds_kernel: str = "gaussian"
    fds_ks: int = 5
    fds_sigma: float = 2.0
    fds_momentum: float = 0.9
    fds_start_update: int = 0
    fds_start_smooth: int = 1
    fds_eps: float = 1e-5
    init_noise_sigma: float = 1.0
    learn_noise: bool = True
    sigma_lr: float = 1e-2
    bmc_candidates: int = 1024
    gmm_components: int = 8
    gmm_samples: int = 20000
    regcls_classes: int = 10
    regcls_lam: float = 1.0
    bsam_rho: float = 0.05
    rrt_scheme: str = "inv"
    rrt_batchnorm: str = "eval"

    def __post_init__(self):
        for name in ("lr", "sigma_lr", "init_noise_sigma", "lds_sigma", "fds_sigma", "fds_eps", "regcls_lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"MethodConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "bsam_rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"MethodConfig.{name} must be >= 0, got {value!r}")
        for name, minimum in (("bins", 2), ("bmc_candidates", 1), ("gmm_components", 1), ("gmm_samples", 2),
                              ("regcls_classes", 2), ("lds_ks", 1), ("fds_ks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"MethodConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.rrt_scheme not in ("inv", "sqrt_inv"):
            raise ValueError(f"MethodConfig.rrt_scheme must be 'inv' or 'sqrt_inv', got {self.rrt_scheme!r}")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LabelPriors:
    """What the methods fit on the training labels, once (:func:`fit_priors`); tables on the labels' device.

    ``edges [K + 1]`` and ``counts [K]`` (training labels per bin of the label grid, float64); the fitted
    objects are None for the methods not asked for: ``lds_weights`` (sqrt_inv + LDS), ``sqinv_weights``
    (sqrt_inv, no LDS: BSAM), ``rrt_weights`` (``rrt_scheme`` + LDS), ``gmm`` (GAI), ``bni_prior``
    (``(centers, weights)``), ``class_bins`` (reg+cls).
    """
    config: MethodConfig
    edges: torch.Tensor
    counts: torch.Tensor
    num_labels: int
    lds_weights: Optional[LabelWeights] = None
    sqinv_weights: Optional[LabelWeights] = None
    rrt_weights: Optional[LabelWeights] = None
    gmm: Optional[GMM] = None
    bni_prior: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    class_bins: Optional[ClassBins] = None
    fitted: tuple[str, ...] = field(default_factory=tuple)

    @property
    def range(self) -> tuple[float, float]:
        return float(self.edges[0]), float(self.edges[-1])


def fit_priors(labels: torch.Tensor, mask: Optional[torch.Tensor] = None, config: MethodConfig = MethodConfig(),
               *, methods: Sequence[str] = tuple(METHODS), seed: int = 0) -> LabelPriors:
    """Fit, on the training labels (any shape; the kept ones when ``mask`` is given), what ``methods`` need:
    the label grid and its counts always, LDS / SQINV / RRT weight tables, the GAI mixture (on a seeded
    subsample of at most ``config.gmm_samples`` labels), the BNI histogram prior and the reg+cls classes.
    Validates the labels (finite where kept, at least two distinct values): the training steps then skip
    the library's value checks."""
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a MethodConfig, got {type(config).__name__}")
    methods = parse_methods(",".join(methods)) if not isinstance(methods, str) else parse_methods(methods)
    if not isinstance(labels, torch.Tensor) or not labels.is_floating_point():
        raise TypeError("labels must be a floating torch.Tensor")
    kept = labels.detach().reshape(-1) if mask is None else labels.detach()[mask].reshape(-1)
    if kept.numel() < 2:
        raise ValueError(f"need at least 2 (kept) training labels, got {kept.numel()}")
    if not bool(torch.isfinite(kept).all()):
        raise ValueError("training labels contain NaN or inf at kept positions")
    if config.label_range is None:
        lo, hi = float(kept.min()), float(kept.max())
        if not hi > lo:
            raise ValueError(f"all training labels equal {lo}: set MethodConfig.label_range")
    else:
        lo, hi = (float(v) for v in config.label_range)
    edges = bin_edges(config.bins, (lo, hi), device=labels.device)
    counts = label_histogram(kept, edges, check_finite=False)
    priors = LabelPriors(config, edges, counts, kept.numel())
    lds = dict(lds=True, kernel=config.lds_kernel, ks=config.lds_ks, sigma=config.lds_sigma, mode=config.lds_mode)
    fitted = []
    if "lds" in methods:
        priors.lds_weights = LabelWeights(edges, scheme="sqrt_inv", **lds).fit_counts(counts)
        fitted.append("lds_weights")
    if "bsam" in methods:
        priors.sqinv_weights = LabelWeights(edges, scheme="sqrt_inv", lds=False).fit_counts(counts)
        fitted.append("sqinv_weights")
    if "rrt" in methods:
        clip = config.inv_clip if config.rrt_scheme == "inv" else (5, 1000)
        priors.rrt_weights = LabelWeights(edges, scheme=config.rrt_scheme, clip=clip, **lds).fit_counts(counts)
        fitted.append("rrt_weights")
    if "gai" in methods:
        sample = kept
        if kept.numel() > config.gmm_samples:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(kept.numel(), generator=gen)[:config.gmm_samples].to(kept.device)
            sample = kept[idx]
        priors.gmm = fit_gmm(sample, config.gmm_components, seed=seed, dtype=labels.dtype)
        fitted.append("gmm")
    if "bni" in methods:
        priors.bni_prior = bin_prior(kept, edges, dtype=labels.dtype)
        fitted.append("bni_prior")
    if "regcls" in methods:
        priors.class_bins = ClassBins.from_histogram(counts, edges, config.regcls_classes)
        fitted.append("class_bins")
    priors.fitted = tuple(fitted)
    return priors


# --------------------------------------------------------------------------------------------------
# labels at the feature resolution (FDS)
# --------------------------------------------------------------------------------------------------


def labels_at(features: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """The labels (and mask) at the resolution of ``features``, for FDS.

    Rows (``features [B, C]``): the labels as ``[B]`` (mask ``[B]``). Dense (``features [B, C, h, w]``,
    ``labels [B, 1, H, W]``): unchanged when ``(h, w) == (H, W)``; otherwise ``H, W`` must be integer
    multiples ``(k_h h, k_w w)`` and each feature pixel gets the mean of the valid labels of its
    ``k_h x k_w`` block (``avg_pool2d`` of ``label * mask`` over ``avg_pool2d`` of ``mask``), valid when the
    block holds at least one valid label. The mean (not the nearest label) keeps every valid pixel's label
    in play; across a depth edge it gives an intermediate depth, which FDS then bins like any other.
    """
    if features.dim() == 2:
        return labels.reshape(-1), None if mask is None else mask.reshape(-1)
    if features.dim() != 4 or labels.dim() != 4 or labels.shape[1] != 1:
        raise ValueError(f"dense features [B, C, h, w] need labels [B, 1, H, W]; got features "
                         f"{tuple(features.shape)} and labels {tuple(labels.shape)}")
    (h, w), (big_h, big_w) = features.shape[-2:], labels.shape[-2:]
    if (h, w) == (big_h, big_w):
        return labels, mask
    if big_h % h or big_w % w:
        raise ValueError(f"the labels' resolution {big_h}x{big_w} is not an integer multiple of the features' "
                         f"{h}x{w}")
    k = (big_h // h, big_w // w)
    if mask is None:
        return F.avg_pool2d(labels, k), None
    m = mask.to(labels.dtype)
    total = F.avg_pool2d(torch.where(mask, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)), k)
    share = F.avg_pool2d(m, k)
    return total / share.clamp_min(1.0 / (k[0] * k[1])), share > 0


# --------------------------------------------------------------------------------------------------
# one method's training state
# --------------------------------------------------------------------------------------------------


def method_backends(name: str, device: torch.device, backend: str) -> dict[str, str]:
    """The backend each library op of method ``name`` dispatches to for ``backend`` on ``device``."""
    probe = torch.empty(0, device=device)
    return {op: _dispatch.selected_backend(probe, op, backend) for op in METHOD_OPS[name]}


class MethodRun:
    """One method's model, criterion, optimiser and statistics: built by :func:`build`.

    Attributes: ``name`` (CLI name), ``display``, ``model`` (``encoder`` + ``head``), ``fds`` (FDS only),
    ``criterion`` (the loss module when there is one), ``optimizer`` (Adam, or a BSAM around Adam),
    ``scheduler`` (cosine, or None), ``backend`` (as requested), ``device``, ``steps`` (taken so far).

    - :meth:`step` ``(x, y, mask=None)``: one full training step (forward, loss, backward, optimiser step;
      FDS accumulation; BSAM's two passes); returns the detached loss (no host sync).
    - :meth:`end_epoch`: FDS's end-of-epoch update (a no-op for the other methods).
    - :meth:`predict` ``(x)``: channel 0 of the model's output in eval mode, without gradient.
    - :meth:`backends`: ``{op: backend}`` actually dispatched to, for each library op of the method.
    """

    def __init__(self, name: str, priors: LabelPriors, model: nn.Module, *, device: torch.device, backend: str,
                 total_steps: Optional[int], seed: int, fds: Optional[FDS] = None,
                 criterion: Optional[nn.Module] = None, params: Optional[list] = None):
        self.name, self.display = name, METHODS[name]
        self.priors, self.config = priors, priors.config
        self.model, self.fds, self.criterion = model, fds, criterion
        self.device, self.backend = device, backend
        self.steps = 0
        self.generator = torch.Generator(device=device).manual_seed(seed)
        cfg = self.config
        trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": trainable, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        sigma = getattr(criterion, "noise_sigma", None)
        if isinstance(sigma, nn.Parameter):
            groups.append({"params": [sigma], "lr": cfg.sigma_lr, "weight_decay": 0.0})
        if name == "bsam":
            self.optimizer = BSAM(groups, torch.optim.Adam, rho=cfg.bsam_rho)
            base = self.optimizer.base_optimizer
        else:
            self.optimizer = torch.optim.Adam(groups)
            base = self.optimizer
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=total_steps)
                          if total_steps else None)
        self._mse = functools.partial(weighted_mse_loss, backend=backend, check_finite=False)

    def __repr__(self) -> str:
        return f"MethodRun({self.name!r}, backend={self.backend!r}, steps={self.steps})"

    # ---- pieces -----------------------------------------------------------------------------------

    def _output(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        features = self.model.encoder(x)
        if self.fds is not None:
            fy, fm = labels_at(features, y, mask)
            self.fds.accumulate(features, fy, fm)          # raw features, no grad
            features = self.fds(features, fy, fm)          # re-coloured from epoch start_smooth on
        return self.model.head(features)

    def _weights(self, table: LabelWeights, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return table.weights(y, mask)

    def _candidates(self, y: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """BMC's candidate labels: None (the batch's own labels) when the batch has at most
        ``bmc_candidates`` label rows, else that many drawn with replacement from its valid labels."""
        m = self.config.bmc_candidates
        flat = y.reshape(-1)
        if flat.numel() <= m:
            return None
        if mask is None:
            idx = torch.randint(flat.numel(), (m,), generator=self.generator, device=flat.device)
        else:
            # valid labels with probability ~1; the tiny floor keeps an all-invalid batch from raising
            prob = mask.reshape(-1).to(flat.dtype).add_(1e-12)
            idx = torch.multinomial(prob, m, replacement=True, generator=self.generator)
        return flat[idx]

    def _loss(self, out: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        pred = out[:, :1]
        name, priors = self.name, self.priors
        if name in ("mse", "fds"):
            return self._mse(pred, y, mask=mask)
        if name == "lds":
            return self._mse(pred, y, self._weights(priors.lds_weights, y, mask), mask=mask)
        if name == "rrt":
            return self._mse(pred, y, self._weights(priors.rrt_weights, y, mask), mask=mask)
        if name == "regcls":
            return self.criterion(pred, out[:, 1:], y, mask=mask, generator=self.generator)
        flat_mask = None if mask is None else mask.reshape(-1)
        if name == "bmc":
            return self.criterion(pred.reshape(-1), y.reshape(-1), candidates=self._candidates(y, mask),
                                  mask=flat_mask)
        return self.criterion(pred.reshape(-1), y.reshape(-1), mask=flat_mask)     # gai, bni

    # ---- public -----------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One training step on the batch ``(x, y, mask)``; returns the loss (detached)."""
        self.model.train()
        if self.name == "bsam":
            w = self._weights(self.priors.sqinv_weights, y, mask)
            loss = bsam_step(self.optimizer,
                             lambda weights: self._mse(self._output(x, y, mask)[:, :1], y, weights, mask=mask), w, w)
        else:
            loss = self._loss(self._output(x, y, mask), y, mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss = loss.detach()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        return loss

    def end_epoch(self) -> None:
        """End of an epoch: FDS folds the epoch's statistics and recomputes its transforms."""
        if self.fds is not None:
            self.fds.update()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Channel 0 of the output (``[B, 1, ...]``) in eval mode (FDS is the identity there)."""
        self.model.eval()
        return self.model.head(self.model.encoder(x))[:, :1]

    def backends(self) -> dict[str, str]:
        """``{op: backend}`` for each library op of the method (:data:`METHOD_OPS`)."""
        return method_backends(self.name, self.device, self.backend)

    @property
    def noise_sigma(self) -> Optional[float]:
        """The (learned) noise scale of BMC / GAI / BNI, else None (reads the value: a host sync)."""
        sigma = getattr(self.criterion, "noise_sigma", None)
        return None if sigma is None else float(sigma.detach())


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
    for part in ("encoder", "head"):
        if not isinstance(getattr(model, part, None), nn.Module):
            raise TypeError(f"the model must have a submodule .{part} (the contract: model.head(model.encoder(x)) "
                            f"is the output); {type(model).__name__} has none")


def _feature_dim(model: nn.Module, feature_dim: Optional[int]) -> int:
    if feature_dim is None:
        feature_dim = getattr(model, "feature_dim", None)
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError("FDS needs the encoder's number of feature channels: pass feature_dim= to build() or "
                         f"give the model an int attribute feature_dim (got {feature_dim!r})")
    return feature_dim


def build(name: str, priors: LabelPriors, model_factory: Callable[[int], nn.Module], *,
          device: torch.device | str = "cpu", backend: str = "auto", total_steps: Optional[int] = None,
          seed: int = 0, feature_dim: Optional[int] = None, pretrained: Optional[nn.Module] = None,
          reference: bool = False) -> MethodRun:
    """A ready-to-train :class:`MethodRun` for method ``name``.

    Args:
        name: a key of :data:`METHODS`.
        priors: from :func:`fit_priors` (with ``name`` among its methods).
        model_factory: ``out_channels -> nn.Module`` with ``.encoder`` and ``.head`` (module docstring). It is
            called under ``torch.manual_seed(seed)`` (in a forked RNG state), so every method starts from
            the same initial weights (reg+cls differs only in its wider last layer). Not called for RRT.
        device: where the model, the criterion and the statistics live.
        backend: the library backend of every op (``'auto'``, ``'torch'``, ``'cpp'``, ``'triton'``).
        total_steps: cosine-anneal the learning rate to 0 over this many steps (None: constant rate).
        seed: model initialisation and the method's own draws (BMC candidates, reg+cls balancing).
        feature_dim: FDS only: the encoder's channels (default: ``model.feature_dim``).
        pretrained: RRT only (required): the stage-one model (e.g. ``build('mse', ...).model`` after
            training). It is deep-copied; the copy's encoder is frozen and its head re-initialised.
        reference: the same step with the published formulation (:data:`REFERENCE`, from :mod:`.published`)
            instead of the library's ops: the baseline of the step timings. Same model, optimiser, priors and
            draws; the published code has no validity mask, so masked-out elements enter as weight 0 (the
            weighted losses) or are dropped by boolean indexing (Balanced MSE). The host-side per-pixel
            weights need a label grid of equal bins starting at 0 (as the depth code's 0.1 m buckets).
            Methods without a published formulation raise ``ValueError``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {','.join(METHODS)}")
    if not isinstance(priors, LabelPriors):
        raise TypeError(f"priors must be a LabelPriors (from fit_priors), got {type(priors).__name__}")
    needs = {"lds": "lds_weights", "bsam": "sqinv_weights", "rrt": "rrt_weights", "gai": "gmm",
             "bni": "bni_prior", "regcls": "class_bins"}
    if name in needs and needs[name] not in priors.fitted:
        raise ValueError(f"method {name!r} needs priors fitted with it: fit_priors(..., methods=[..., {name!r}])")
    if reference and name not in REFERENCE:
        raise ValueError(f"method {name!r} has no published formulation to compare with (those that have: "
                         f"{','.join(REFERENCE)})")
    if reference and name in ("lds", "bsam", "rrt"):
        _reference_buckets(priors)                                                      # fail early
    run_type = _ReferenceRun if reference else MethodRun
    device = torch.device(device)
    _dispatch.selected_backend(torch.empty(0, device=device), METHOD_OPS[name][0], backend)   # fail early
    cfg = priors.config
    priors_on = lambda t: t.to(device)  # noqa: E731

    if name == "rrt":
        if pretrained is None:
            raise ValueError("rrt re-trains the head of a stage-one model: pass pretrained= (e.g. the trained "
                             "MSE run's .model)")
        _check_model(pretrained)
        model = copy.deepcopy(pretrained).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = freeze_for_retraining(model, model.head, batchnorm=cfg.rrt_batchnorm)
        priors.rrt_weights.to(device)
        return run_type(name, priors, model, device=device, backend=backend, total_steps=total_steps, seed=seed,
                         params=params)
    if pretrained is not None:
        raise ValueError(f"pretrained= is for rrt only, not {name!r}")

    extra = priors.class_bins.num_classes if name == "regcls" else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory(1 + extra)
    _check_model(model)
    model = model.to(device)

    fds = criterion = None
    sigma = dict(init_noise_sigma=cfg.init_noise_sigma, learn_noise=cfg.learn_noise, backend=backend,
                 check_finite=False)
    if name == "fds":
        fds = FDS(_feature_dim(model, feature_dim), priors.edges.cpu(), covariance="full", kernel=cfg.fds_kernel,
                  ks=cfg.fds_ks, sigma=cfg.fds_sigma, momentum=cfg.fds_momentum, eps=cfg.fds_eps,
                  start_update=cfg.fds_start_update, start_smooth=cfg.fds_start_smooth, backend=backend,
                  check_finite=False).to(device)
    elif name == "bmc":
        criterion = inn.BMCLoss(**sigma)
    elif name == "gai":
        criterion = inn.GAILoss(tuple(priors_on(t) for t in priors.gmm), **sigma)
    elif name == "bni":
        centers, weights = priors.bni_prior
        criterion = inn.BNILoss(priors_on(centers), priors_on(weights), **sigma)
    elif name == "regcls":
        regression = functools.partial(weighted_mse_loss, backend=backend, check_finite=False)
        criterion = RegClsLoss(regression, copy.deepcopy(priors.class_bins), lam=cfg.regcls_lam, check_finite=False)
    elif name == "lds":
        priors.lds_weights.to(device)
    elif name == "bsam":
        priors.sqinv_weights.to(device)
    if criterion is not None:
        criterion = criterion.to(device)
    return run_type(name, priors, model, device=device, backend=backend, total_steps=total_steps, seed=seed,
                     fds=fds, criterion=criterion)


def _reference_buckets(priors: LabelPriors) -> float:
    """Buckets per label unit of the published per-pixel lookup (equal bins from 0), or ``ValueError``."""
    edges = priors.edges
    width = (edges[1:] - edges[:-1]).double()
    if float(edges[0]) != 0.0 or not bool(torch.allclose(width, width[0].expand_as(width), rtol=1e-9, atol=0.0)):
        raise ValueError("the published per-pixel weight lookup needs equal-width label bins starting at 0 "
                         f"(MethodConfig.label_range=(0, hi)); got edges from {float(edges[0])} to {float(edges[-1])}")
    return 1.0 / float(width[0])


class _ReferenceRun(MethodRun):
    """:class:`MethodRun` with the published formulation of the method's loss / weights / FDS
    (``build(..., reference=True)``); see :data:`REFERENCE`."""

    def _weights(self, table: LabelWeights, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        from . import published
        w = published.published_batch_pixel_weights(y.float(), table.bin_weights.float(),
                                                     buckets_per_unit=_reference_buckets(self.priors))
        return w if mask is None else w * mask

    def _output(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.fds is None:
            return super()._output(x, y, mask)
        from . import published
        from ..lds import bin_index
        fds = self.fds
        features = self.model.encoder(x)
        if features.dim() != 4:
            raise ValueError("the reference FDS loops take dense [B, C, H, W] features")
        fy, fm = labels_at(features, y, mask)
        nb = fds.num_bins
        bins = bin_index(fy, fds.edges)                  # masked pixels go to an extra identity bin nb
        if fm is not None:
            bins = bins.masked_fill(~fm, nb)
        bins = bins.reshape(features.shape[0], -1)
        published.accumulate_masked_loop(features.detach(), bins, nb + 1, full=True)
        if int(fds.epoch) >= fds.start_smooth:
            c = features.shape[1]
            eye = torch.eye(c, dtype=features.dtype, device=features.device).unsqueeze(0)
            transform = torch.cat([fds.transform.to(features.dtype), eye])
            shift = torch.cat([fds.shift.to(features.dtype), features.new_zeros(1, c)])
            features = published.recolor_masked_loop(features, bins, transform, shift)
        return self.model.head(features)

    def _loss(self, out: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        from . import published
        pred, name, priors = out[:, :1], self.name, self.priors
        if name in ("mse", "fds"):
            w = published.published_batch_pixel_weights(y.float(), None)
            return published.published_weighted_mse_loss(pred, y, w if mask is None else w * mask)
        if name == "lds":
            return published.published_weighted_mse_loss(pred, y, self._weights(priors.lds_weights, y, mask))
        if name == "rrt":
            return published.published_weighted_mse_loss(pred, y, self._weights(priors.rrt_weights, y, mask))
        p, t = pred.reshape(-1), y.reshape(-1)
        if mask is not None:
            keep = mask.reshape(-1)
            p, t = p[keep], t[keep]
        nv = self.criterion.noise_var
        if name == "bmc":
            candidates = self._candidates(y, mask)
            if candidates is None:                       # the batch's own labels: the published N x N form
                return published.bmc_loss_published(p, t, nv)
            return published.bmc_loss_candidates_published(p, t, candidates, nv)
        if name == "gai":
            c = self.criterion
            return published.gai_loss_published(p, t, nv, c.gmm_weights, c.gmm_means, c.gmm_covariances)
        c = self.criterion                                                               # bni
        return published.bni_loss_published(p, t, nv, c.bin_centers, c.bin_weights)

    def step(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.name != "bsam":
            return super().step(x, y, mask)
        from . import published
        self.model.train()
        w = self._weights(self.priors.sqinv_weights, y, mask)
        loss = bsam_step(self.optimizer, lambda weights: published.published_weighted_mse_loss(
            self._output(x, y, mask)[:, :1], y, weights), w, w)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        return loss


# --------------------------------------------------------------------------------------------------
# training and evaluation loops
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """``seconds`` of training (wall clock), the mean training loss of each epoch, and the steps taken."""
    seconds: float
    epoch_losses: list
    steps: int

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


Batch = tuple  # (x, y, mask-or-None)


def train(run: MethodRun, batches: Callable[[int], Iterable[Batch]], epochs: int, *,
          progress: Optional[Callable] = None) -> TrainResult:
    """Train ``run`` for ``epochs`` epochs: ``for (x, y, mask) in batches(epoch): run.step(x, y, mask)``, then
    ``run.end_epoch()``. ``progress(iterable, desc=...)`` wraps the epoch loop and each epoch's batches
    (e.g. :func:`.common.progress` with ``enabled=``). The loss is read once per epoch; a non-finite epoch
    loss raises ``FloatingPointError`` naming the method and the epoch."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    wrap = progress if progress is not None else (lambda it, **_: it)
    losses = []
    start = time.perf_counter()
    for epoch in wrap(range(epochs), desc=f"{run.name} epochs"):
        total, n = None, 0
        for x, y, mask in wrap(batches(epoch), desc=f"{run.name} epoch {epoch + 1}/{epochs}"):
            loss = run.step(x, y, mask)
            total = loss if total is None else total + loss
            n += 1
        run.end_epoch()
        mean = float(total) / n if n else math.nan
        if n and not math.isfinite(mean):
            raise FloatingPointError(f"{run.display}: the training loss of epoch {epoch + 1} is {mean} (diverged)")
        losses.append(mean)
    return TrainResult(time.perf_counter() - start, losses, run.steps)


@torch.no_grad()
def evaluate(run: MethodRun, batches: Iterable[Batch], metric, *, clamp: Optional[tuple] = None,
             progress: Optional[Callable] = None):
    """``metric.update(pred, y, mask)`` over ``batches`` with ``pred = run.predict(x)`` (clamped to
    ``clamp = (lo, hi)`` when given, e.g. the valid depth range); returns ``metric.compute()``."""
    wrap = progress if progress is not None else (lambda it, **_: it)
    for x, y, mask in wrap(batches, desc=f"{run.name} eval"):
        pred = run.predict(x)
        if clamp is not None:
            pred = pred.clamp(*clamp)
        metric.update(pred, y, mask)
    return metric.compute()
