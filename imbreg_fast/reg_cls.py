"""Classification-aided regression (docs/methods.md §4).

Pintea et al., "A step towards understanding why classification helps regression", ICCV 2023; reference
code SilviaLauraPintea/reg-cls. A classification head over C classes of the target is trained next to the
regression head, with a cross-entropy term added to the regression loss. The classes are histogram-equalised
bins of the training targets, and each sample's (each pixel's) class label is kept for the cross-entropy
with probability ρ(class) = min_j n_j / n_class, so that the cross-entropy sees a class-balanced subsample.

- :class:`ClassBins` — the classes (an ``nn.Module``: its tables are buffers, saved in ``state_dict``).
  ``ClassBins.fit(train_targets, num_classes)`` bins and equalises; ``assign(targets)`` maps targets of
  any shape to int64 class indices with one ``bucketize``; ``keep_prob`` is ρ per class.
- :func:`balanced_class_mask` — the per-sample / per-pixel Bernoulli keep mask, keep with probability
  ``keep_prob[class]``; reproducible with a ``torch.Generator``; no host synchronisation.
- :class:`RegClsLoss` — ``λ·L_reg + L_CE`` (λ > 1) or ``L_reg + L_CE/λ`` (λ ≤ 1), the cross-entropy
  averaged over the kept labels only (0, not NaN, when none is kept).

Example::

    bins = ClassBins.fit(train_ages, num_classes=10)            # may merge into fewer classes
    head = torch.nn.Linear(512, bins.num_classes)
    criterion = RegClsLoss(imbreg_fast.functional.weighted_mse_loss, bins, lam=10.0)
    loss = criterion(pred, head(features), target)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as V
from . import distributed as D
from .lds import bin_edges, bin_index, label_histogram

__all__ = ["ClassBins", "RegClsLoss", "RegClsOutput", "balanced_class_mask", "equalize_histogram"]

IGNORE_INDEX = -100   # F.cross_entropy's default ignore_index: the label of dropped / masked-out samples


# --------------------------------------------------------------------------------------------------
# Histogram equalisation
# --------------------------------------------------------------------------------------------------


def equalize_histogram(counts: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge consecutive fine bins into classes of near-equal counts (the paper's / reference's rule).

    Args:
        counts: fine-bin counts ``[K]`` (real, finite, >= 0, not all zero).
        num_classes: the number of classes asked for (>= 1).

    Returns:
        ``(first_bin, starts)``: int64 tensors; ``first_bin`` (0-dim) is the first non-empty fine bin and
        ``starts [C]`` the fine-bin index at which each class starts (``starts[0] == first_bin``). Class c
        holds the fine bins ``starts[c] .. starts[c+1] - 1`` (the last one up to bin K-1).

    Rule: drop the leading empty bins, leaving M fine bins h_0..h_{M-1} with N = Σ h. With
    T = min(num_classes, M) and the cumulative counts S_j = h_0 + ... + h_j, fine bin j goes to slot
    ``q_j = max(round((T / N) · S_j) − 1, 0)`` (round half to even, as numpy's); consecutive bins with the same
    slot form one class. q is non-decreasing and changes only at a non-empty bin, so every class holds at
    least one target; there are at most T classes (fewer when slots are skipped); empty bins inside or after
    the data join the class before them.
    """
    counts = V.check_real_tensor("counts", counts).to(torch.float64)
    num_classes = V.check_int("num_classes", num_classes, 1)
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D [K], got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) or not bool(counts.sum() > 0):
        raise ValueError("counts must be finite, >= 0 and not all zero")
    first = torch.nonzero(counts > 0).reshape(-1)[0]
    h = counts[int(first):]
    slots = min(int(num_classes), h.shape[0])
    cum = torch.cumsum(h, 0)
    q = torch.clamp(torch.round((slots / cum[-1]) * cum) - 1, min=0)
    new_class = torch.ones_like(q, dtype=torch.bool)
    new_class[1:] = q[1:] != q[:-1]
    starts = torch.nonzero(new_class).reshape(-1) + first
    return first, starts


