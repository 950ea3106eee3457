"""The DIR methods as the published code computes them: Balanced MSE, the weighted losses, the per-pixel
weights of the depth pipeline, and FDS. Not part of the library's API.

Why they live in the package (one copy, three users):

- ``python -m imbreg_fast train depth --compare-reference`` times a training step with these formulations
  beside ours (the installed package cannot import ``tests/``);
- the baselines of ``bench/`` (``bench_balanced_mse.py``, ``bench_weighted_losses.py``, ``bench_fds.py``);
- test oracles that are a different formulation from ours (``tests/test_balanced_mse.py``,
  ``tests/test_weighted_losses.py``, ``tests/test_fds.py``). The naive plain-loop oracles (Python floats,
  numpy, scipy) stay in ``tests/``; ``tests/test_published_reference.py`` tests this module against them
  and against values worked out by hand.

Only torch is imported (the package imports no numpy or scipy): the published code's numpy host steps are
reproduced with torch and the standard library, with the same float32 numerics and the same per-pixel
Python work. The formulations are written from the published code's behaviour (MIT licensed: Copyright (c)
2021 Yuzhe Yang for YyzHarry/imbalanced-regression, (c) 2022 Jiawei Ren for jiawei-ren/BalancedMSE):
the same torch calls, the same materialised tensors, the same loops and syncs, so that the numerics and the
memory traffic are those of the reference. Everything runs on the inputs' device (the published code
hard-codes ``.cuda()``).

1. Balanced MSE (jiawei-ren/BalancedMSE)
----------------------------------------
Sources: ``imdb-wiki-dir/balanaced_mse.py`` and ``nyud2-dir/balanaced_mse.py`` (1-D BMC, GAI, BNI, as used
in the experiments), ``synthetic_benchmark/loss.py`` and the README (multi-dimensional BMC through
``MultivariateNormal``). :func:`bmc_loss_published`, :func:`bmc_loss_md_published`, :func:`gai_loss_published`,
:func:`bni_loss_published` keep the published formulation: the same torch calls (``F.mse_loss``,
``F.cross_entropy``, ``torch.logsumexp``, ``MVN.log_prob``), the same materialised tensors (``[N, N]`` logits,
``[N, K]`` balancing terms built with ``expand`` / ``repeat``), the mean reduction and the
``(2 * noise_var).detach()`` rescaling. :func:`bmc_loss_candidates_published` is not in the published code:
it is our candidates extension (docs/methods.md §1.1) written in the same materialising style, the baseline
of the dense BMC benchmark.

Deviations from the published code, none of which changes a value:

- Device: the published code hard-codes ``.cuda()`` (class labels ``torch.arange(N).cuda()``, the GMM and
  bucket tensors); here everything lives on ``pred``'s device.
- Dtype: the published GAI loads its GMM from a joblib file written by sklearn, i.e. numpy float64 arrays
  converted with ``torch.tensor``; ``pred - means`` then silently promotes the balancing term, the loss
  and the backward through the ``[N, K]`` tensors to float64 for an fp32 network. These functions cast the
  mixture / bin parameters to ``pred``'s dtype and so compute in the inputs' dtype; pass float64 inputs to
  reproduce the published numerics. Likewise the published multi-dimensional code builds
  ``torch.eye(d)`` in the default dtype; here it has ``pred``'s dtype.
- Shapes: the published functions take ``[N, 1]`` (``[N, d]`` for the MD version); a 1-D ``[N]`` input is
  viewed as ``[N, 1]`` here (with ``[N]`` the published ``pred - target.T`` would silently compute an
  element-wise difference). ``noise_var`` may be a float (the published code needs a tensor).
- BMC logits: the dataset code writes ``- 0.5 * (pred - target.T).pow(2) / noise_var`` and the README
  ``- (pred - target.T).pow(2) / (2 * noise_var)``; we follow the dataset code (same value to rounding).

At N = 1 the BMC loss is exactly 0 (one logit, the positive).

2. Weighted losses (YyzHarry/imbalanced-regression, ``imdb-wiki-dir/loss.py``)
------------------------------------------------------------------------------
:func:`published_weighted_mse_loss`, :func:`published_weighted_l1_loss`, :func:`published_weighted_huber_loss`,
:func:`published_weighted_focal_mse_loss`, :func:`published_weighted_focal_l1_loss`: the element loss times
``weights.expand_as(loss)``, then ``torch.mean`` over every element (weights enter the numerator only).
The depth training loop (``nyud2-dir/train.py``) writes its loss inline as
``torch.mean(((output - depth) ** 2) * weight)``: the same value and the same kernels as
:func:`published_weighted_mse_loss` with a ``weight`` of the depth's shape. It has no validity mask.

3. Per-pixel weights of the depth pipeline (``nyud2-dir/loaddata.py``)
----------------------------------------------------------------------
The published depth code computes the LDS / inverse-frequency weights on the host, per sample, every time
a sample is loaded (``depthDataset._get_weights``, called from ``__getitem__`` after the augmentations, in
the DataLoader workers): the depth map (float32, ``[1, H, W]``) is flattened to a numpy array and a Python
``map`` looks up, pixel by pixel, ``bucket_weights[min(int(v * np.float32(10)), 99)]`` (0.1 m buckets, the
float32 product truncated; no lower clamp), building a float32 tensor of the depth's shape. The DataLoader
stacks the samples' maps and the training loop copies them to the GPU. The bucket weight table
(``_get_bucket_weights``) is computed once, from hard-coded training-set pixel counts per bucket
(``TRAIN_BUCKET_NUM``): buckets below ``bucket_start`` (7) take the count (or the LDS-smoothed count) of the
first kept bucket, ``weight_b = scaling / value_b`` with ``scaling = sum(counts) / sum(counts / value)``.
Without re-weighting every pixel weight is 1. (The age datasets, ``agedb-dir/datasets.py::_prepare_weights``,
instead compute one weight per sample once, when the dataset is built, and look it up by index in
``__getitem__``: a depth map's per-pixel weights change with every augmentation, so they cannot be
precomputed.) :func:`published_pixel_weights` is that per-sample host lookup, and
:func:`published_batch_pixel_weights` the batch as the training loop receives it; the table itself is an
input (e.g. the ``bin_weights`` of a :class:`imbreg_fast.lds.LabelWeights` fitted over 0.1 m bins from 0),
so that the published path and ours can be compared on the same weights.

4. FDS (YyzHarry/imbalanced-regression, ``nyud2-dir/models/fds.py``, ``util.py``, ``train.py``)
-----------------------------------------------------------------------------------------------
The published dense FDS works at the output resolution: it calibrates ``x1``, the last feature map before
the final convolution, at the same ``H x W`` as the depth target (no down-sampling of the labels). Bucket
of a pixel: ``clamp(floor(depth * 10), bucket_start, bucket_num - 1)``; statistics are per-channel means
and variances (diagonal), one row per bucket from ``bucket_start`` on.

- :func:`published_fds_smooth` (``FDS.smooth`` + ``util.calibrate_mean_var``), every training step from
  epoch ``start_smooth`` on: the features are permuted to pixel rows (a copy); the buckets are computed on
  the device; then a Python loop over ``torch.unique(buckets)`` (a device sync, then one ``.item()`` per
  bucket) gathers each bucket's rows with a boolean mask, calibrates them per channel with
  :func:`published_calibrate_mean_var` (clip (0.2, 5) in the depth code; its checks of the variances are
  more syncs) and writes them back with a masked assignment; the result is viewed back as ``[B, C, H, W]``.
- :func:`published_fds_update` (``FDS.update_running_stats``), once per epoch from ``start_update`` on, after
  a separate no-grad pass over a fixed subset of the training set whose features are moved to the host:
  the running statistics move to the CPU, the pixels' buckets are computed by a Python loop over the
  pixels, and a loop over the unique buckets takes each bucket's mean and unbiased variance (biased for a
  single pixel) and folds them into the running ones with an EMA (``factor = momentum``, or the cumulative
  ``1 - n / tracked`` without momentum; ``factor = 0``, i.e. replace, for every bucket in epoch
  ``start_update`` only); the statistics move back to the GPU.
- :func:`published_smooth` (``FDS._update_last_epoch_stats``): the smoothed statistics, ``F.conv1d`` over the
  bucket axis with ``F.pad(mode='reflect')`` and the sum-normalised window, over every bucket (buckets never
  seen take part with their initial values, mean 0 and variance 1). In ``train.py`` it runs at the end of
  epoch ``e`` *before* that epoch's statistics are folded in, so the calibration of epoch ``e + 1`` uses the
  statistics folded up to epoch ``e - 1``.

This differs materially from the per-bin formulations below: a loop over the buckets present only (with
syncs), diagonal statistics with per-bucket checks, and a per-pixel Python loop in the statistics update.

The reference-style formulations of our two FDS kernels, the baselines of ``bench/bench_fds.py``, take
dense features ``[B, C, H, W]`` and bins ``[B, H*W]`` (every pixel in ``[0, nb)``) and return
``[B, C, H, W]``, differentiable w.r.t. the features:

(a) :func:`recolor_gathered`  -- gathered per-pixel matrices, ``bmm(A[bins], z)`` ([N, C, C] memory);
(b) :func:`recolor_masked_loop` -- a Python loop over bins with boolean masks;
(c) :func:`recolor_sorted_loop` -- sort pixels by bin, one matmul per bin segment;
(d) :func:`recolor_grouped_mm` -- sort pixels by bin, ``torch.nn.functional.grouped_mm`` over the bin
    offsets (CPU: fp32 only, C a multiple of 4; :func:`grouped_mm_presort` does the sort beforehand);

and for the statistics: :func:`accumulate_masked_loop` (per-bin loop) and :func:`accumulate_outer`
(``index_add`` of per-pixel outer products, [N, C, C] memory).
"""
from __future__ import annotations

