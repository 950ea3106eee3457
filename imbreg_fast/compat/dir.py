"""The API of YyzHarry/imbalanced-regression (Yang et al., ICML 2021) with its numerics, on imbreg_fast's ops.

Porting a script of the published code (``agedb-dir``, ``imdb-wiki-dir``) means changing its imports::

    from imbreg_fast.compat.dir import FDS, prepare_weights, shot_metrics, weighted_l1_loss  # was fds, loss, ...

and keeping its numbers (docs/methods.md, "compat.dir"). What each name computes, and where it runs:

- :class:`FDS` — the published module (its buffers, their names and meaning, its epoch schedule and its
  per-label bucketing), with the per-bucket statistics from the ``fds_accumulate`` kernel, the smoothing of
  the statistics by :func:`imbreg_fast.lds.smooth_counts` and the calibration by the ``fds_recolor`` kernel
  (the diagonal, per-channel rule of :class:`imbreg_fast.FDS` with ``covariance='diag'``). One published
  behaviour is not copied: :meth:`FDS.smooth` returns a new tensor instead of writing the calibrated
  features into its input.
- :func:`weighted_mse_loss`, :func:`weighted_l1_loss`, :func:`weighted_focal_mse_loss`,
  :func:`weighted_focal_l1_loss`, :func:`weighted_huber_loss` — ``imbreg_fast.functional``'s fused losses
  with the published positional arguments and ``torch.mean(w * loss)``.
- :func:`prepare_weights` (the datasets' ``_prepare_weights``) and :func:`get_lds_kernel_window` — on
  :mod:`imbreg_fast.lds`, with the published integer truncation of the smoothed counts under 'inverse' + LDS.
- :func:`shot_metrics` (``train.py``) — on :class:`imbreg_fast.metrics.DIRMetrics`, with the published
  grouping (one group per distinct test label, training labels truncated to int); an empty shot group gives
  NaN instead of the published crash.

The depth code's float32 ``int(depth * 10)`` bins are ``edge_rule='float32-truncate'`` of the mainline
:class:`imbreg_fast.FDS` and :class:`imbreg_fast.lds.LabelWeights` (:func:`imbreg_fast.lds.bin_index`).
Every entry point takes a keyword-only ``backend`` (``'auto'`` | ``'torch'`` | ``'cpp'`` | ``'triton'``)
where it runs a kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validation as V
from .. import functional as _F
from .. import lds as _lds
from .._dispatch import resolve
from ..metrics import DIRMetrics
from ..ops import fds as _ops

__all__ = ["FDS", "get_lds_kernel_window", "prepare_weights", "shot_metrics", "weighted_focal_l1_loss",
           "weighted_focal_mse_loss", "weighted_huber_loss", "weighted_l1_loss", "weighted_mse_loss"]

KERNELS = ("gaussian", "triang", "laplace")
REWEIGHTS = ("none", "inverse", "sqrt_inv")
ACTIVATIONS = ("sigmoid", "tanh")
_TINY_VARIANCE_SUM = 1e-10     # calibrate_mean_var: a bucket whose variances sum below this is left unchanged


# --------------------------------------------------------------------------------------------------
# Weighted losses (loss.py)
# --------------------------------------------------------------------------------------------------


def _check_loss_args(inputs, targets, weights) -> None:
    """Published argument names in the errors; the values are checked again by the mainline op."""
    for name, x in (("inputs", inputs), ("targets", targets)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
    if inputs.shape != targets.shape:
        # the published code would broadcast ([N, 1] - [N] is [N, N]); that is never what was meant
        raise ValueError(f"inputs and targets must have the same shape, got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"weights must be None or a floating-point torch.Tensor, got "
                            f"{getattr(weights, 'dtype', type(weights).__name__)}")
        try:
            ok = weights.dim() <= targets.dim() and \
                torch.broadcast_shapes(weights.shape, targets.shape) == targets.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"weights of shape {tuple(weights.shape)} cannot be expanded to the loss's shape "
                             f"{tuple(targets.shape)} (weights.expand_as(loss) must work)")


def _check_activate(activate) -> str:
    # the published code takes any value other than 'tanh' as 'sigmoid'; a typo is an error here
    if activate not in ACTIVATIONS:
        raise ValueError(f"activate must be one of {ACTIVATIONS}, got {activate!r}")
    return activate


def weighted_mse_loss(inputs, targets, weights=None, *, backend: str = "auto", check_finite: bool = True):
    """``torch.mean(weights * (inputs - targets) ** 2)`` (published ``loss.weighted_mse_loss``).

    ``inputs``, ``targets``: the same shape (e.g. ``[N, 1]``, dense ``[B, 1, H, W]``); ``weights``: None or
    any shape that ``expand_as`` the loss (``[N, 1]`` from the dataset). Runs
    :func:`imbreg_fast.functional.weighted_mse_loss` (``reduction='mean'``); ``backend``, ``check_finite`` as
    there. Unlike the published code, inputs of different shapes raise instead of broadcasting.
    """
    _check_loss_args(inputs, targets, weights)
    return _F.weighted_mse_loss(inputs, targets, weights, backend=backend, check_finite=check_finite)


def weighted_l1_loss(inputs, targets, weights=None, *, backend: str = "auto", check_finite: bool = True):
    """``torch.mean(weights * |inputs - targets|)`` (published ``loss.weighted_l1_loss``); see
    :func:`weighted_mse_loss`. Gradient ``sign(e)``, 0 at ``e = 0`` (as ``F.l1_loss``)."""
    _check_loss_args(inputs, targets, weights)
    return _F.weighted_l1_loss(inputs, targets, weights, backend=backend, check_finite=check_finite)


def weighted_focal_mse_loss(inputs, targets, weights=None, activate: str = "sigmoid", beta: float = .2,
                            gamma: float = 1, *, backend: str = "auto", check_finite: bool = True):
    """``torch.mean(weights * e^2 * f(|e|))``, ``f(a) = (2 sigmoid(beta a) - 1)^gamma`` or, with
    ``activate='tanh'``, ``tanh(beta a)^gamma`` (published ``loss.weighted_focal_mse_loss``).

    ``activate`` must be 'sigmoid' or 'tanh' (the published code silently takes any other value as
    'sigmoid'); ``beta > 0``, ``gamma >= 0``. See :func:`weighted_mse_loss`."""
    _check_loss_args(inputs, targets, weights)
    return _F.weighted_focal_mse_loss(inputs, targets, weights, activation=_check_activate(activate), beta=beta,
                                      gamma=gamma, backend=backend, check_finite=check_finite)


def weighted_focal_l1_loss(inputs, targets, weights=None, activate: str = "sigmoid", beta: float = .2,
                           gamma: float = 1, *, backend: str = "auto", check_finite: bool = True):
    """``torch.mean(weights * |e| * f(|e|))`` with the focal factor of :func:`weighted_focal_mse_loss`
    (published ``loss.weighted_focal_l1_loss``)."""
    _check_loss_args(inputs, targets, weights)
    return _F.weighted_focal_l1_loss(inputs, targets, weights, activation=_check_activate(activate), beta=beta,
                                     gamma=gamma, backend=backend, check_finite=check_finite)


def weighted_huber_loss(inputs, targets, weights=None, beta: float = 1., *, backend: str = "auto",
                        check_finite: bool = True):
    """``torch.mean(weights * l)``, ``l = 0.5 a^2 / beta`` if ``a = |e| < beta`` else ``a - 0.5 beta``
    (published ``loss.weighted_huber_loss``). ``beta >= 0``; ``beta = 0`` is the weighted L1 loss, as in the
    published code (no element satisfies ``a < 0``)."""
    _check_loss_args(inputs, targets, weights)
    beta = V.check_nonnegative("beta", beta)
    if beta == 0:
        return _F.weighted_l1_loss(inputs, targets, weights, backend=backend, check_finite=check_finite)
    return _F.weighted_huber_loss(inputs, targets, weights, beta=beta, backend=backend, check_finite=check_finite)


# --------------------------------------------------------------------------------------------------
# LDS (utils.get_lds_kernel_window, datasets._prepare_weights)
# --------------------------------------------------------------------------------------------------


def get_lds_kernel_window(kernel: str, ks: int, sigma: float) -> torch.Tensor:
    """The published LDS window (``utils.get_lds_kernel_window``), max-normalised, as a float64 CPU tensor
    ``[ks]`` (the published function returns a numpy array; ``numpy.asarray`` of this tensor is the same).

    ``kernel``: ``'gaussian'`` (``gaussian_filter1d`` of a length-``ks`` delta, reflect boundary: not a
    sampled Gaussian when ``4 sigma > ks / 2``), ``'triang'`` (``scipy.signal.windows.triang(ks)``; sigma
    unused) or ``'laplace'`` (``exp(-|x| / sigma)``). ``ks``: odd (the published code builds windows of
    inconsistent lengths for an even ``ks``). From :func:`imbreg_fast.lds.kernel_window`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return _lds.kernel_window(kernel, ks, 1.0 if kernel == "triang" else sigma, normalize="max")