# --------------------------------------------------------------------------------------------------
# ClassBins
# --------------------------------------------------------------------------------------------------


class ClassBins(nn.Module):
    """Classes of a scalar regression target: contiguous intervals of the target range.

    Build it with :meth:`fit` (from training targets) or :meth:`from_histogram` (from fine-bin counts summed
    over a loader); ``ClassBins()`` is an empty module to ``load_state_dict`` a fitted one into (the buffers
    take the checkpoint's sizes).

    Buffers (float64; they keep float64 under ``.to(dtype)`` / ``.half()``, only the device follows):

    - ``edges [C + 1]``: class c is ``[edges[c], edges[c+1])``, the last class closed at ``edges[C]``. The
      classes tile the fitting range: ``edges[0]`` and ``edges[C]`` are its ends.
    - ``counts [C]``: training targets per class.

    Derived: ``num_classes``, ``keep_prob`` (ρ), ``class_centers``.
    """

    edges: torch.Tensor
    counts: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("edges", torch.empty(0, dtype=torch.float64))
        self.register_buffer("counts", torch.empty(0, dtype=torch.float64))

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def fit(cls, train_targets: torch.Tensor, num_classes: int, range: Optional[Sequence[float]] = None,
            equalize: bool = True, *, num_bins: Optional[int] = None, mask: Optional[torch.Tensor] = None,
            check_finite: bool = True, sync: bool = False, process_group=None) -> "ClassBins":
        """A new :class:`ClassBins` fitted on the training targets (a classmethod: ``ClassBins.fit(...)``).

        Args:
            train_targets: the training targets, any shape (e.g. dense ``[B, 1, H, W]`` depth maps), a
                floating or integer dtype.
            num_classes: classes asked for, >= 2. With ``equalize`` the result may have fewer (see below):
                size the classification head with the fitted :attr:`num_classes`.
            range: ``(lo, hi)`` of the fine bins; default the targets' min and max. Targets outside the
                range count in the first / last fine bin.
            equalize: histogram-equalise (default, the paper). ``False``: the classes are the ``num_classes``
                uniform bins themselves, empty ones included.
            num_bins: fine uniform bins over ``range`` before equalisation, >= ``num_classes``; default
                ``num_classes`` (the reference). With ``equalize=False`` it must be None or ``num_classes``.
            mask: optional bool tensor of the targets' shape; only the kept targets are counted.
            check_finite: refuse NaN/inf targets (where kept) with a ValueError.
            sync, process_group: ``sync=True``: ``train_targets`` is this process's shard (it may keep no
                target); the classes are fitted on the targets of every process of ``process_group`` (the
                range without ``range`` and the fine counts all-reduced, docs/methods.md §7.3), the same on
                every process.

        Equalisation (:func:`equalize_histogram`): the leading empty fine bins are dropped, then the M
        remaining bins are merged into at most ``T = min(num_classes, M)`` classes of near-equal counts. With
        ``num_bins == num_classes`` this is exactly the reference (whose T is the number of bins left after
        dropping the leading empty ones). The result has at most ``num_classes`` classes and at most as many
        as there are non-empty fine bins; if it has fewer than 2 (one fine bin holds nearly all targets) a
        ValueError asks for more fine bins or ``equalize=False`` (the reference silently falls back to the
        unequalised bins there).
        """
        group = D.sync_group(sync, process_group)
        with D.agreement(group, "ClassBins.fit", getattr(train_targets, "device", None)) as agreed:
            V.check_labels(train_targets, mask, check_finite=check_finite, name="train_targets")
            num_classes, num_bins = _check_num_classes(num_classes, num_bins, equalize)
            kept = train_targets if mask is None else train_targets[mask]
            if kept.numel() == 0 and group is None:
                raise ValueError("train_targets has no (kept) element to fit the classes on")
            if range is not None:
                bin_edges(num_bins, range)                      # validates range here, on every process
            agreed.signature = {"num_classes": num_classes, "num_bins": num_bins, "equalize": int(equalize),
                                "range": D.fingerprint(None if range is None else tuple(float(v) for v in range))}
        if range is None:
            lo, hi = D.value_range(kept, group, "train_targets has no (kept) element on any process to fit the "
                                                "classes on")
            if not hi > lo:
                raise ValueError(f"train_targets are all equal to {lo}: pass range=(lo, hi) explicitly")
            range = (lo, hi)
        edges = bin_edges(num_bins, range, device=train_targets.device)
        counts = label_histogram(train_targets, edges, mask=mask, check_finite=False)
        if group is not None:
            counts = D.all_reduce(counts, "sum", group)
        return cls._from_fine(counts, edges, num_classes, equalize)

    @classmethod
    def from_histogram(cls, counts: torch.Tensor, edges: torch.Tensor, num_classes: int,
                       equalize: bool = True) -> "ClassBins":
        """A new :class:`ClassBins` from fine-bin counts, e.g. summed over a loader::

            edges = imbreg_fast.lds.bin_edges(100, range=(0.0, 10.0))
            counts = sum(imbreg_fast.lds.label_histogram(d, edges, mask=m) for d, m in loader)
            bins = ClassBins.from_histogram(counts, edges, num_classes=100)

        ``counts [K]``: real, finite, >= 0, not all zero; ``edges [K + 1]``: increasing fine-bin edges (from
        :func:`imbreg_fast.lds.bin_edges`; need not be uniform). ``num_classes``, ``equalize``: as in
        :meth:`fit` (``num_bins`` is K here).
        """
        counts = V.check_real_tensor("counts", counts)
        edges = bin_edges(V.check_real_tensor("edges", edges))
        if counts.dim() != 1 or counts.shape[0] != edges.shape[0] - 1:
            raise ValueError(f"counts must have shape [K] = [{edges.shape[0] - 1}] for edges of shape "
                             f"{tuple(edges.shape)}, got {tuple(counts.shape)}")
        counts = counts.to(torch.float64)
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("counts must be finite and >= 0")
        num_classes, _ = _check_num_classes(num_classes, counts.shape[0], equalize)
        return cls._from_fine(counts, edges.to(counts.device), num_classes, equalize)

    @classmethod
    def _from_fine(cls, counts: torch.Tensor, edges: torch.Tensor, num_classes: int, equalize: bool) -> "ClassBins":
        if not bool(counts.sum() > 0):
            raise ValueError("counts are all zero: no training target to fit the classes on")
        out = cls()
        if not equalize:
            out.edges, out.counts = edges.clone(), counts.clone()
            return out
        _, starts = equalize_histogram(counts, num_classes)
        if starts.shape[0] < 2:
            raise ValueError(f"histogram equalisation merged every training target into one class (one fine "
                             f"bin holds nearly all of them); use more fine bins (num_bins > {counts.shape[0]}) "
                             "or equalize=False")
        # class edges: the range's ends and the lower edge of each class's first fine bin; every class's
        # count: the sum of its fine bins (leading empty bins, before starts[0], count nothing)
        out.edges = torch.cat([edges[:1], edges[starts[1:]], edges[-1:]])
        ends = torch.cat([starts[1:], starts.new_tensor([counts.shape[0]])])
        cum = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        out.counts = cum[ends] - cum[starts]
        return out

    # ---- derived tables --------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        return self.counts.numel() > 0

    @property
    def num_classes(self) -> int:
        return self.counts.numel()

    @property
    def keep_prob(self) -> torch.Tensor:
        """ρ per class, float64 ``[C]``: ``min_j n_j / n_c`` over the non-empty classes; 1 for an empty class
        (possible only with ``equalize=False``: it holds no training target)."""
        filled = self.counts > 0
        smallest = torch.where(filled, self.counts, math.inf).amin()
        return torch.where(filled, smallest / torch.where(filled, self.counts, 1.0), 1.0)

    @property
    def class_centers(self) -> torch.Tensor:
        """Mid-point of each class interval, float64 ``[C]`` (a class → a value; the reference does not use
        it: its prediction is the regression head's)."""
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    # ---- per-step ----------------------------------------------------------------------------------

    def assign(self, targets: torch.Tensor) -> torch.Tensor:
        """Class index of each target: int64, the targets' shape (dense maps included); one ``bucketize``.

        Targets below ``edges[0]`` go to class 0, at or above ``edges[C]`` to class C-1 (the reference gives
        -1, i.e. ignored, below the range and clamps above it); NaN goes to class C-1 (mask it out). No
        value check and no host synchronisation. The module must be on the targets' device.
        """
        self._check_fitted()
        V.check_real_tensor("targets", targets)
        if targets.device != self.edges.device:
            raise ValueError(f"targets are on {targets.device} but the ClassBins tables are on "
                             f"{self.edges.device}: move the module with .to(device)")
        return bin_index(targets.detach(), self.edges)

    forward = assign

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("ClassBins is empty: build it with ClassBins.fit / from_histogram, or "
                               "load_state_dict a fitted one")

    # ---- nn.Module plumbing ------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Move the float64 tables with the module but never cast them: .half() / .to(dtype) would round the
        # class edges and change the class of targets near them.
        def device_only(t):
            moved = fn(t)
            if moved.dtype == t.dtype:
                return moved
            return t if moved.device == t.device else t.to(moved.device)
        return super()._apply(device_only, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the tables' sizes depend on the fit: take the checkpoint's (an empty ClassBins() can load any fit)
        for name in ("edges", "counts"):
            src = state_dict.get(prefix + name)
            if isinstance(src, torch.Tensor) and src.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty(src.shape, dtype=torch.float64, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.edges.numel() != self.counts.numel() + 1 or (self.fitted and self.num_classes < 2):
            error_msgs.append(f"ClassBins: inconsistent tables, edges {tuple(self.edges.shape)} and counts "
                              f"{tuple(self.counts.shape)} (need [C + 1] and [C], C >= 2)")

    def extra_repr(self) -> str:
        if not self.fitted:
            return "empty"
        if self.edges.device.type == "meta":
            return f"num_classes={self.num_classes}"
        return (f"num_classes={self.num_classes}, range=[{float(self.edges[0]):.4g}, "
                f"{float(self.edges[-1]):.4g}]")


def _check_num_classes(num_classes, num_bins, equalize) -> tuple[int, int]:
    if not isinstance(equalize, bool):
        raise TypeError(f"equalize must be a bool, got {type(equalize).__name__}")
    num_classes = V.check_int("num_classes", num_classes, 2)
    if num_bins is None:
        num_bins = num_classes
    num_bins = V.check_int("num_bins", num_bins, num_classes)
    if not equalize and num_bins != num_classes:
        raise ValueError(f"with equalize=False the classes are the fine bins: num_bins ({num_bins}) must be "
                         f"None or num_classes ({num_classes})")
    return num_classes, num_bins


# --------------------------------------------------------------------------------------------------
# Balanced keep mask
# --------------------------------------------------------------------------------------------------


def balanced_class_mask(classes: torch.Tensor, keep_prob: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bernoulli keep mask: element i is kept with probability ``keep_prob[classes[i]]``, independently.

    Args:
        classes: integer class indices, any shape (e.g. :meth:`ClassBins.assign` of a dense map). A negative
            index (an ignore label) is never kept. An index >= ``len(keep_prob)`` is an indexing error.
        keep_prob: floating ``[C]`` probabilities (e.g. :attr:`ClassBins.keep_prob`), on ``classes``' device.
        generator: optional ``torch.Generator`` on ``classes``' device, for reproducible draws.

    Returns:
        bool tensor of ``classes``' shape. One ``torch.rand`` draw of that shape per call (fresh every step);
        element i is kept when ``u_i < keep_prob[c_i]``, so probability 1 always keeps and 0 never does (the
        reference drops when ``u >= ρ``). No host synchronisation.
    """
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"classes must be a torch.Tensor, got {type(classes).__name__}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(f"classes must have an integer dtype, got {classes.dtype}")
    V.check_float_tensor("keep_prob", keep_prob)
    if keep_prob.dim() != 1 or keep_prob.shape[0] < 1:
        raise ValueError(f"keep_prob must be 1-D [C] with C >= 1, got shape {tuple(keep_prob.shape)}")
    V.check_same_device(classes=classes, keep_prob=keep_prob)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        gdev = generator.device
        if gdev.type != classes.device.type or (gdev.index is not None and classes.device.index is not None
                                                and gdev.index != classes.device.index):
            raise ValueError(f"generator is on {gdev} but classes are on {classes.device}: use a generator of "
                             "the classes' device, e.g. torch.Generator(device=classes.device)")
    u = torch.rand(classes.shape, generator=generator, device=classes.device, dtype=keep_prob.dtype)
    valid = classes >= 0
    return valid & (u < keep_prob[torch.where(valid, classes, 0)])


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


class RegClsOutput(NamedTuple):
    """:class:`RegClsLoss` parts (``return_parts=True``): the weighted total, the regression loss, the
    cross-entropy (mean over kept labels) and the number of kept labels (int64, 0-dim)."""
    loss: torch.Tensor
    regression: torch.Tensor
    classification: torch.Tensor
    kept: torch.Tensor


class RegClsLoss(nn.Module):
    """Regression loss plus a class-balanced cross-entropy over :class:`ClassBins` classes.

    ``L = λ·L_reg + L_CE`` when λ > 1, ``L = L_reg + L_CE / λ`` when λ ≤ 1 (the reference's weighting: the
    larger term's weight is 1, λ > 0).

    Args:
        regression_loss: any callable ``(pred, target, **kw) -> scalar``, e.g.
            :func:`imbreg_fast.functional.weighted_mse_loss` or an :class:`imbreg_fast.nn.BMCLoss` (a module is
            registered as a submodule: its ``noise_sigma`` appears in ``parameters()`` and ``state_dict``).
            When ``forward`` gets a ``mask``, it is passed on unchanged as ``mask=``, so give it in the layout
            the regression loss expects (the target's shape for the weighted losses, ``[N]`` rows for the
            Balanced MSE losses on ``[N, 1]`` targets); without one, no ``mask`` keyword is passed (so
            ``F.mse_loss`` works unmasked).
        class_bins: a :class:`ClassBins` (a submodule, saved in ``state_dict``); may be empty at construction
            (to load a checkpoint into), must be fitted at ``forward``.
        lam: λ > 0.
        balance: drop each label for the cross-entropy with probability 1 − ρ(class), fresh every call
            (training and eval alike, as the reference's datasets do).
        check_finite: refuse NaN/inf targets at kept positions (one host synchronisation; skipped under
            ``torch.compile``). With ``False`` the loss runs without any host synchronisation.

    ``forward(pred, logits, target, *, mask=None, generator=None, return_parts=False, **regression_kwargs)``:

    - ``logits``: ``[N, C]``, or dense ``[B, C, H, W]`` (any ``[N, C, d1, ..., dk]``), C = ``num_classes``.
    - ``target``: floating, the label shape S = logits' shape without dim 1 (``[N]``, ``[B, H, W]``), or S with
      a singleton channel at dim 1 (``[N, 1]``, ``[B, 1, H, W]``); ``pred`` as the regression loss wants it.
    - ``mask``: optional bool valid mask, shape S or S with the singleton channel (``[B, H, W]`` or
      ``[B, 1, H, W]``): masked-out elements count neither in the cross-entropy nor (through ``mask=``) in
      the regression loss.
    - ``generator``: for the balancing draw (see :func:`balanced_class_mask`).
    - ``regression_kwargs``: passed to ``regression_loss`` (e.g. ``weight=`` LDS weights).

    The cross-entropy is ``F.cross_entropy(logits, labels, ignore_index=-100, reduction='sum') / max(kept, 1)``
    with dropped / masked labels set to -100: the mean over the kept labels, and 0 (not NaN, as the reference's
    ``CrossEntropyLoss`` gives) when none is kept.
    """

    def __init__(self, regression_loss: Callable, class_bins: ClassBins, lam: float = 1.0, balance: bool = True,
                 *, check_finite: bool = True):
        super().__init__()
        if not callable(regression_loss):
            raise TypeError(f"regression_loss must be callable, got {type(regression_loss).__name__}")
        if not isinstance(class_bins, ClassBins):
            raise TypeError(f"class_bins must be a ClassBins, got {type(class_bins).__name__}")
        if not isinstance(balance, bool):
            raise TypeError(f"balance must be a bool, got {type(balance).__name__}")
        self.lam = V.check_positive("lam", lam)
        self.regression_loss = regression_loss
        self.class_bins = class_bins
        self.balance = balance
        self.check_finite = bool(check_finite)

    @property
    def weights(self) -> tuple[float, float]:
        """(weight of L_reg, weight of L_CE)."""
        return (self.lam, 1.0) if self.lam > 1 else (1.0, 1.0 / self.lam)

    def forward(self, pred, logits, target, *, mask=None, generator=None, return_parts: bool = False,
                **regression_kwargs):
        bins = self.class_bins
        bins._check_fitted()
        V.check_float_tensor("logits", logits)
        V.check_float_tensor("target", target)
        if logits.dim() < 2:
            raise ValueError(f"logits must be [N, C] or [N, C, d1, ...], got shape {tuple(logits.shape)}")
        if logits.shape[1] != bins.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes (dim 1) but class_bins has "
                             f"{bins.num_classes}")
        label_shape = (logits.shape[0],) + tuple(logits.shape[2:])
        channel_shape = label_shape[:1] + (1,) + label_shape[1:]
        if tuple(target.shape) not in (label_shape, channel_shape):
            raise ValueError(f"target must have shape {label_shape} or {channel_shape} for logits of shape "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        V.check_same_device(logits=logits, target=target)
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            shape = tuple(mask.shape) if tuple(mask.shape) in (label_shape, channel_shape) else tuple(target.shape)
            V.check_mask(mask, shape, target, "target")
        labels_target = target.reshape(label_shape)
        label_mask = None if mask is None else mask.reshape(label_shape)
        if V.value_checks(self.check_finite):
            V.check_labels(labels_target, label_mask, check_finite=True, name="target")

        # regression term
        if mask is not None:
            reg = self.regression_loss(pred, target, mask=mask, **regression_kwargs)
        else:
            reg = self.regression_loss(pred, target, **regression_kwargs)

        # classification term, over the kept labels
        classes = bins.assign(labels_target)
        keep = label_mask
        if self.balance:
            drawn = balanced_class_mask(classes, bins.keep_prob, generator)
            keep = drawn if keep is None else keep & drawn
        if keep is None:
            labels, kept = classes, classes.new_full((), classes.numel())
        else:
            labels = torch.where(keep, classes, IGNORE_INDEX)
            kept = keep.sum()
        ce_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = ce_sum / kept.clamp(min=1)

        w_reg, w_ce = self.weights
        total = w_reg * reg + w_ce * ce
        if return_parts:
            return RegClsOutput(total, reg, ce, kept)
        return total

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}, balance={self.balance}, check_finite={self.check_finite}"
