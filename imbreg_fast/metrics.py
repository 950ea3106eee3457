"""Evaluation of imbalanced regression: the DIR shot-group protocol (docs/methods.md §6).

A test sample's shot group is set by how many TRAINING labels fall in its label bin: many-shot (more than
``many``), few-shot (fewer than ``few``) or medium-shot (otherwise). For all test samples and for each group,
:class:`DIRMetrics` reports MAE, MSE, RMSE, the geometric mean of the absolute errors (GM), the balanced
bMAE / bMSE (the unweighted mean over label bins of each bin's mean error), the Pearson correlation over
all samples, and with ``depth=True`` the depth-estimation metrics AbsRel, log10 and δ1-δ3.

:class:`DIRMetrics` is a :class:`torchmetrics.Metric` that streams: each ``update`` adds per-bin sums
(float64 ``[K]`` states; per slab of the batch one binning pass and one ``index_add_`` of the stacked
per-element quantities, no Python loop over bins or pixels, no host sync), so memory does not grow with the
test set, and every state is summed across processes (``dist_reduce_fx="sum"``), which makes distributed
evaluation exact without any code of ours (torchmetrics synchronises in ``compute`` whenever
``torch.distributed`` is initialised). The training counts are not states: with a sharded training set give
every process the global counts, ``train_counts=lds.label_histogram(shard, ..., sync=True)``
(docs/methods.md §7.5). :func:`shot_metrics` is the one-call form (local unless ``sync=True``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from . import _validation as V
from . import distributed as D
from .lds import BinsArg, bin_edges, bin_index, label_histogram

__all__ = ["SHOTS", "GM_FLOOR", "DIRMetrics", "shot_metrics"]

SHOTS = ("all", "many", "medium", "few")

GM_FLOOR = torch.finfo(torch.float64).tiny
"""Default floor of the GM: each |e| enters as log(max(|e|, floor)); only exact zeros (and subnormal errors)
are affected. The number of floored errors is reported as ``<group>/gm_floored``."""

DELTA_BASE = 1.25
"""δ_k counts the samples with max(p/g, g/p) < 1.25^k, k = 1, 2, 3."""

# update() reduces the batch in slabs of at most this many elements, writing every intermediate into
# scratch buffers allocated once per update: ~20 float64 values per element, so ~10 MB on CPU (the slab stays
# in cache, and no allocation per slab: fresh multi-MB allocations page-fault on every op) and ~700 MB on a GPU
# (few, large kernels), however large the batch is.
CHUNK_ELEMENTS = {"cpu": 1 << 16, "other": 1 << 22}

# The states, in the order of the rows of update()'s per-element buffer: the first-order sums, then the
# three second moments of the Pearson correlation (reduced by a second index_add_, see _accumulate).
_BASE_STATES = ("count", "sum_abs", "sum_sq", "sum_log_abs", "n_floored", "sum_p", "sum_g")
_DEPTH_STATES = ("sum_absrel", "sum_log10", "n_delta1", "n_delta2", "n_delta3")
_MOMENT_STATES = ("sum_pp", "sum_gg", "sum_pg")
_ROW_P, _ROW_G = _BASE_STATES.index("sum_p"), _BASE_STATES.index("sum_g")

_TABLE_ROWS = (("All", "all"), ("Many", "many"), ("Med.", "medium"), ("Few", "few"))


def _chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]


class _Scratch:
    """The per-update buffers of :meth:`DIRMetrics._accumulate` for slabs of up to ``chunk`` elements."""

    def __init__(self, num_rows: int, num_bins: int, chunk: int, device: torch.device) -> None:
        self.rows = torch.empty(num_rows, chunk, dtype=torch.float64, device=device)
        self.rows[0].fill_(1.0)                     # the count row is constant
        self.f64 = torch.empty(5, chunk, dtype=torch.float64, device=device).unbind(0)
        self.slab = torch.empty(num_rows, num_bins + 1, dtype=torch.float64, device=device)
        self.means = torch.empty(2, num_bins + 1, dtype=torch.float64, device=device)
        self.idx = torch.empty(chunk, dtype=torch.int64, device=device)
        self.step = torch.empty(chunk, dtype=torch.int64, device=device)
        self.drop = torch.empty(chunk, dtype=torch.bool, device=device)


def _checked_train_counts(train_counts, num_bins: int) -> Tensor:
    counts = V.check_real_tensor("train_counts", train_counts)
    if tuple(counts.shape) != (num_bins,):
        raise ValueError(f"train_counts must have shape [K] = [{num_bins}] (one training count per bin), "
                         f"got {tuple(counts.shape)}")
    counts = counts.detach().to(torch.float64)
    if V.any_true(~torch.isfinite(counts) | (counts < 0)):
        raise ValueError("train_counts must be finite and >= 0")
    return counts


class DIRMetrics(Metric):
    r"""Streaming DIR evaluation: shot-group errors, balanced errors, GM, Pearson and depth metrics.

    Args:
        bins: a number of equal-width bins over ``range``, or explicit bin edges ``[K + 1]`` (finite, strictly
            increasing; any spacing). Bin b is ``[e_b, e_{b+1})``; labels outside the edges count in the end
            bins, as :func:`imbreg_fast.lds.bin_index` (compared in float64).
        range: ``(lo, hi)`` when ``bins`` is a number; None with explicit edges.
        train_counts: training count of each bin, ``[K]``, finite and >= 0 (e.g. summed
            :func:`imbreg_fast.lds.label_histogram` of the training labels, or pixel counts for depth).
        train_labels: the training labels themselves, any shape, counted into the bins (on this process
            only: with a sharded training set pass ``train_counts`` from
            ``lds.label_histogram(shard, ..., sync=True)``). Pass exactly one of ``train_counts`` and
            ``train_labels``.
        many: a bin with more than ``many`` training samples is many-shot.
        few: a bin with fewer than ``few`` training samples is few-shot; the others are medium-shot.
            ``0 <= few <= many``.
        depth: also accumulate the depth metrics AbsRel, log10 and δ1-δ3 (they need p > 0 and g > 0 at the
            kept positions; elsewhere they are inf or NaN).
        gm_floor: each absolute error enters the GM as ``log(max(|e|, gm_floor))`` (default
            :data:`GM_FLOOR`, the smallest normal float64, so only exact zeros are changed). Set it to the
            resolution of your labels to keep a few exact hits from dominating the GM.
        kwargs: :class:`torchmetrics.Metric` options (``dist_sync_fn``, ``process_group``, ...).

    ``update(pred, target, mask=None)`` takes ``pred`` and ``target`` of the same floating dtype and shape,
    ``[N]``, ``[N, 1]``, ``[B, H, W]`` or dense ``[B, 1, H, W]`` (every element is one sample), on the metric's
    device, and an optional bool ``mask`` of the target's shape: masked-out elements contribute nothing and
    may hold NaN. ``update`` never synchronises with the device and checks no values: an unmasked NaN makes
    the metrics of its group NaN.

    ``compute()`` returns a flat dict of 0-d tensors on the metric's device, float64 for the metrics and
    int64 for the counts, with keys ``"<group>/<metric>"`` for group in :data:`SHOTS` (``all``, ``many``,
    ``medium``, ``few``):

    - ``count``: number of test samples; ``mae``, ``mse``, ``rmse`` (per-sample means);
    - ``gm``: exp(mean log max(|e|, gm_floor)); ``gm_floored``: how many errors were below the floor;
    - ``bmae``, ``bmse``: mean over the group's bins that hold test samples of each bin's MAE / MSE;
    - ``all/pearson``: Pearson correlation of pred and target over all samples;
    - with ``depth=True``: ``absrel`` = mean |p - g| / g, ``log10`` = mean |log10 p - log10 g|, ``delta1`` ..
      ``delta3`` = fraction with max(p/g, g/p) < 1.25^k.

    A group without test samples reports NaN for every metric and a count of 0.

    States (float64 ``[K]``, summed across processes): the count and the sums of |e|, e², log max(|e|, floor),
    the floored count, and for Pearson the sums of p', g', p'², g'², p'g' where p' = p - c_b and g' = g - c_b
    are shifted by the centre c_b of the target's bin, a constant (each slab's second moments are summed
    around the slab's per-bin means, then shifted back exactly). Pearson is assembled in ``compute`` by
    merging the per-bin centred moments (Chan et al.), so it stays accurate at depth scale: p, g ≈ 5 ± 0.01
    over 2·10^6 pixels give r within 1e-12 of a two-pass float64 computation (raw sums: 1e-8), see
    docs/methods.md §6.4. With ``depth=True`` also the sums of |e|/g and |log10 p - log10 g| and the δ1-δ3
    counts.

    Device and dtype: ``.to(device)`` moves the states and the buffers ``edges`` and ``train_counts``; their
    dtype is always float64 (``.to(torch.float32)``, ``set_dtype`` leave it). ``edges`` and ``train_counts``
    are persistent buffers of the ``state_dict``; the accumulated states follow the torchmetrics convention
    (not saved unless ``metric.persistent(True)``).

    Example::

        metric = DIRMetrics(100, (0.0, 10.0), train_labels=train_depth[valid], depth=True)
        for image, depth, valid in loader:
            metric.update(model(image), depth, valid)
        print(metric.as_table())
        results = metric.compute()        # results["few/rmse"], results["all/delta1"], ...
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, bins: BinsArg, range: Optional[Sequence[float]] = None, *,
                 train_counts: Optional[Tensor] = None, train_labels: Optional[Tensor] = None,
                 many: int = 100, few: int = 20, depth: bool = False, gm_floor: float = GM_FLOOR,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        many = V.check_int("many", many, 0)
        few = V.check_int("few", few, 0)
        if few > many:
            raise ValueError(f"many must be >= few (many-shot: > many, few-shot: < few), got many={many}, few={few}")
        if not isinstance(depth, bool):
            raise TypeError(f"depth must be a bool, got {type(depth).__name__}")
        self.many, self.few, self.depth = many, few, depth
        self.gm_floor = V.check_positive("gm_floor", gm_floor)

        edges = bin_edges(bins, range)
        num_bins = edges.numel() - 1
        if (train_counts is None) == (train_labels is None):
            raise ValueError("pass exactly one of train_counts ([K] training counts per bin) and train_labels "
                             "(counted into the bins), got " + ("neither" if train_counts is None else "both"))
        if train_labels is not None:
            V.check_labels(train_labels, name="train_labels")
            idx = bin_index(train_labels.detach().reshape(-1), edges)
            counts = torch.bincount(idx, minlength=num_bins).to(torch.float64)
        else:
            counts = _checked_train_counts(train_counts, num_bins)

        device = self.device
        self.register_buffer("edges", edges.to(device))
        self.register_buffer("train_counts", counts.to(device))
        self._derive_from_edges()
        self._state_names = _BASE_STATES + (_DEPTH_STATES if depth else ()) + _MOMENT_STATES
        for name in self._state_names:
            self.add_state(name, default=torch.zeros(num_bins, dtype=torch.float64, device=device),
                           dist_reduce_fx="sum")

    def _derive_from_edges(self) -> None:
        """What update() needs from ``edges`` (recomputed when a state_dict loads other edges):

        - ``_centres`` [K + 1]: the Pearson shift c_b of each bin, then 0 for the dummy bin of masked elements;
        - ``_upper`` = e_1..e_{K-1}, NaN and ``_lower`` = -inf, e_1..e_{K-1}: the neighbouring edges of each
          bin, with sentinels no label passes (NaN compares false, +inf included);
        - ``_uniform``: ``(lo, K / (hi - lo))`` when every edge lies within a quarter bin of the uniform grid
          over [e_0, e_K] (any ``bins=int`` and most explicit edges), else None. Then the bin of g is found
          arithmetically: the guess floor((g - lo) K / (hi - lo)), clamped to [0, K - 1], is off by at most
          one bin, and one comparison with each neighbouring edge makes it exactly ``lds.bin_index`` (NaN
          included: bin K - 1), ~10x faster than ``torch.bucketize``'s binary search on CPU. Otherwise
          ``bucketize`` is used.
        """
        e = self.edges
        k = e.numel() - 1
        inf = e.new_full((1,), math.inf)
        self.register_buffer("_centres", torch.cat([e[:-1] / 2 + e[1:] / 2, e.new_zeros(1)]), persistent=False)
        self.register_buffer("_upper", torch.cat([e[1:-1], e.new_full((1,), math.nan)]), persistent=False)
        self.register_buffer("_lower", torch.cat([-inf, e[1:-1]]), persistent=False)
        lo, hi = float(e[0]), float(e[-1])
        width = (hi - lo) / k
        grid = lo + width * torch.arange(k + 1, dtype=torch.float64, device=e.device)
        uniform = math.isfinite(width) and width > 0 and bool(((e - grid).abs() <= 0.25 * width).all())
        self._uniform = (lo, k / (hi - lo)) if uniform else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive_from_edges()

    @property
    def num_bins(self) -> int:
        return self.edges.numel() - 1

    def _apply(self, fn, exclude_state: Sequence[str] = ()):
        # Move device, never dtype: the accumulators, edges and counts are float64 by design (casting a
        # state down and back would lose what it has accumulated, and float32 edges would move the bins).
        def keep_dtype(t):
            out = fn(t)
            if isinstance(t, Tensor) and isinstance(out, Tensor) and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, exclude_state)

    # ----------------------------------------------------------------------------------------------
    # update
    # ----------------------------------------------------------------------------------------------

    def update(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> None:
        """Add a batch: ``pred``/``target`` ``[N]``, ``[N, 1]``, ``[B, H, W]`` or ``[B, 1, H, W]``, optional
        bool ``mask`` of the target's shape (masked elements are ignored and may be NaN). No device sync."""
        pred, target = V.check_pair(pred, target)
        shape = tuple(target.shape)
        if not (len(shape) in (1, 3) or (len(shape) in (2, 4) and shape[1] == 1)):
            raise ValueError("pred and target must be [N], [N, 1], [B, H, W] or dense [B, 1, H, W] "
                             f"(one label per element), got shape {shape}")
        V.check_mask(mask, shape, target, "target")
        if target.device != self.edges.device:
            raise ValueError(f"pred and target are on {target.device} but the metric is on "
                             f"{self.edges.device}; move the metric with .to(device)")
        p = pred.detach().reshape(-1)
        g = target.detach().reshape(-1)
        keep = None if mask is None else mask.reshape(-1)
        total = g.numel()
        chunk = max(1, min(total, _chunk_elements(g.device)))
        scratch = _Scratch(len(self._state_names), self.num_bins, chunk, g.device)
        acc = torch.zeros(len(self._state_names), self.num_bins + 1, dtype=torch.float64, device=g.device)
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            self._accumulate(acc, scratch, p[start:stop], g[start:stop],
                             None if keep is None else keep[start:stop])
        for name, row in zip(self._state_names, acc[:, :-1]):
            getattr(self, name).add_(row)

    def _accumulate(self, acc: Tensor, scratch: "_Scratch", p: Tensor, g: Tensor, keep: Optional[Tensor]) -> None:
        """Per-bin sums of one slab, added to ``acc`` [S, K + 1]. The per-element quantities are the rows of
        one [S, m] buffer, reduced by ``index_add_``; masked elements go to the dummy bin K. Every intermediate
        is written into ``scratch`` (no allocation per slab).

        The second moments are reduced in a second pass, centred on the slab's own per-bin means m_b:
        sum (p' - m_b)^2 + n_b m_b^2 is sum p'^2 exactly, but without the rounding of n large terms that
        largely cancel in compute() (the same for g'^2 and p'g')."""
        m = g.numel()
        buf = scratch.rows[:, :m]
        p64, g64, centre, t1, t2 = (x[:m] for x in scratch.f64)
        idx = scratch.idx[:m]
        p64.copy_(p)
        g64.copy_(g)
        if self._uniform is None:
            torch.bucketize(g64, self.edges[1:-1], right=True, out=idx)   # = lds.bin_index
        else:                                                             # the same bins (_derive_from_edges)
            lo, scale = self._uniform
            torch.sub(g64, lo, out=t1).mul_(scale)
            torch.nan_to_num_(t1, nan=self.num_bins - 1).clamp_(0, self.num_bins - 1)
            idx.copy_(t1)                                                 # floor of a value >= 0
            step = scratch.step[:m]
            torch.index_select(self._upper, 0, idx, out=t1)
            idx.add_(torch.ge(g64, t1, out=step))
            torch.index_select(self._lower, 0, idx, out=t1)
            idx.sub_(torch.lt(g64, t1, out=step))
        if keep is not None:
            drop = scratch.drop[:m]
            torch.logical_not(keep, out=drop)
            idx.masked_fill_(drop, self.num_bins)
        torch.index_select(self._centres, 0, idx, out=centre)
        _count, abs_e, sq, log_abs, floored, sp, sg = buf[:len(_BASE_STATES)]      # count: all ones
        torch.sub(p64, g64, out=sq)
        torch.abs(sq, out=abs_e)
        sq.mul_(sq)
        torch.clamp(abs_e, min=self.gm_floor, out=log_abs).log_()
        torch.lt(abs_e, self.gm_floor, out=floored)
        torch.sub(p64, centre, out=sp)
        torch.sub(g64, centre, out=sg)
        if self.depth:
            absrel, log10, *deltas = buf[len(_BASE_STATES):len(_BASE_STATES) + len(_DEPTH_STATES)]
            torch.div(abs_e, g64, out=absrel)
            torch.log10(p64, out=t1)
            torch.log10(g64, out=log10)
            torch.sub(t1, log10, out=log10).abs_()
            torch.div(p64, g64, out=t1)
            torch.div(g64, p64, out=t2)
            torch.maximum(t1, t2, out=t1)                                   # max(p/g, g/p)
            for k, row in enumerate(deltas, 1):
                torch.lt(t1, DELTA_BASE ** k, out=row)
        first = buf.shape[0] - len(_MOMENT_STATES)
        slab = scratch.slab.zero_()
        slab[:first].index_add_(1, idx, buf[:first])
        n_b = slab[0]
        mean_p, mean_g = scratch.means
        torch.div(slab[_ROW_P], n_b.clamp_min(1.0), out=mean_p)
        torch.div(slab[_ROW_G], n_b.clamp_min(1.0), out=mean_g)
        torch.sub(sp, torch.index_select(mean_p, 0, idx, out=t1), out=t1)
        torch.sub(sg, torch.index_select(mean_g, 0, idx, out=t2), out=t2)
        spp, sgg, spg = buf[first:]
        torch.mul(t1, t1, out=spp)
        torch.mul(t2, t2, out=sgg)
        torch.mul(t1, t2, out=spg)
        slab[first:].index_add_(1, idx, buf[first:])
        slab[first].addcmul_(n_b, mean_p * mean_p)
        slab[first + 1].addcmul_(n_b, mean_g * mean_g)
        slab[first + 2].addcmul_(n_b, mean_p * mean_g)
        acc.add_(slab)

    # ----------------------------------------------------------------------------------------------
    # compute
    # ----------------------------------------------------------------------------------------------

    def compute(self) -> dict[str, Tensor]:
        """The flat dict of metrics (see the class docstring): 0-d tensors, float64 values, int64 counts."""
        s = {name: getattr(self, name) for name in self._state_names}
        n_bin = s["count"]
        tc = self.train_counts
        many, few = tc > self.many, tc < self.few
        member = torch.stack([torch.ones_like(many), many, ~(many | few), few])      # [4 groups, K]

        def group_sum(x: Tensor) -> Tensor:     # masked, so an inf/NaN bin stays in its own group
            return torch.where(member, x, 0.0).sum(1)

        n = group_sum(n_bin)
        values = {"mae": group_sum(s["sum_abs"]) / n, "mse": group_sum(s["sum_sq"]) / n}
        values["rmse"] = values["mse"].sqrt()
        values["gm"] = torch.exp(group_sum(s["sum_log_abs"]) / n)
        occupied = member & (n_bin > 0)
        n_occupied = occupied.sum(1)
        per_bin = n_bin.clamp_min(1.0)
        values["bmae"] = torch.where(occupied, s["sum_abs"] / per_bin, 0.0).sum(1) / n_occupied
        values["bmse"] = torch.where(occupied, s["sum_sq"] / per_bin, 0.0).sum(1) / n_occupied
        if self.depth:
            values["absrel"] = group_sum(s["sum_absrel"]) / n
            values["log10"] = group_sum(s["sum_log10"]) / n
            for k in (1, 2, 3):
                values[f"delta{k}"] = group_sum(s[f"n_delta{k}"]) / n
        floored = group_sum(s["n_floored"])

        out: dict[str, Tensor] = {}
        for gi, shot in enumerate(SHOTS):
            out[f"{shot}/count"] = n[gi].round().to(torch.int64)
            for key in ("mae", "mse", "rmse", "gm"):
                out[f"{shot}/{key}"] = values[key][gi]
            out[f"{shot}/gm_floored"] = floored[gi].round().to(torch.int64)
            out[f"{shot}/bmae"] = values["bmae"][gi]
            out[f"{shot}/bmse"] = values["bmse"][gi]
            if shot == "all":
                out["all/pearson"] = self._pearson(s)
            if self.depth:
                for key in ("absrel", "log10", "delta1", "delta2", "delta3"):
                    out[f"{shot}/{key}"] = values[key][gi]
        return out

    def per_bin(self) -> dict[str, Tensor]:
        """The errors of each bin, float64 ``[K]`` on the metric's device: ``count`` (test samples), ``mae``,
        ``mse``, ``rmse`` (NaN for a bin without test samples) — e.g. error-by-label curves. Synchronised
        across processes like :meth:`compute`."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            count = self.count.clone()
            safe = count.clamp_min(1.0)
            nan = torch.full_like(count, math.nan)
            mae = torch.where(count > 0, self.sum_abs / safe, nan)
            mse = torch.where(count > 0, self.sum_sq / safe, nan)
        return {"count": count, "mae": mae, "mse": mse, "rmse": mse.sqrt()}

    def _pearson(self, s: dict[str, Tensor]) -> Tensor:
        """Pearson r over all samples from the per-bin shifted sums: each bin's centred moments, merged with
        the between-bin terms n_b (mean_b - mean)(...) (the parallel-axis / Chan merge)."""
        n_bin = s["count"]
        safe = n_bin.clamp_min(1.0)
        mp, mg = s["sum_p"] / safe, s["sum_g"] / safe                 # shifted means of each bin
        within_pp = (s["sum_pp"] - s["sum_p"] * mp).sum()
        within_gg = (s["sum_gg"] - s["sum_g"] * mg).sum()
        within_pg = (s["sum_pg"] - s["sum_p"] * mg).sum()
        centre = self._centres[:-1]
        mean_p_bin, mean_g_bin = centre + mp, centre + mg
        total = n_bin.sum()
        dp = torch.where(n_bin > 0, mean_p_bin - (n_bin * mean_p_bin).sum() / total, 0.0)
        dg = torch.where(n_bin > 0, mean_g_bin - (n_bin * mean_g_bin).sum() / total, 0.0)
        spp = within_pp + (n_bin * dp * dp).sum()
        sgg = within_gg + (n_bin * dg * dg).sum()
        spg = within_pg + (n_bin * dp * dg).sum()
        return spg / torch.sqrt(spp * sgg)

    # ----------------------------------------------------------------------------------------------
    # report
    # ----------------------------------------------------------------------------------------------

    def as_table(self, digits: int = 3) -> str:
        """The results as a paper-style text table: rows All / Many / Med. / Few; columns MSE, MAE, GM, bMSE,
        bMAE (with ``depth=True`` also RMSE, AbsRel, log10, δ1-δ3) and the test count; then Pearson (all).
        An empty group shows '-'."""
        digits = V.check_int("digits", digits, 0)
        res = {k: v.item() for k, v in self.compute().items()}
        cols = [("MSE", "mse"), ("MAE", "mae"), ("GM", "gm"), ("bMSE", "bmse"), ("bMAE", "bmae")]
        if self.depth:
            cols += [("RMSE", "rmse"), ("AbsRel", "absrel"), ("log10", "log10"), ("δ1", "delta1"),
                     ("δ2", "delta2"), ("δ3", "delta3")]
        width = max(8, digits + 6)

        def cell(v: float) -> str:
            return f"{'-':>{width}}" if math.isnan(v) else f"{v:>{width}.{digits}f}"

        head = f"{'':<5}" + "".join(f"{name:>{width}}" for name, _ in cols) + f"{'Count':>{width + 2}}"
        lines = [head, "-" * len(head)]
        for label, shot in _TABLE_ROWS:
            lines.append(f"{label:<5}" + "".join(cell(res[f"{shot}/{key}"]) for _, key in cols)
                         + f"{res[f'{shot}/count']:>{width + 2}d}")
        pearson = res["all/pearson"]
        lines.append("Pearson (all): " + ("-" if math.isnan(pearson) else f"{pearson:.{digits}f}"))
        return "\n".join(lines)


def shot_metrics(pred: Tensor, target: Tensor, train_labels: Tensor, bins: BinsArg,
                 range: Optional[Sequence[float]] = None, *, many: int = 100, few: int = 20,
                 mask: Optional[Tensor] = None, depth: bool = False, gm_floor: float = GM_FLOOR,
                 sync: bool = False, process_group=None) -> dict[str, Tensor]:
    """The DIR evaluation in one call: ``DIRMetrics(bins, range, train_labels=train_labels, ...)``, one
    ``update(pred, target, mask)`` and ``compute()`` (see :class:`DIRMetrics` for the inputs and the keys).

    ``sync=False`` (default): this process's data only, no communication, also when ``torch.distributed`` is
    initialised (so one process may evaluate alone). ``sync=True``: ``pred``/``target`` and ``train_labels``
    are this process's shards; the training counts and the metric states are summed over the processes of
    ``process_group`` (every process must call it; docs/methods.md §7.5).
    """
    pred, target = V.check_pair(pred, target)
    options = dict(many=many, few=few, depth=depth, gm_floor=gm_floor)
    if D.sync_group(sync, process_group) is None:
        metric = DIRMetrics(bins, range, train_labels=train_labels, sync_on_compute=False, **options)
    else:
        counts = label_histogram(train_labels, bins, range, sync=True, process_group=process_group)
        metric = DIRMetrics(bins, range, train_counts=counts, process_group=process_group, **options)
    metric = metric.to(target.device)
    metric.update(pred, target, mask)
    return metric.compute()