def _as_tensor(name: str, x) -> torch.Tensor:
    """A tensor from a tensor, a numpy array, a pandas Series or a sequence of numbers (no copy of tensors)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor, an array or a sequence of numbers, got "
                        f"{type(x).__name__}") from None


def prepare_weights(labels, reweight: str, max_target: int = 121, lds: bool = False, lds_kernel: str = "gaussian",
                    lds_ks: int = 5, lds_sigma: float = 2) -> Optional[torch.Tensor]:
    """Per-sample loss weights of the training labels, as the published ``AgeDB/IMDBWIKI._prepare_weights``.

    Args:
        labels: the training labels (a tensor, numpy array, pandas Series or sequence; published:
            ``df['age'].values``), any shape, flattened. Label ``y`` counts in the integer bin
            ``min(max_target - 1, int(y))``; labels must be finite and > -1 (the published code fails with a
            KeyError on a negative bin).
        reweight: ``'none'`` (returns None), ``'inverse'`` (w ∝ 1 / clip(n_b, 5, 1000), the counts clipped,
            as published) or ``'sqrt_inv'`` (w ∝ 1 / sqrt(n_b)).
        max_target: the number of integer bins (published default 121: ages 0..120).
        lds: smooth the clipped (or square-rooted) counts with :func:`get_lds_kernel_window` (``'constant'``
            boundary) before inverting; needs ``reweight != 'none'``, as published. Under ``'inverse'`` the
            published smoothing runs on an integer array and so truncates every smoothed count to an integer
            (weights up to ~8 % away from float smoothing); this is reproduced exactly.
        lds_kernel, lds_ks, lds_sigma: the LDS window.

    Returns:
        None for ``reweight='none'`` or no labels (as published); otherwise float64 weights ``[N]`` on the
        labels' device (CPU for non-tensor labels), ``w_i = s / n~_{b(y_i)}`` with ``s`` making their mean 1.
        The published list holds ``float32(1 / n~) * s``; the float32 rounding is not copied (< 1 float32 ulp).

    Runs on :class:`imbreg_fast.lds.LabelWeights` (1-wide bins over ``[0, max_target)``).
    """
    if reweight not in REWEIGHTS:
        raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
    if not isinstance(lds, bool):
        raise TypeError(f"lds must be a bool, got {type(lds).__name__}")
    if lds and reweight == "none":
        raise ValueError("lds=True needs reweight='sqrt_inv' or 'inverse' (LDS smooths the label density that is "
                         "inverted), as the published code asserts")
    max_target = V.check_int("max_target", max_target, 1)
    labels = _as_tensor("labels", labels)
    V.check_labels(labels)
    labels = labels.detach().reshape(-1)
    if labels.numel() and V.any_true(labels <= -1):
        raise ValueError("labels must be > -1: label y goes to bin int(y), and the published bins are "
                         f"0..max_target - 1 = {max_target - 1}")
    if lds:
        lds_ks = V.check_int("lds_ks", lds_ks, 1)
        if lds_ks % 2 == 0:
            raise ValueError(f"lds_ks must be odd, got {lds_ks}")
        if lds_kernel != "triang":
            V.check_positive("lds_sigma", lds_sigma)
        if lds_kernel not in KERNELS:
            raise ValueError(f"lds_kernel must be one of {KERNELS}, got {lds_kernel!r}")
        window = get_lds_kernel_window(lds_kernel, lds_ks, lds_sigma)
    if labels.numel() == 0 or reweight == "none":
        return None
    edges = torch.arange(max_target + 1, dtype=torch.float64)      # bin b = [b, b + 1): int(y), clamped above
    inverse = reweight == "inverse"
    lw = _lds.LabelWeights(edges, scheme="inv" if inverse else "sqrt_inv", lds=lds,
                           kernel=lds_kernel, ks=lds_ks, sigma=1.0 if lds_kernel == "triang" else lds_sigma,
                           mode="constant", clip=(5, 1000) if inverse else None).fit(labels)
    if not (inverse and lds):
        return lw.weights(labels, dtype=torch.float64)
    # the published smoothing of an integer array: each smoothed count truncated toward zero (scipy's
    # summation order, which smooth_counts follows, decides the last bit: see its docstring)
    density = torch.trunc(_lds.smooth_counts(lw.counts.clamp(5, 1000), window, "constant"))
    inv = 1.0 / density[_lds.bin_index(labels, lw.edges)]
    return inv * (labels.numel() / inv.sum())


# --------------------------------------------------------------------------------------------------
# Shot metrics (train.py)
# --------------------------------------------------------------------------------------------------


def shot_metrics(preds, labels, train_labels, many_shot_thr: int = 100, low_shot_thr: int = 20) -> dict:
    """The published many / median / low-shot errors (``train.shot_metrics``).

    Groups: one per distinct test label value ``l``; its training count is the number of training labels
    with ``int(y) == l`` (training labels truncated toward zero, test labels not: a non-integer test label
    has count 0). A group is many-shot if its count is > ``many_shot_thr``, low-shot if < ``low_shot_thr``,
    median-shot otherwise. Per shot: ``mse`` and ``l1`` over its test samples (sum of errors over their
    number) and ``gmean``, the geometric mean of the absolute errors (0 when one of them is exactly 0).

    Args:
        preds, labels: test predictions and labels, tensors or numpy arrays (published:
            ``np.hstack`` of the batches), the same number of elements (flattened).
        train_labels: the training labels (tensor, array, pandas Series or sequence).
        many_shot_thr, low_shot_thr: ints, ``low_shot_thr <= many_shot_thr``.

    Returns:
        ``{'many': {'mse', 'l1', 'gmean'}, 'median': {...}, 'low': {...}}`` of Python floats. A group without
        test samples gives NaN for its three values (the published code crashes in ``np.hstack``).

    Computed by :class:`imbreg_fast.metrics.DIRMetrics` in float64 (the published code computes in the
    predictions' dtype, float32 for a float32 model: the values agree to float32 rounding).
    """
    if not (isinstance(preds, torch.Tensor) or hasattr(preds, "__array__")):
        raise TypeError(f"preds must be a torch.Tensor or a numpy array, got {type(preds).__name__}")
    preds, labels = _as_tensor("preds", preds), _as_tensor("labels", labels)
    train = _as_tensor("train_labels", train_labels)
    for name, x in (("preds", preds), ("labels", labels), ("train_labels", train)):
        V.check_real_tensor(name, x)
    if preds.numel() != labels.numel():
        raise ValueError(f"preds and labels must have the same number of elements, got {preds.numel()} and "
                         f"{labels.numel()}")
    many_shot_thr = V.check_int("many_shot_thr", many_shot_thr)
    low_shot_thr = V.check_int("low_shot_thr", low_shot_thr)
    if low_shot_thr > many_shot_thr:
        raise ValueError(f"low_shot_thr must be <= many_shot_thr, got {low_shot_thr} > {many_shot_thr}")
    labels = labels.detach().reshape(-1).to(torch.float64)
    V.check_labels(labels)
    V.check_labels(train, name="train_labels")
    preds = preds.detach().reshape(-1).to(device=labels.device, dtype=torch.float64)
    nan = {"mse": math.nan, "l1": math.nan, "gmean": math.nan}
    if labels.numel() == 0:
        return {"many": dict(nan), "median": dict(nan), "low": dict(nan)}

    # bins: one per distinct test label u_k, [u_k, u_{k+1}) (the last one 1 wide); each test label is an edge
    values = torch.unique(labels)
    edges = torch.cat([values, values[-1:] + 1.0])
    # training count of u_k: training labels truncated toward zero (astype(int)) equal to u_k
    train = torch.trunc(train.detach().reshape(-1).to(device=labels.device, dtype=torch.float64))
    pos = torch.searchsorted(values, train).clamp(max=values.numel() - 1)
    hit = values[pos] == train
    counts = torch.bincount(pos[hit], minlength=values.numel()).to(torch.float64)

    metric = DIRMetrics(edges.cpu(), train_counts=counts.cpu(), many=many_shot_thr, few=low_shot_thr,
                        sync_on_compute=False).to(labels.device)
    metric.update(preds, labels)
    res = metric.compute()
    out = {}
    for published, ours in (("many", "many"), ("median", "medium"), ("low", "few")):
        if int(res[f"{ours}/count"]) == 0:
            out[published] = dict(nan)
            continue
        gmean = 0.0 if int(res[f"{ours}/gm_floored"]) > 0 else float(res[f"{ours}/gm"])   # log(0) = -inf
        out[published] = {"mse": float(res[f"{ours}/mse"]), "l1": float(res[f"{ours}/mae"]), "gmean": gmean}
    return out


# --------------------------------------------------------------------------------------------------
# FDS (fds.py, utils.calibrate_mean_var, the schedule of train.py)
# --------------------------------------------------------------------------------------------------


class FDS(nn.Module):
    """The published FDS module (``agedb-dir/fds.py``, ``imdb-wiki-dir/fds.py``) for row features ``[N, C]``.

    Args (published): ``feature_dim`` C; buckets ``bucket_start .. bucket_num - 1`` (one per integer label,
    row ``label - bucket_start`` of the statistics); ``start_update``, ``start_smooth`` (epochs);
    ``kernel`` ('gaussian', 'triang', 'laplace'), ``ks`` (odd), ``sigma`` of the sum-normalised smoothing
    window (:func:`imbreg_fast.lds.kernel_window`, the published windows); ``momentum`` of the running
    statistics (None: cumulative average). Keyword-only: ``clip``, the clamp of the variance ratio
    (published ``calibrate_mean_var``: (0.1, 10)), and ``backend`` of the two FDS kernels.

    Buffers (published names, meaning and shapes; the module's float dtype, float32 by default, ``.double()``
    for float64): ``epoch`` ``[1]`` (starts at ``start_update``), ``running_mean`` / ``running_var``
    ``[bucket_num - bucket_start, C]`` (0 / 1 initially), ``running_mean_last_epoch`` /
    ``running_var_last_epoch``, ``smoothed_mean_last_epoch`` / ``smoothed_var_last_epoch``,
    ``num_samples_tracked`` ``[bucket_num - bucket_start]``. A published checkpoint loads as is, and the
    ``state_dict`` round-trips.

    The published schedule (``train.py``), per epoch ``e``: training steps call :meth:`smooth` (in the
    model's forward); after the epoch, with ``e >= start_update``, :meth:`update_last_epoch_stats` ``(e)``
    then :meth:`update_running_stats` ``(features, labels, e)`` over a pass of the training set. Its
    numerics, all copied:

    - :meth:`update_last_epoch_stats` acts only when ``e == epoch + 1``: it increments ``epoch``, smooths the
      running statistics (so far: folded up to epoch ``e - 1``) into ``smoothed_*_last_epoch`` (convolution
      over all buckets, reflect padding without repeating the edge bucket, never-seen buckets included with
      their initial 0 / 1), and makes ``running_*_last_epoch`` the running statistics themselves (published:
      the buffers are aliased), so they follow every later :meth:`update_running_stats`. Calibration in
      epoch ``e + 1`` thus maps from statistics folded up to epoch ``e`` to smoothed ones up to ``e - 1``.
      Until it first acts (at the end of epoch ``start_update + 1``) the buffers are 0 / 1 and calibration
      is the identity: calibration starts in epoch ``max(start_smooth, start_update + 2)``, i.e.
      ``start_smooth + 1`` with the defaults.
    - :meth:`update_running_stats` (skipped when ``e < epoch``): one EMA step per distinct label value ``l``
      in ``[bucket_start, bucket_num - 1]``, in increasing order, with the mean and variance (unbiased; 0 for
      one sample) of the rows labelled ``l`` — plus the rows below ``bucket_start`` when ``l ==
      bucket_start``, and above ``bucket_num - 1`` when ``l == bucket_num - 1`` (rows outside the range are
      dropped when that boundary label itself is absent); bucket ``int(l - bucket_start)`` (non-integer
      labels of one bucket each make their own step). ``num_samples_tracked`` grows by the rows; the factor
      is ``momentum`` (None: ``1 - n / num_samples_tracked``) and 0 (replace) when ``e == start_update``;
      buckets never seen keep their 0 / 1, which a first update with momentum blends in.
    - :meth:`smooth` (identity when ``e < start_smooth``): rows bucketed as above (within the batch),
      ``(z - m1) * sqrt(clamp(v2 / v1, *clip)) + m2`` per channel with ``m1, v1 = running_*_last_epoch`` and
      ``m2, v2 = smoothed_*_last_epoch`` of the bucket; channels with ``v1 == 0`` and buckets whose ``v1``
      sum below 1e-10 unchanged.

    Not copied: the published :meth:`smooth` writes the calibrated rows into ``features`` in place (and the
    published model returns that same tensor as the features for the statistics pass, so its statistics
    come from calibrated features); here :meth:`smooth` returns a new tensor and ``features`` is unchanged,
    differentiable as usual (gradient ``sqrt(clamp(v2 / v1))`` per calibrated channel). To feed the
    statistics exactly as the published model does, pass the calibrated features to
    :meth:`update_running_stats`. Inputs must be on the module's device; the published per-label loops with
    their host syncs are one kernel call each here (plus one ``torch.unique`` per statistics update).
    """

    def __init__(self, feature_dim: int, bucket_num: int = 100, bucket_start: int = 3, start_update: int = 0,
                 start_smooth: int = 1, kernel: str = "gaussian", ks: int = 5, sigma: float = 2,
                 momentum: Optional[float] = 0.9, *, clip=(0.1, 10.0), backend: str = "auto"):
        super().__init__()
        self.feature_dim = V.check_int("feature_dim", feature_dim, 1)
        self.bucket_num = V.check_int("bucket_num", bucket_num, 1)
        self.bucket_start = V.check_int("bucket_start", bucket_start, 0)
        if bucket_start >= bucket_num:
            raise ValueError(f"bucket_start must be < bucket_num, got bucket_start={bucket_start}, "
                             f"bucket_num={bucket_num}")
        self.start_update = V.check_int("start_update", start_update)
        self.start_smooth = V.check_int("start_smooth", start_smooth)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel_window = _lds.kernel_window(kernel, ks, 1.0 if kernel == "triang" else sigma, normalize="sum")
        self.kernel, self.ks, self.sigma = kernel, ks, sigma
        self.half_ks = (ks - 1) // 2
        self.momentum = V.check_momentum("momentum", momentum)
        self.clip = V.check_clip("clip", clip)
        self.backend = backend

        nb, c = bucket_num - bucket_start, self.feature_dim
        self.register_buffer("epoch", torch.zeros(1).fill_(start_update))
        self.register_buffer("running_mean", torch.zeros(nb, c))
        self.register_buffer("running_var", torch.ones(nb, c))
        self.register_buffer("running_mean_last_epoch", torch.zeros(nb, c))
        self.register_buffer("running_var_last_epoch", torch.ones(nb, c))
        self.register_buffer("smoothed_mean_last_epoch", torch.zeros(nb, c))
        self.register_buffer("smoothed_var_last_epoch", torch.ones(nb, c))
        self.register_buffer("num_samples_tracked", torch.zeros(nb))
        # published: running_*_last_epoch ARE running_* after the first update_last_epoch_stats (aliased);
        # here they are kept equal (copied after each update). Like the alias, this is not saved: a module
        # loaded from a state_dict starts unaliased, as a published module loaded from a checkpoint.
        self._last_epoch_is_running = False

    @property
    def num_buckets(self) -> int:
        return self.bucket_num - self.bucket_start

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, bucket_num={self.bucket_num}, bucket_start={self.bucket_start}, "
                f"start_update={self.start_update}, start_smooth={self.start_smooth}, kernel={self.kernel!r}, "
                f"ks={self.ks}, sigma={self.sigma}, momentum={self.momentum}, clip={self.clip}, "
                f"backend={self.backend!r}")

    # ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """All statistics back to their initial values (0 means, 1 variances, no samples tracked)."""
        for name in ("running_mean", "running_mean_last_epoch", "smoothed_mean_last_epoch", "num_samples_tracked"):
            getattr(self, name).zero_()
        for name in ("running_var", "running_var_last_epoch", "smoothed_var_last_epoch"):
            getattr(self, name).fill_(1)

    @torch.no_grad()
    def update_last_epoch_stats(self, epoch: int) -> None:
        """End of epoch ``epoch``, before :meth:`update_running_stats`: if ``epoch == self.epoch + 1``,
        increment ``self.epoch``, smooth the running statistics into ``smoothed_*_last_epoch`` and make
        ``running_*_last_epoch`` follow the running statistics (see the class docstring)."""
        epoch = V.check_int("epoch", epoch)
        if epoch != float(self.epoch) + 1:
            return
        self.epoch += 1
        self._last_epoch_is_running = True
        self.running_mean_last_epoch.copy_(self.running_mean)
        self.running_var_last_epoch.copy_(self.running_var)
        # published: F.conv1d over the bucket axis after F.pad(mode='reflect') = scipy's 'mirror' extension
        for src, dst in ((self.running_mean, self.smoothed_mean_last_epoch),
                         (self.running_var, self.smoothed_var_last_epoch)):
            dst.copy_(_lds.smooth_counts(src.t(), self.kernel_window, mode="mirror").t())

    def _check_rows(self, features, labels):
        """features [N, C] of this module's C; labels [N] or [N, 1], real and finite -> labels [N]."""
        features = V.check_float_tensor("features", features)
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be [N, feature_dim] = [N, {self.feature_dim}], got shape "
                             f"{tuple(features.shape)}")
        V.check_labels(labels)
        n = features.shape[0]
        if tuple(labels.shape) not in ((n,), (n, 1)):
            raise ValueError(f"labels must be [N] or [N, 1] with N = {n} (one label per row of features), got "
                             f"shape {tuple(labels.shape)}")
        V.check_same_device(features=features, labels=labels)
        if features.device != self.running_mean.device:
            raise ValueError(f"features are on {features.device} but the FDS statistics are on "
                             f"{self.running_mean.device}; move the module with .to(device)")
        return labels.reshape(-1)

    def _bucketed(self, labels: torch.Tensor):
        """Per row: the label its group is keyed by (the label; ``bucket_start`` / ``bucket_num - 1`` for rows
        below / above the range when that label is in the batch) and its bucket, -1 for rows left out."""
        lo, hi = self.bucket_start, self.bucket_num - 1
        key = labels
        inside = (labels >= lo) & (labels <= hi)
        below = (labels < lo) & (labels == lo).any()
        key = torch.where(below, torch.full_like(labels, lo), key)
        taken = inside | below
        if hi != lo:        # one bucket: the published loop takes only the rows <= bucket_start
            above = (labels > hi) & (labels == hi).any()
            key = torch.where(above, torch.full_like(labels, hi), key)
            taken = taken | above
        bucket = (key - lo).to(torch.int64)                # int(label - bucket_start), in the labels' dtype
        return key, torch.where(taken, bucket, torch.full_like(bucket, -1))

    @torch.no_grad()
    def update_running_stats(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        """Fold the features of a pass over the training set into the running statistics (the published
        per-label EMA; see the class docstring). ``features`` ``[N, C]``, ``labels`` ``[N]`` or ``[N, 1]``.
        Skipped when ``epoch < self.epoch``."""
        epoch = V.check_int("epoch", epoch)
        labels = self._check_rows(features, labels)
        if epoch < float(self.epoch):
            return
        key, bucket = self._bucketed(labels)
        taken = bucket >= 0
        if not V.any_true(taken):
            return
        values, group = torch.unique(key[taken], sorted=True, return_inverse=True)
        rows = torch.full_like(bucket, -1)
        rows[taken] = group                                 # group (distinct label) of each row, -1: none
        f3 = _ops.as_pixels(features.detach())
        _, impl = resolve("fds_accumulate", f3, self.backend)
        count, mean, m2 = impl(f3, rows.unsqueeze(0).contiguous(), values.numel(), False)
        var = torch.where((count > 1).unsqueeze(1), m2 / (count - 1).clamp(min=1).unsqueeze(1),
                          torch.zeros_like(m2))              # torch.var: unbiased, biased (0) for one row
        g_bucket = (values - self.bucket_start).to(torch.int64)
        # groups sharing a bucket (non-integer labels) are consecutive: EMA steps in label order, one round each
        rank = torch.arange(values.numel(), device=values.device) - torch.searchsorted(g_bucket, g_bucket)
        run_mean, run_var = self.running_mean.double(), self.running_var.double()
        tracked = self.num_samples_tracked.double()
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            b, n = g_bucket[sel], count[sel]
            tracked[b] += n
            if epoch == self.start_update:
                factor = torch.zeros_like(n)
            elif self.momentum is None:
                factor = 1.0 - n / tracked[b]
            else:
                factor = torch.full_like(n, self.momentum)
            f = factor.unsqueeze(1)
            run_mean[b] = (1 - f) * mean[sel] + f * run_mean[b]
            run_var[b] = (1 - f) * var[sel] + f * run_var[b]
        self.running_mean.copy_(run_mean)
        self.running_var.copy_(run_var)
        self.num_samples_tracked.copy_(tracked)
        if self._last_epoch_is_running:
            self.running_mean_last_epoch.copy_(self.running_mean)
            self.running_var_last_epoch.copy_(self.running_var)

    def _calibration(self, dtype: torch.dtype):
        """Per bucket and channel, calibrate_mean_var as an affine map ``a z + s``: (a, s) [nb, C] in ``dtype``."""
        m1, v1 = self.running_mean_last_epoch.double(), self.running_var_last_epoch.double()
        m2, v2 = self.smoothed_mean_last_epoch.double(), self.smoothed_var_last_epoch.double()
        valid = (v1 != 0) & (v1.sum(1, keepdim=True) >= _TINY_VARIANCE_SUM)
        ratio = (v2 / torch.where(valid, v1, torch.ones_like(v1))).clamp(*self.clip)
        a = torch.where(valid, ratio.sqrt(), torch.ones_like(v1))
        shift = torch.where(valid, m2 - a * m1, torch.zeros_like(m1))
        return a.to(dtype), shift.to(dtype)

    def smooth(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Calibrated features (a new tensor, ``features``' shape and dtype) from epoch ``start_smooth`` on,
        ``features`` itself before. ``features`` ``[N, C]``, ``labels`` ``[N, 1]`` (published) or ``[N]``.
        Differentiable w.r.t. ``features``; no gradient into the statistics."""
        epoch = V.check_int("epoch", epoch)
        labels = self._check_rows(features, labels)
        if epoch < self.start_smooth:
            return features
        _, bucket = self._bucketed(labels)
        f3 = _ops.as_pixels(features)
        _, impl = resolve("fds_recolor", f3, self.backend)
        a, shift = self._calibration(V.compute_dtype(features.dtype))
        return _ops.restore_layout(impl(f3, bucket.unsqueeze(0).contiguous(), a, shift), features)