from array import array
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal as MVN

__all__ = [
    # Balanced MSE
    "bmc_loss_published", "bmc_loss_md_published", "bmc_loss_candidates_published", "gai_loss_published",
    "bni_loss_published",
    # weighted losses
    "published_weighted_mse_loss", "published_weighted_l1_loss", "published_weighted_huber_loss",
    "published_weighted_focal_mse_loss", "published_weighted_focal_l1_loss",
    # per-pixel weights of the depth pipeline
    "published_pixel_weights", "published_batch_pixel_weights",
    # FDS
    "published_smooth", "published_calibrate_mean_var", "published_fds_smooth", "published_fds_update",
    "recolor_gathered", "recolor_masked_loop", "recolor_sorted_loop", "recolor_grouped_mm", "grouped_mm_presort",
    "accumulate_masked_loop", "accumulate_outer",
    # ConR
    "conr_loss_published",
    # RankSim
    "published_unique_label_indices", "ranksim_loss_published",
    # Rank-N-Contrast
    "rnc_loss_published",
]


# ----------------------------------------------------------------------------------------------------
# 1. Balanced MSE (jiawei-ren/BalancedMSE)
# ----------------------------------------------------------------------------------------------------


def _column(x: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1]; [N, 1] unchanged."""
    if x.dim() == 1:
        return x.reshape(-1, 1)
    if x.dim() != 2 or x.shape[1] != 1:
        raise ValueError(f"expected a [N] or [N, 1] tensor (the published 1-D code), got {tuple(x.shape)}")
    return x


def _noise_var(noise_var, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(noise_var, torch.Tensor):
        return noise_var
    return torch.tensor(float(noise_var), dtype=ref.dtype, device=ref.device)


def bmc_loss_published(pred, target, noise_var):
    """Published 1-D BMC: ``[N, 1]`` pred/target, ``[N, N]`` logits, cross-entropy with labels arange(N)."""
    pred, target = _column(pred), _column(target)
    noise_var = _noise_var(noise_var, pred)
    logits = - 0.5 * (pred - target.T).pow(2) / noise_var                       # [N, N]
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def bmc_loss_md_published(pred, target, noise_var):
    """Published multi-dimensional BMC: ``[N, d]``; logits = MVN(pred_i, noise_var I).log_prob(target_j),
    evaluated over a broadcast ``[N, N, d]`` batch."""
    noise_var = _noise_var(noise_var, pred)
    I = torch.eye(pred.shape[-1], dtype=pred.dtype, device=pred.device)
    logits = MVN(pred.unsqueeze(1), noise_var * I).log_prob(target.unsqueeze(0))  # [N, N]
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def bmc_loss_candidates_published(pred, target, candidates, noise_var):
    """BMC against a separate candidate set, materialising style: row i's logits ``[1 + M]`` are its own
    target (class 0) followed by the M candidates; cross-entropy with labels zeros(N).

    d = 1: pred/target ``[N]`` or ``[N, 1]``, candidates ``[M]`` or ``[M, 1]`` (logits as the published 1-D
    BMC). d > 1: pred/target ``[N, d]``, candidates ``[M, d]``, logits from ``MVN.log_prob`` as the published
    multi-dimensional BMC (its normalising constant is the same for every logit and cancels).
    """
    noise_var = _noise_var(noise_var, pred)
    n = pred.shape[0]
    if pred.dim() == 1 or pred.shape[-1] == 1:
        pred, target, candidates = _column(pred), _column(target), _column(candidates)
        positive = - 0.5 * (pred - target).pow(2) / noise_var                    # [N, 1]
        negative = - 0.5 * (pred - candidates.T).pow(2) / noise_var              # [N, M]
    else:
        I = torch.eye(pred.shape[-1], dtype=pred.dtype, device=pred.device)
        positive = MVN(pred, noise_var * I).log_prob(target).unsqueeze(1)        # [N, 1]
        negative = MVN(pred.unsqueeze(1), noise_var * I).log_prob(candidates.unsqueeze(0))  # [N, M]
    logits = torch.cat([positive, negative], dim=1)                              # [N, 1 + M]
    loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def gai_loss_published(pred, target, noise_var, gmm_weights, gmm_means, gmm_vars):
    """Published 1-D GAI: ``[N, 1]`` pred/target, mixture ``weights``, ``means``, ``variances`` of K
    components (any shape with K elements, e.g. sklearn's ``[K]``, ``[K, 1]``, ``[K, 1, 1]``), expanded to
    ``[N, K]``. Computes in pred's dtype (the published code runs in float64: see the module docstring)."""
    pred, target = _column(pred), _column(target)
    noise_var = _noise_var(noise_var, pred)
    gmm = {"weights": gmm_weights, "means": gmm_means, "variances": gmm_vars}
    gmm = {k: v.to(dtype=pred.dtype, device=pred.device) for k, v in gmm.items()}
    gmm = {k: gmm[k].reshape(1, -1).expand(pred.shape[0], -1) for k in gmm}     # [N, K]
    mse_term = F.mse_loss(pred, target, reduction='none') / 2 / noise_var + 0.5 * noise_var.log()
    sum_var = gmm['variances'] + noise_var
    balancing_term = - 0.5 * sum_var.log() - 0.5 * (pred - gmm['means']).pow(2) / sum_var + gmm['weights'].log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()
    return loss.mean()


def bni_loss_published(pred, target, noise_var, bin_centers, bin_weights):
    """Published BNI: ``[N, 1]`` pred/target, bucket centres and weights ``[K]`` repeated to ``[N, K]``."""
    pred, target = _column(pred), _column(target)
    noise_var = _noise_var(noise_var, pred)
    bucket_centers = bin_centers.to(dtype=pred.dtype, device=pred.device).reshape(-1)
    bucket_weights = bin_weights.to(dtype=pred.dtype, device=pred.device).reshape(-1)
    mse_term = F.mse_loss(pred, target, reduction='none') / 2 / noise_var

    num_bucket = bucket_centers.shape[0]
    bucket_center = bucket_centers.unsqueeze(0).repeat(pred.shape[0], 1)        # [N, K]
    bucket_weights = bucket_weights.unsqueeze(0).repeat(pred.shape[0], 1)       # [N, K]

    balancing_term = - 0.5 * (pred.expand(-1, num_bucket) - bucket_center).pow(2) / noise_var + bucket_weights.log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()
    return loss.mean()


# ----------------------------------------------------------------------------------------------------
# 2. Weighted losses (YyzHarry/imbalanced-regression, imdb-wiki-dir/loss.py). weights: expandable to the
#    element loss; torch.mean over every element.
# ----------------------------------------------------------------------------------------------------


def _focal_factor(diff: torch.Tensor, activate: str, beta: float, gamma: float) -> torch.Tensor:
    if activate == "tanh":
        return torch.tanh(beta * torch.abs(diff)) ** gamma
    return (2 * torch.sigmoid(beta * torch.abs(diff)) - 1) ** gamma


def _weighted_mean(loss: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is not None:
        loss = loss * weights.expand_as(loss)
    return torch.mean(loss)


def published_weighted_mse_loss(inputs, targets, weights=None):
    """``mean(w (x - y)^2)``."""
    return _weighted_mean((inputs - targets) ** 2, weights)


def published_weighted_l1_loss(inputs, targets, weights=None):
    """``mean(w |x - y|)``."""
    return _weighted_mean(torch.abs(inputs - targets), weights)


def published_weighted_focal_mse_loss(inputs, targets, weights=None, activate="sigmoid", beta=0.2, gamma=1):
    """``mean(w (x - y)^2 f)``, ``f = (2 sigmoid(beta |x - y|) - 1)^gamma`` or ``tanh(beta |x - y|)^gamma``."""
    loss = (inputs - targets) ** 2
    return _weighted_mean(loss * _focal_factor(inputs - targets, activate, beta, gamma), weights)


def published_weighted_focal_l1_loss(inputs, targets, weights=None, activate="sigmoid", beta=0.2, gamma=1):
    """``mean(w |x - y| f)``, the focal factor as :func:`published_weighted_focal_mse_loss`."""
    loss = torch.abs(inputs - targets)
    return _weighted_mean(loss * _focal_factor(inputs - targets, activate, beta, gamma), weights)


def published_weighted_huber_loss(inputs, targets, weights=None, beta=1.0):
    """``mean(w l)``, ``l = 0.5 a^2 / beta`` if ``a = |x - y| < beta`` else ``a - 0.5 beta``."""
    l1_loss = torch.abs(inputs - targets)
    loss = torch.where(l1_loss < beta, 0.5 * l1_loss ** 2 / beta, l1_loss - 0.5 * beta)
    return _weighted_mean(loss, weights)


# ----------------------------------------------------------------------------------------------------
# 3. Per-pixel weights of the depth pipeline (nyud2-dir/loaddata.py: depthDataset._get_weights)
# ----------------------------------------------------------------------------------------------------


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (as ``np.float32(x)``)."""
    return array("f", [x])[0]


def _check_buckets_per_unit(buckets_per_unit) -> float:
    if isinstance(buckets_per_unit, bool) or not isinstance(buckets_per_unit, (int, float)):
        raise TypeError(f"buckets_per_unit must be a number, got {type(buckets_per_unit).__name__}")
    scale = _float32(float(buckets_per_unit))
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"buckets_per_unit must be a positive finite number, got {buckets_per_unit}")
    return scale


def _weight_table(bin_weights) -> list:
    """The bucket weights as the published list of float32 values (Python floats)."""
    if isinstance(bin_weights, torch.Tensor):
        if bin_weights.dim() != 1:
            raise ValueError(f"bin_weights must be 1-D, got shape {tuple(bin_weights.shape)}")
        bin_weights = bin_weights.detach().cpu().tolist()
    try:
        table = list(array("f", [float(w) for w in bin_weights]))
    except TypeError:
        raise TypeError(f"bin_weights must be a sequence of numbers or a 1-D tensor, got "
                        f"{type(bin_weights).__name__}") from None
    if not table:
        raise ValueError("bin_weights must not be empty")
    return table


def _check_depth(depth) -> torch.Tensor:
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"depth must be a tensor, got {type(depth).__name__}")
    if depth.dtype != torch.float32:
        raise TypeError(f"depth must be float32 (the published loader asserts it), got {depth.dtype}")
    return depth


def _lookup(depth: torch.Tensor, table: Optional[list], scale: float) -> torch.Tensor:
    """One sample's per-pixel weights on the host, as the published loader computes them."""
    if table is None:
        return torch.ones(depth.shape, dtype=torch.float32)
    flat = depth.reshape(-1).cpu()                              # published: depth.view(-1).cpu().numpy()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("depth contains NaN or inf: no bucket to look up")
    values = flat.tolist()
    # float32 product of float32 operands: exact in double, then rounded to float32 (numpy's v * np.float32(10))
    scaled = array("f", [v * scale for v in values])
    if scaled and min(scaled) <= -1.0:
        raise ValueError("depth has values <= -1 / buckets_per_unit (bucket index < 0); the published lookup "
                         "would index the weight list from its end")
    last = len(table) - 1
    weights = [table[min(int(s), last)] for s in scaled]        # per pixel: bucket, then list lookup
    return torch.tensor(weights, dtype=torch.float32).view(depth.shape)


def published_pixel_weights(depth: torch.Tensor, bin_weights, *, buckets_per_unit: float = 10.0) -> torch.Tensor:
    """The per-pixel weights of one sample, computed on the host as the published depth loader does.

    Per pixel, in a Python loop over the flattened depth values: ``b = min(int(float32(d * buckets_per_unit)),
    len(bin_weights) - 1)`` (the float32 product truncated toward zero; published: 0.1 m buckets,
    ``buckets_per_unit = 10``, 100 buckets) and the weight ``bin_weights[b]`` (float32). The published loader
    runs this in ``__getitem__`` for every sample it loads, after the augmentations.

    Args:
        depth: one sample's depth map, float32, any shape (published: ``[1, H, W]``), on any device (read on
            the host). Finite; a bucket index below 0 (depth <= -1 / buckets_per_unit) raises ``ValueError``
            (the published lookup would index its list from the end); depths in between truncate to bucket 0.
        bin_weights: the weight of each bucket (a sequence of numbers or a 1-D tensor, rounded to float32
            like the published ``np.float32`` list); ``None``: every weight is 1 (no re-weighting).
        buckets_per_unit: buckets per label unit (equal-width buckets from 0: bucket ``b`` covers
            ``[b, b + 1) / buckets_per_unit``, the last one open-ended), rounded to float32.

    Returns:
        float32 weights of ``depth``'s shape, on the CPU.
    """
    depth = _check_depth(depth)
    table = None if bin_weights is None else _weight_table(bin_weights)
    return _lookup(depth, table, _check_buckets_per_unit(buckets_per_unit))


def published_batch_pixel_weights(depth: torch.Tensor, bin_weights, *, buckets_per_unit: float = 10.0,
                                  device=None) -> torch.Tensor:
    """A batch's per-pixel weights as the published training loop receives them: each sample's weights on the
    host (:func:`published_pixel_weights`), stacked as the DataLoader's collation does, then copied to the
    training device (``non_blocking``, as ``weight.cuda(non_blocking=True)``).

    Args:
        depth: ``[B, ...]`` float32 depth maps (published: ``[B, 1, H, W]``); each ``depth[i]`` is one sample.
        bin_weights, buckets_per_unit: as :func:`published_pixel_weights` (the table is converted once, as
            the published dataset does at construction).
        device: where the weights go; default: ``depth``'s device.

    Returns:
        float32 weights of ``depth``'s shape on ``device``; with the published loss,
        ``published_weighted_mse_loss(output, depth, weights)`` is ``nyud2-dir/train.py``'s
        ``torch.mean(((output - depth) ** 2) * weight)``.
    """
    depth = _check_depth(depth)
    if depth.dim() < 1 or depth.shape[0] == 0:
        raise ValueError(f"depth must be a non-empty batch [B, ...], got shape {tuple(depth.shape)}")
    table = None if bin_weights is None else _weight_table(bin_weights)
    scale = _check_buckets_per_unit(buckets_per_unit)
    weights = torch.stack([_lookup(sample, table, scale) for sample in depth])
    return weights.to(depth.device if device is None else device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------
# 4. FDS: the published dense FDS (nyud2-dir/models/fds.py, util.py)
# ----------------------------------------------------------------------------------------------------


def published_smooth(stats: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The published FDS smoothing of per-bucket statistics ``[nb, ...]``: ``F.conv1d`` of every column over
    the bucket axis with the window, after ``F.pad(mode='reflect')`` by ``(ks - 1) // 2`` (edge not
    repeated; needs ``nb > (ks - 1) // 2``). Every bucket takes part, seen or not. Computes in ``stats``'
    dtype and device; returns ``stats``' shape."""
    half = (window.shape[0] - 1) // 2
    x = stats.reshape(stats.shape[0], -1)
    padded = F.pad(x.t().unsqueeze(1), (half, half), mode="reflect")                 # [D, 1, nb + 2h]
    out = F.conv1d(padded, window.to(dtype=x.dtype, device=x.device).view(1, 1, -1)).squeeze(1).t()
    return out.reshape(stats.shape)


def published_calibrate_mean_var(matrix: torch.Tensor, m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor,
                                 v2: torch.Tensor, clip=(0.2, 5.0)) -> torch.Tensor:
    """The published per-channel calibration of the rows ``matrix`` ``[n, C]`` of one bucket (``util.py``
    ``calibrate_mean_var``; clip (0.2, 5) in the depth code, (0.1, 10) in the age code).

    - ``sum(v1) < 1e-10``: ``matrix`` returned unchanged (the same tensor);
    - some ``v1 <= 0`` or ``v2 < 0``: only the channels with ``v1 > 0`` and ``v2 >= 0`` are calibrated,
      written in place into ``matrix``, which is returned;
    - otherwise a new tensor ``(matrix - m1) * sqrt(clamp(v2 / v1, *clip)) + m2``.

    Each branch test is a device sync, as published. ``m1, v1`` are the bucket's statistics, ``m2, v2``
    the smoothed ones (``[C]``)."""
    lo, hi = clip
    if torch.sum(v1) < 1e-10:
        return matrix
    if (v1 <= 0.0).any() or (v2 < 0.0).any():
        valid = (v1 > 0.0) & (v2 >= 0.0)
        factor = torch.clamp(v2[valid] / v1[valid], lo, hi)
        matrix[:, valid] = (matrix[:, valid] - m1[valid]) * torch.sqrt(factor) + m2[valid]
        return matrix
    factor = torch.clamp(v2 / v1, lo, hi)
    return (matrix - m1) * torch.sqrt(factor) + m2


def _check_buckets(bucket_num, bucket_start) -> int:
    for name, v in (("bucket_num", bucket_num), ("bucket_start", bucket_start)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= bucket_start < bucket_num:
        raise ValueError(f"need 0 <= bucket_start < bucket_num, got bucket_start={bucket_start}, "
                         f"bucket_num={bucket_num}")
    return bucket_num - bucket_start


def _check_dense(features, labels):
    """features [B, C, H, W]; labels [B, 1, H, W] or [B, H, W] at the feature resolution -> labels [B, H, W]."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got "
                        f"{getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() != 4:
        raise ValueError(f"features must be dense [B, C, H, W], got shape {tuple(features.shape)}")
    if not isinstance(labels, torch.Tensor) or not labels.is_floating_point():
        raise TypeError(f"labels must be a floating-point tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    b, _, h, w = features.shape
    if tuple(labels.shape) == (b, 1, h, w):
        labels = labels.squeeze(1)
    elif tuple(labels.shape) != (b, h, w):
        raise ValueError(f"labels must have shape {(b, 1, h, w)} or {(b, h, w)} (one label per pixel, at the "
                         f"feature resolution, as the published code needs), got {tuple(labels.shape)}")
    return labels


def _check_stats(named: dict, rows: int, c: int) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != (rows, c):
            raise ValueError(f"{name} must be [bucket_num - bucket_start, C] = {(rows, c)}, got {tuple(t.shape)}")


def published_fds_smooth(features: torch.Tensor, labels: torch.Tensor, running_mean: torch.Tensor,
                         running_var: torch.Tensor, smoothed_mean: torch.Tensor, smoothed_var: torch.Tensor, *,
                         bucket_num: int = 100, bucket_start: int = 7, buckets_per_unit: float = 10.0,
                         clip=(0.2, 5.0)) -> torch.Tensor:
    """The published dense FDS calibration of one training step (``FDS.smooth`` of the depth code).

    1. ``rows = features.permute(0, 2, 3, 1)`` copied to ``[B*H*W, C]`` (a new tensor: the caller's features
       are never written);
    2. buckets on the device: ``clamp(floor(labels * buckets_per_unit), bucket_start, bucket_num - 1)``
       (int32, the product in the labels' dtype);
    3. a Python loop over ``torch.unique(buckets)`` (sorted): per bucket ``b``, the rows selected by
       ``buckets.eq(b)`` (the mask is computed twice, for the gather and for the assignment, as published) are
       replaced by :func:`published_calibrate_mean_var` of them with row ``b - bucket_start`` of the four
       statistics and ``clip``;
    4. the rows viewed back as ``[B, C, H, W]`` (a permuted, channels-last-strided view, as published).

    Gradients flow to ``features`` through the masked assignments (none into the statistics).

    Args:
        features: ``[B, C, H, W]`` floating point.
        labels: ``[B, 1, H, W]`` or ``[B, H, W]`` floating point, at the feature resolution (the published
            model calibrates its last feature map, which has the depth target's resolution).
        running_mean, running_var: the statistics the transform maps from (published:
            ``running_*_last_epoch``), ``[bucket_num - bucket_start, C]``; cast to the features' dtype and
            device (the published buffers are float32 on the GPU).
        smoothed_mean, smoothed_var: the target statistics (published: ``smoothed_*_last_epoch``, i.e.
            :func:`published_smooth` of the running ones), same shape.
        bucket_num, bucket_start: the published bucket range (depth: 100 buckets of 0.1 m, from 7).
        buckets_per_unit: buckets per label unit (published: 10), rounded to float32.
        clip: the clamp of the variance ratio (depth code: (0.2, 5)).

    Returns:
        The calibrated features, ``[B, C, H, W]``, the features' dtype and device.
    """
    labels = _check_dense(features, labels)
    rows_per_stat = _check_buckets(bucket_num, bucket_start)
    b, c, h, w = features.shape
    stats = {"running_mean": running_mean, "running_var": running_var, "smoothed_mean": smoothed_mean,
             "smoothed_var": smoothed_var}
    _check_stats(stats, rows_per_stat, c)
    m1, v1, m2, v2 = (t.to(dtype=features.dtype, device=features.device) for t in stats.values())
    scale = _check_buckets_per_unit(buckets_per_unit)                # float32, as published torch.tensor([10.])

    rows = features.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).view(-1, c)
    buckets = torch.floor(labels.reshape(-1) * scale).int().clamp(bucket_start, bucket_num - 1)
    for bucket in torch.unique(buckets):
        k = bucket.item() - bucket_start
        rows[buckets.eq(bucket)] = published_calibrate_mean_var(rows[buckets.eq(bucket)], m1[k], v1[k], m2[k],
                                                                v2[k], clip)
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


def published_fds_update(features: torch.Tensor, labels: torch.Tensor, running_mean: torch.Tensor,
                         running_var: torch.Tensor, num_samples_tracked: torch.Tensor, *, epoch: int,
                         start_update: int = 0, momentum: Optional[float] = 0.9, bucket_num: int = 100,
                         bucket_start: int = 7, buckets_per_unit: float = 10.0):
    """The published dense FDS statistics update at the end of an epoch (``FDS.update_running_stats`` of the
    depth code), returning the new statistics instead of writing buffers.

    1. the features and labels on the host (published: each batch of the separate FDS pass is moved with
       ``.cpu()``), the statistics copied to the CPU (published: ``_running_stats_to_device('cpu')``);
    2. ``features`` permuted to pixel rows ``[B*H*W, C]`` (a copy);
    3. per pixel, in a Python loop over the labels' elements (float32): ``clamp(int(y * buckets_per_unit),
       bucket_start, bucket_num - 1)`` (the float32 product truncated toward zero);
    4. per unique bucket ``b`` (sorted), ``i = b - bucket_start``: the ``n`` rows with that bucket, their mean
       and variance (unbiased; biased for ``n = 1``), ``tracked[i] += n``, ``factor = momentum`` (``None``:
       ``1 - n / tracked[i]``), ``factor = 0`` if ``epoch == start_update``, and
       ``running[i] = (1 - factor) * new + factor * running[i]`` for the mean and the variance;
    5. the statistics back on their device (published: ``_running_stats_to_device('cuda')``).

    The published module returns early when ``epoch`` is below its own epoch counter (advanced by
    ``update_last_epoch_stats``); that bookkeeping stays with the caller.

    Args:
        features: ``[B, C, H, W]`` floating point (detached), the whole FDS pass' features.
        labels: ``[B, 1, H, W]`` or ``[B, H, W]`` at the feature resolution.
        running_mean, running_var: ``[bucket_num - bucket_start, C]``; num_samples_tracked:
            ``[bucket_num - bucket_start]``. Not modified.
        epoch, start_update: the epoch being folded and the first epoch of updates (its statistics replace).
        momentum: EMA factor in [0, 1], or ``None`` for the cumulative average.
        bucket_num, bucket_start, buckets_per_unit: as :func:`published_fds_smooth`.

    Returns:
        ``(running_mean, running_var, num_samples_tracked)``: new tensors, each with its input's dtype and
        device.
    """
    labels = _check_dense(features, labels)
    rows_per_stat = _check_buckets(bucket_num, bucket_start)
    c = features.shape[1]
    _check_stats({"running_mean": running_mean, "running_var": running_var}, rows_per_stat, c)
    if not isinstance(num_samples_tracked, torch.Tensor) or tuple(num_samples_tracked.shape) != (rows_per_stat,):
        raise ValueError(f"num_samples_tracked must be a [bucket_num - bucket_start] = [{rows_per_stat}] tensor, "
                         f"got {getattr(num_samples_tracked, 'shape', type(num_samples_tracked).__name__)}")
    for name, v in (("epoch", epoch), ("start_update", start_update)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    scale = _check_buckets_per_unit(buckets_per_unit)

    features, labels = features.detach().cpu(), labels.detach().cpu()
    mean, var, tracked = running_mean.cpu().clone(), running_var.cpu().clone(), num_samples_tracked.cpu().clone()
    rows = features.permute(0, 2, 3, 1).contiguous().view(-1, c)
    hi = bucket_num - 1
    buckets = torch.tensor([max(min(int(y * scale), hi), bucket_start) for y in labels.reshape(-1).float()])
    for bucket in torch.unique(buckets).tolist():
        i = bucket - bucket_start
        z = rows[buckets == bucket]
        n = z.shape[0]
        z_mean = torch.mean(z, 0)
        z_var = torch.var(z, 0, unbiased=n != 1)
        tracked[i] += n
        factor = momentum if momentum is not None else 1.0 - n / float(tracked[i])
        factor = 0.0 if epoch == start_update else factor
        mean[i] = (1 - factor) * z_mean + factor * mean[i]
        var[i] = (1 - factor) * z_var + factor * var[i]
    return (mean.to(running_mean.device), var.to(running_var.device),
            tracked.to(num_samples_tracked.device))


# ----------------------------------------------------------------------------------------------------
# 4b. Reference-style formulations of our FDS kernels (bench baselines). Dense features [B, C, H, W],
#     bins [B, H*W].
# ----------------------------------------------------------------------------------------------------


def _rows(features):
    b, c = features.shape[:2]
    return features.permute(0, 2, 3, 1).reshape(-1, c)


def _dense(rows, like):
    b, c, h, w = like.shape
    return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)


def recolor_gathered(features, bins, transform, shift):
    """(a) y_i = A[k_i] z_i + s[k_i] with the per-pixel matrices gathered: [N, C, C] memory."""
    z, k = _rows(features), bins.reshape(-1)
    y = torch.bmm(transform[k], z.unsqueeze(2)).squeeze(2) + shift[k]
    return _dense(y, features)


def recolor_masked_loop(features, bins, transform, shift):
    """(b) a Python loop over bins, each selecting its pixels with a boolean mask."""
    z, k = _rows(features), bins.reshape(-1)
    y = torch.zeros_like(z)
    for b in range(transform.shape[0]):
        sel = k == b
        y = y.index_put((sel,), z[sel] @ transform[b].t() + shift[b])
    return _dense(y, features)


def _sort(k, num_bins):
    order = torch.argsort(k, stable=True)
    counts = torch.bincount(k, minlength=num_bins)
    return order, counts


def recolor_sorted_loop(features, bins, transform, shift):
    """(c) plain PyTorch: sort pixels by bin, one matmul per bin segment, un-sort."""
    z, k = _rows(features), bins.reshape(-1)
    order, counts = _sort(k, transform.shape[0])
    zs = z[order]
    parts, start = [], 0
    for b, n in enumerate(counts.tolist()):
        if n:
            parts.append(zs[start:start + n] @ transform[b].t() + shift[b])
            start += n
    ys = torch.cat(parts)
    return _dense(ys[torch.argsort(order)], features)


def recolor_grouped_mm(features, bins, transform, shift, presorted=None):
    """(d) sort pixels by bin, then one grouped_mm over the bin offsets (pass ``presorted=(order, offsets,
    inverse)`` from :func:`grouped_mm_presort` to leave the sort out of the timing)."""
    z, k = _rows(features), bins.reshape(-1)
    if presorted is None:
        order, counts = _sort(k, transform.shape[0])
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        inverse = torch.argsort(order)
    else:
        order, offsets, inverse = presorted
    ys = torch.nn.functional.grouped_mm(z[order], transform.transpose(1, 2), offs=offsets)
    ys = ys + shift[k[order]]
    return _dense(ys[inverse], features)


def grouped_mm_presort(bins, num_bins):
    """The sort of :func:`recolor_grouped_mm`, done beforehand: ``(order, offsets int32, inverse)``."""
    order, counts = _sort(bins.reshape(-1), num_bins)
    return order, torch.cumsum(counts, 0).to(torch.int32), torch.argsort(order)


def accumulate_masked_loop(features, bins, num_bins, full=True):
    """Per-bin loop: (count, mean, m2) float64 from each bin's boolean-masked pixels (two-pass, centred)."""
    z, k = _rows(features), bins.reshape(-1)
    c = z.shape[1]
    count = torch.zeros(num_bins, dtype=torch.float64)
    mean = torch.zeros(num_bins, c, dtype=torch.float64)
    m2 = torch.zeros((num_bins, c, c) if full else (num_bins, c), dtype=torch.float64)
    for b in range(num_bins):
        zb = z[k == b]
        if zb.shape[0] == 0:
            continue
        mu = zb.mean(0)
        e = zb - mu
        count[b] = zb.shape[0]
        mean[b] = mu.double()
        m2[b] = (e.t() @ e).double() if full else (e * e).sum(0).double()
    return count, mean, m2


def accumulate_outer(features, bins, num_bins):
    """Outer-product formulation: index_add of z z^T per pixel ([N, C, C] memory), then
    m2 = sum z z^T - n mean mean^T."""
    z, k = _rows(features), bins.reshape(-1)
    c = z.shape[1]
    count = torch.bincount(k, minlength=num_bins).to(z.dtype)
    total = torch.zeros(num_bins, c, dtype=z.dtype).index_add_(0, k, z)
    second = torch.zeros(num_bins, c, c, dtype=z.dtype).index_add_(0, k, z.unsqueeze(2) * z.unsqueeze(1))
    mean = total / count.clamp(min=1).unsqueeze(1)
    m2 = second - count.view(-1, 1, 1) * mean.unsqueeze(2) * mean.unsqueeze(1)
    return count.double(), mean.double(), m2.double()


# --------------------------------------------------------------------------------------------------
# Rank-N-Contrast (kaiwenzha/Rank-N-Contrast ``loss.py``, no licence; written here from its behaviour)
# --------------------------------------------------------------------------------------------------


def rnc_loss_published(features: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """The published RnC computation: two views ``features`` [B, 2, d] flattened view-major, labels [B, L]
    repeated, the [n, n] matrices of negative L2 distances / tau (with the row-max subtraction, a no-op: the
    max is the diagonal's 0) and of L1 label distances, the diagonal removed, then a Python loop over the
    n - 1 columns k, each materialising an [n, n - 1] mask of the denominators (O(n^3) time and memory kept for
    backward). Mean over the n (n - 1) pairs. Underflows to -inf / NaN once distance / tau > ~100 in fp32."""
    f = torch.cat([features[:, v] for v in range(features.shape[1])], dim=0)
    y = labels.reshape(labels.shape[0], -1).repeat(features.shape[1], 1)
    label_diffs = (y[:, None, :] - y[None, :, :]).abs().sum(dim=-1)
    logits = -(f[:, None, :] - f[None, :, :]).norm(2, dim=-1) / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    exp_logits = logits.exp()
    n = logits.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=f.device)
    logits = logits.masked_select(keep).view(n, n - 1)
    exp_logits = exp_logits.masked_select(keep).view(n, n - 1)
    label_diffs = label_diffs.masked_select(keep).view(n, n - 1)
    loss = 0.0
    for k in range(n - 1):
        denominators = (label_diffs >= label_diffs[:, k:k + 1]).to(exp_logits.dtype)
        log_prob = logits[:, k] - torch.log((denominators * exp_logits).sum(dim=-1))
        loss = loss - (log_prob / (n * (n - 1))).sum()
    return loss


# ----------------------------------------------------------------------------------------------------
# ConR (BorealisAI/ConR, CC BY-NC-SA 4.0: written here from what agedb-dir/loss.py computes)
# ----------------------------------------------------------------------------------------------------


def conr_loss_published(features, targets, preds, w=1.0, weights=1.0, t=0.2, e=0.01):
    """ConR as the published AgeDB code computes it, with its quirks (docs/methods.md, ConR section):

    - ``t`` is ignored: the temperature is 0.07 whatever is passed;
    - every similarity outside the positives is zeroed by a multiplication, so exp(0) = 1 enters the
      denominator for each non-positive column (n - |P_i| ones, the anchor's own column included);
    - an anchor without positives divides 0 by 0: the whole loss is NaN;
    - exp(S) is taken in the input dtype: fp16 overflows at e^{1/0.07} and returns NaN / inf;
    - the diagonal is cleared with a Python loop over the rows (one indexing write per row).

    features [n, d] (the two views stacked along dim 0), targets / preds [n, 1] (or [n]), weights a float or
    [n, 1] / [n] (omega_i: pushing weight of row i's negatives and scale of row i's loss). preds is used as
    given (the published training passes ``outputs.clone().detach()``).
    """
    tau = 0.07
    n = features.shape[0]
    z = F.normalize(features, dim=1)
    y_row, y_col = targets.reshape(n, 1), targets.reshape(1, n)
    p_row, p_col = preds.reshape(n, 1), preds.reshape(1, n)
    if isinstance(weights, torch.Tensor):
        weights = weights.reshape(n, 1)
    label_gap = (y_row - y_col).abs()
    pred_gap = (p_row - p_col).abs()
    positive = label_gap.le(w)
    negative = (~label_gap.le(w)) * pred_gap.le(w)
    for i in range(n):
        positive[i][i] = 0
    sim = torch.einsum("ic,jc->ij", z, z) / tau
    pos_sim = sim * positive
    neg_sim = sim * negative
    push = weights * torch.exp(label_gap * e)
    neg_sum = (push * torch.exp(neg_sim) * negative).sum(1)
    has_negative = negative.sum(1).bool()
    positives = positive.sum(1)
    exp_pos = torch.exp(pos_sim)
    ratio = exp_pos / (exp_pos.sum(1) + neg_sum).unsqueeze(-1)
    per_anchor = (-torch.log(ratio) * positive).sum(1) / positives
    return (weights * (per_anchor * has_negative).unsqueeze(-1)).mean()


# ----------------------------------------------------------------------------------------------------
# RankSim (BorealisAI/ranksim-imbalanced-regression, CC BY-NC-SA 4.0: read to learn what it computes;
# this is our own code of that computation)
# ----------------------------------------------------------------------------------------------------
# What the published regulariser computes (agedb-dir / sts-b-dir ``ranksim.py`` + ``ranking.py``):
# - when the labels repeat, one sample per distinct label, picked with Python's ``random.choice``, in the
#   ascending order of ``torch.unique``; all labels distinct: the batch as is;
# - S = normalize(x) normalize(x)^T with F.normalize (eps 1e-12), materialised [m, m];
# - a Python loop over the m rows: label ranks of -|y_i - y| and the feature ranks of S_i through an
#   autograd.Function (the blackbox solver), one F.mse_loss per row, summed;
# - ranks: the inverse of the (flipped) ascending argsort, (rank + 1) / m; the STS-B file sorts stably
#   (numpy ``kind='stable'``: among equal values the later index ranks first), the AgeDB file with
#   ``torch.argsort`` (no tie guarantee): ``stable=True`` here reproduces the STS-B rule, ``False`` the
#   AgeDB calls;
# - backward of the ranker: -(rank(S_i) - rank(S_i + lambda G_i)) / (lambda + 1e-8).
# Deviations, none of which changes a value: ranks keep the similarities' dtype (the published code casts
# them to float32; identical for fp32 features, and it lets fp64 runs be compared to 1e-10); the
# device is the inputs' (the published STS-B code hard-codes .cuda()); ``eps`` exposes the 1e-8 (in float32
# lambda + 1e-8 rounds to lambda for lambda >= 0.125; in float64 it does not: pass eps=0 to compare with
# the paper's formula).


def _published_rank(seq: torch.Tensor, stable: bool) -> torch.Tensor:
    order = torch.sort(seq, dim=1, stable=stable).indices if stable else torch.argsort(seq, dim=1)
    return torch.argsort(order.flip(1), dim=1)


def _published_rank_normalised(seq: torch.Tensor, stable: bool) -> torch.Tensor:
    return (_published_rank(seq, stable) + 1).to(seq.dtype) / seq.shape[1]


class _PublishedBlackboxRanker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq, lambda_val, stable, eps):
        rank = _published_rank_normalised(seq, stable)
        ctx.lambda_val, ctx.stable, ctx.eps = lambda_val, stable, eps
        ctx.save_for_backward(seq, rank)
        return rank

    @staticmethod
    def backward(ctx, grad_output):
        seq, rank = ctx.saved_tensors
        rank_prime = _published_rank_normalised(seq + ctx.lambda_val * grad_output, ctx.stable)
        return -(rank - rank_prime) / (ctx.lambda_val + ctx.eps), None, None, None


def published_unique_label_indices(targets: torch.Tensor, rng=None) -> Optional[list]:
    """The published subsample: for each distinct label (ascending) one of its rows by ``rng.choice``
    (``rng``: a ``random.Random``; None: the ``random`` module, as published); None if no label repeats."""
    import random

    rng = random if rng is None else rng
    unique = torch.unique(targets)
    if len(unique) == len(targets):
        return None
    return [rng.choice((targets == t).nonzero()[:, 0]).item() for t in unique]


def ranksim_loss_published(features: torch.Tensor, targets: torch.Tensor, lambda_val: float, *, stable: bool = True,
                           eps: float = 1e-8, rng=None, indices=None) -> torch.Tensor:
    """The published ``batchwise_ranking_regularizer(features, targets, lambda_val)``: features [n, ...],
    targets [n, 1]. ``indices``: use these rows instead of the random subsample (to compare with a given
    draw)."""
    if indices is None:
        indices = published_unique_label_indices(targets, rng)
    x, y = (features, targets) if indices is None else (features[indices], targets[indices])
    z = F.normalize(x.view(x.size(0), -1))
    xxt = torch.matmul(z, z.permute(1, 0))
    loss = 0
    for i in range(len(y)):
        label_ranks = _published_rank_normalised(-torch.abs(y[i] - y).transpose(0, 1), stable).to(xxt.dtype)
        feature_ranks = _PublishedBlackboxRanker.apply(xxt[i].unsqueeze(0), lambda_val, stable, eps)
        loss = loss + F.mse_loss(feature_ranks, label_ranks)
    return loss
