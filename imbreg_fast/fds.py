"""Feature distribution smoothing (FDS; Yang et al., ICML 2021; docs/methods.md §3) for row and dense features.

Usage in a dense training loop (features at a lower resolution than the depth map;
``F = torch.nn.functional``)::

    fds = imbreg_fast.FDS(feature_dim=256, bins=100, range=(0.0, 10.0)).to(device)  # 0.1 m bins
    for epoch in range(epochs):
        model.train()
        for image, depth, valid in loader:                     # depth [B, 1, H, W], valid bool [B, 1, H, W]
            feats = model.encoder(image)                        # [B, 256, h, w]
            d = F.interpolate(depth, size=feats.shape[-2:], mode="nearest")
            m = F.interpolate(valid.float(), size=feats.shape[-2:], mode="nearest") > 0
            fds.accumulate(feats, d, m)                        # raw features: per-bin sums, no grad
            feats = fds(feats, d, m)                           # calibrated from epoch start_smooth on
            loss = criterion(model.decoder(feats), depth, valid)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
        fds.update()                                           # end of epoch: EMA, smoothing, transforms

Differences from the published code (docs/methods.md §3): statistics come from the raw features passed to
:meth:`FDS.accumulate` (never from calibrated ones), the raw and smoothed statistics of a transform are
from the same epoch (no aliasing of ``running_mean_last_epoch``), the calibrated features are a new
tensor (never written in place), bins never seen do not leak their initial values into their neighbours,
and ``covariance='full'`` implements the paper's whitening / re-colouring (the code's per-channel
variance rule is ``covariance='diag'``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import _validation as V
from . import distributed as D
from ._dispatch import resolve
from .lds import bin_edges, bin_index, check_edge_rule, kernel_window
from .ops import fds as _ops

__all__ = ["FDS"]

COVARIANCES = ("full", "diag")
_TINY_VARIANCE_SUM = 1e-10  # diag: a bin whose raw variances sum below this is left unchanged (as published)


def _reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Positions mapped into [0, n) like ``F.pad(mode='reflect')`` (edge not repeated), for any offset."""
    if n == 1:
        return torch.zeros_like(idx)
    j = torch.remainder(idx, 2 * (n - 1))
    return torch.where(j >= n, 2 * (n - 1) - j, j)


class FDS(nn.Module):
    """Feature distribution smoothing: per-bin feature statistics, smoothed across neighbouring bins, and the
    re-colouring ``z~ = A_b (z - mu_b) + mu~_b`` of every row / pixel with its bin's statistics.

    Args:
        feature_dim: C, the number of feature channels.
        bins, range: ``bins`` equal-width bins over ``range = (lo, hi)``, or explicit increasing edges (then
            ``range=None``), as :func:`imbreg_fast.lds.bin_edges`; labels outside clamp to the edge bins.
        edge_rule: how labels are assigned to bins, :func:`imbreg_fast.lds.bin_index`: ``'closed-left'``
            (default, ``[e_b, e_{b+1})`` compared in float64) or ``'float32-truncate'`` (the published depth
            code's float32 ``floor(depth * 10)``: float32 7.2 m in bin 72, not 71; equal-width bins only).
        covariance: ``'full'`` — ``A_b = S~_b^{1/2} S_b^{-1/2}`` with ``S = Sigma + eps I`` (the paper);
            ``'diag'`` — the published code's rule, per channel ``sqrt(clamp(var~ / var, *clip))`` on
            channels with ``var != 0`` (other channels, and bins whose variances sum below 1e-10, unchanged).
        kernel, ks, sigma: smoothing window over bins, :func:`imbreg_fast.lds.kernel_window` sum-normalised
            (``'gaussian'`` is the published ``gaussian_filter1d`` window; also ``'sampled_gaussian'``,
            ``'triang'``, ``'laplace'``), applied with reflect padding over seen bins only.
        momentum: EMA factor of the running statistics (``running = (1 - m) new + m running``; a bin's first
            fold replaces); ``None``: cumulative average over all folded samples.
        eps: regularisation ``eps I`` of both covariances before the matrix square roots (``'full'``).
        clip: ``(lo, hi)`` clamp of the variance ratio (``'diag'``; published: (0.1, 10) age, (0.2, 5) depth).
        start_update: first epoch whose features are folded into the statistics.
        start_smooth: first epoch with calibration (in training mode).
        backend: ``'auto'`` | ``'torch'`` | ``'cpp'`` | ``'triton'`` for the two kernels (see
            :mod:`imbreg_fast._dispatch`).
        check_finite: reject NaN/inf labels (kept ones) and NaN/inf batch statistics in :meth:`accumulate`
            (one device sync per call); skipped under ``torch.compile``.
        sync, process_group: with ``sync=True``, :meth:`update` merges this epoch's statistics of every
            process of ``process_group`` (default: the default group) before folding them, so that every
            process holds the statistics and transforms of the whole epoch's data (see below). A world of one
            (``torch.distributed`` not initialised) is the single-process behaviour.

    Epochs: :meth:`update` marks the end of an epoch; it increments the ``epoch`` buffer. Statistics given to
    :meth:`accumulate` during epochs ``>= start_update`` are folded in by :meth:`update`; :meth:`forward`
    calibrates in training mode once ``epoch >= start_smooth``, and is the identity (returns its input)
    otherwise and in eval mode.

    Statistics: :meth:`accumulate` adds each batch's per-bin count, mean and centred scatter
    ``sum (z - mean)(z - mean)^T`` into float64 accumulators with Chan's parallel formula — no
    ``E[zz^T] - mu mu^T`` cancellation anywhere. The kernels form products of features minus a per-bin
    reference point close to the bin's batch mean (C++: the mean of 16 of the bin's pixels; Triton: each
    sub-block's own mean, merged with Chan's formula) and correct for it in float64; the C++ and Triton
    kernels form the products in the compute dtype (fp32 for fp32 features) over blocks of at most 512
    rows summed in float64 (relative error ~1e-6), the torch backend works in float64 throughout. The C++
    kernels sort the features into a workspace of N * C floats and keep one freed workspace of at most
    64 MB per calling thread for the next call (no first-touch page faults every step). :meth:`update`
    turns the accumulated statistics into the epoch's mean and unbiased covariance (``n_b - 1``; a bin with
    fewer than 2 samples in the epoch keeps its previous statistics), folds them into the running EMA,
    smooths, and recomputes every bin's transform with a batched float64 symmetric eigendecomposition
    (``torch.linalg.eigh``): accurate on singular and ill-conditioned covariances (bins with fewer samples
    than C), where an fp32 Newton-Schulz iteration is not. Bins never seen keep the identity transform.

    Several processes (``sync=True``, docs/methods.md §7.2): :meth:`accumulate` stays local (no communication
    per step); :meth:`update`, which every process of the group must call, merges the per-bin accumulators
    exactly (Chan's formula, float64: an all-reduce of the counts and count-weighted means, then of the
    scatters corrected to the global means), so the merged statistics equal those of one process that saw the
    concatenated data, to float64 rounding, and are bit-identical on every process. With
    ``covariance='full'`` the eigendecompositions are split between the processes and their results
    all-gathered: every process gets the same transforms. Under DistributedDataParallel use
    ``broadcast_buffers=False`` (or keep the FDS module outside the wrapped module): DDP's default buffer
    broadcast would overwrite each process's accumulators with those of rank 0.

    All state is in buffers (float64, except the ``int64`` epoch), so ``state_dict`` round-trips exactly and
    resumed training is bit-identical; dtype casts of the module (``.half()``, ``.double()``) leave them in
    float64 (devices move as usual). Shapes: ``features`` ``[N, C]`` with ``labels`` ``[N]`` or ``[N, 1]``,
    or dense ``[B, C, H, W]`` (read in place through its strides) with ``labels`` ``[B, 1, H, W]`` or
    ``[B, H, W]`` at the feature resolution; ``mask`` (bool, the labels' shape) keeps valid pixels.
    """

    def __init__(self, feature_dim: int, bins=100, range=None, *, covariance: str = "full",
                 kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0, momentum: float | None = 0.9,
                 eps: float = 1e-5, clip=(0.1, 10.0), start_update: int = 0, start_smooth: int = 1,
                 backend: str = "auto", check_finite: bool = True, sync: bool = False, process_group=None,
                 edge_rule: str = "closed-left"):
        super().__init__()
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        self.sync, self.process_group = sync, process_group
        self.feature_dim = V.check_int("feature_dim", feature_dim, 1)
        self.covariance = V.check_choice("covariance", covariance, COVARIANCES)
        self.momentum = V.check_momentum("momentum", momentum)
        self.eps = V.check_real("eps", eps)
        if covariance == "full" and not self.eps > 0:
            raise ValueError(f"eps must be > 0 with covariance='full' (it regularises singular covariances), "
                             f"got {self.eps}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        self.clip = V.check_clip("clip", clip)
        self.start_update = V.check_int("start_update", start_update, 0)
        self.start_smooth = V.check_int("start_smooth", start_smooth, 0)
        self.kernel, self.ks, self.sigma = kernel, ks, sigma
        self.backend = backend
        self.check_finite = bool(check_finite)

        edges = bin_edges(bins, range)
        self.edge_rule = check_edge_rule(edge_rule, edges)
        nb, c = edges.shape[0] - 1, self.feature_dim
        window = kernel_window(kernel, ks, sigma, normalize="sum")                   # [ks] float64
        half = (window.shape[0] - 1) // 2
        taps = torch.arange(-half, half + 1)
        f64 = dict(dtype=torch.float64)
        stat_shape = (nb, c, c) if self.full else (nb, c)
        identity = torch.eye(c, **f64).expand(nb, c, c).clone() if self.full else torch.ones(nb, c, **f64)

        self.register_buffer("edges", edges)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_samples_tracked", torch.zeros(nb, **f64))        # samples folded per bin
        self.register_buffer("running_mean", torch.zeros(nb, c, **f64))
        self.register_buffer("running_cov", identity.clone())                     # [nb, C, C] or variances [nb, C]
        self.register_buffer("smoothed_mean", torch.zeros(nb, c, **f64))
        self.register_buffer("smoothed_cov", identity.clone())
        self.register_buffer("transform", identity.clone())                       # A_b (or per-channel scale)
        self.register_buffer("shift", torch.zeros(nb, c, **f64))                  # mu~_b - A_b mu_b
        self.register_buffer("accum_count", torch.zeros(nb, **f64))               # this epoch, so far
        self.register_buffer("accum_mean", torch.zeros(nb, c, **f64))
        self.register_buffer("accum_m2", torch.zeros(stat_shape, **f64))          # sum (z - mean)(z - mean)^T
        # derived, not saved: smoothing taps and fp32 copies of the transform for fp32 / half features
        self.register_buffer("_window", window, persistent=False)
        self.register_buffer("_window_src", _reflect_index(torch.arange(nb).unsqueeze(1) + taps, nb),
                             persistent=False)                                    # [nb, ks]
        self.register_buffer("_transform_f32", identity.float(), persistent=False)
        self.register_buffer("_shift_f32", torch.zeros(nb, c), persistent=False)
        self._sync_epoch()
        self.register_load_state_dict_post_hook(FDS._after_load)

    # ----------------------------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        return self.covariance == "full"

    @property
    def num_bins(self) -> int:
        return self.edges.shape[0] - 1

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, num_bins={self.num_bins}, covariance={self.covariance!r}, "
                f"kernel={self.kernel!r}, ks={self.ks}, sigma={self.sigma}, momentum={self.momentum}, "
                f"eps={self.eps}, start_update={self.start_update}, start_smooth={self.start_smooth}, "
                f"backend={self.backend!r}" + (", sync=True" if self.sync else "")
                + ("" if self.edge_rule == "closed-left" else f", edge_rule={self.edge_rule!r}"))

    def _sync_epoch(self) -> None:
        # Python mirror of the epoch buffer: forward reads a bool (no device sync, one torch.compile guard)
        self._epoch_value = int(self.epoch)
        self._calibrating = self._epoch_value >= self.start_smooth

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module._sync_epoch()
        module._refresh_f32()

    def _refresh_f32(self) -> None:
        self._transform_f32.copy_(self.transform)
        self._shift_f32.copy_(self.shift)

    def _apply(self, fn, recurse=True):
        # Device moves apply; dtype casts do not: the buffers are statistics and accumulators.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        return self

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, features, labels, mask):
        features = V.check_float_tensor("features", features)
        if features.dim() == 2:
            label_shapes = [(features.shape[0],), (features.shape[0], 1)]
        elif features.dim() == 4:
            b, _, h, w = features.shape
            label_shapes = [(b, 1, h, w), (b, h, w)]
        else:
            raise ValueError(f"features must be [N, C] or dense [B, C, H, W], got shape {tuple(features.shape)}")
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"features have C = {features.shape[1]} channels (shape {tuple(features.shape)}) "
                             f"but this FDS has feature_dim = {self.feature_dim}")
        V.check_real_tensor("labels", labels)
        if tuple(labels.shape) not in label_shapes:
            raise ValueError(f"labels must have shape {' or '.join(map(str, label_shapes))} (one label per "
                             f"{'row' if features.dim() == 2 else 'pixel, at the feature resolution'}) for "
                             f"features of shape {tuple(features.shape)}, got {tuple(labels.shape)}")
        V.check_mask(mask, tuple(labels.shape), labels, "labels")
        V.check_same_device(features=features, labels=labels, mask=mask)
        if features.device != self.edges.device:
            raise ValueError(f"features are on {features.device} but the FDS statistics are on "
                             f"{self.edges.device}; move the module with .to(device)")
        return features

    def _pixels_and_bins(self, features, labels, mask):
        """Validated features as [B, C, P] (no copy) and the int64 bins [B, P] (-1 where masked)."""
        features = self._check_inputs(features, labels, mask)
        V.check_labels(labels, mask, check_finite=self.check_finite)
        f3 = _ops.as_pixels(features)
        b, p = f3.shape[0], f3.shape[2]
        if self.edge_rule == "closed-left":
            bins = _ops.bin_index(labels.reshape(b, p), self.edges, None if mask is None else mask.reshape(b, p))
        else:
            bins = bin_index(labels.reshape(b, p), self.edges, self.edge_rule)
            if mask is not None:
                bins = bins.masked_fill(~mask.reshape(b, p), -1)
        return f3, bins.contiguous()

    def _tables(self, dtype: torch.dtype):
        if dtype == torch.float64:
            return self.transform, self.shift
        return self._transform_f32, self._shift_f32

    def forward(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
        """Calibrated features (a new tensor of the features' shape and dtype) in training mode once
        ``epoch >= start_smooth``; ``features`` itself otherwise. Gradient: ``dz = A_b^T dz~`` (identity on
        masked pixels and bins never seen); none into the statistics."""
        if not (self.training and self._calibrating):
            self._check_inputs(features, labels, mask)
            return features
        f3, bins = self._pixels_and_bins(features, labels, mask)
        _, impl = resolve("fds_recolor", f3, self.backend)
        transform, shift = self._tables(V.compute_dtype(features.dtype))
        return _ops.restore_layout(impl(f3, bins, transform, shift), features)

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch of raw (uncalibrated) features to this epoch's per-bin statistics.

        A no-op before epoch ``start_update``. With ``check_finite`` a batch whose kept features contain NaN
        or inf raises ``ValueError`` before anything is changed."""
        f3, bins = self._pixels_and_bins(features, labels, mask)
        if int(self.epoch) < self.start_update:
            return
        _, impl = resolve("fds_accumulate", f3, self.backend)
        count, mean, m2 = impl(f3.detach(), bins, self.num_bins, self.full)
        if V.value_checks(self.check_finite):
            # a NaN/inf kept feature makes its bin's mean non-finite; an overflow shows on the diagonal of
            # m2, which bounds every entry (|m2_ij| <= sqrt(m2_ii m2_jj)): O(bins * C) instead of O(N * C)
            spread = torch.diagonal(m2, dim1=-2, dim2=-1) if self.full else m2
            if V.any_true(~torch.isfinite(mean).all() | ~torch.isfinite(spread).all()):
                raise ValueError("features contain NaN or inf at kept pixels (or overflow float64 statistics); "
                                 "the FDS statistics were left unchanged")
        # Chan et al.: merge (n_a, mean_a, M2_a) with the batch (n_b, mean_b, M2_b):
        #   n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n,
        #   M2 = M2_a + M2_b + delta delta^T n_a n_b / n
        n_a = self.accum_count
        w_b = count / (n_a + count).clamp(min=1.0)                                   # n_b / n
        delta = mean - self.accum_mean
        coef = n_a * w_b                                                             # n_a n_b / n
        self.accum_m2.add_(m2)
        if self.full:
            self.accum_m2.baddbmm_((delta * coef.unsqueeze(1)).unsqueeze(2), delta.unsqueeze(1))
        else:
            self.accum_m2.addcmul_(delta * coef.unsqueeze(1), delta)
        self.accum_mean.addcmul_(delta, w_b.unsqueeze(1))
        self.accum_count.add_(count)

    @torch.no_grad()
    def update(self) -> None:
        """End of an epoch: fold this epoch's statistics into the running ones (from epoch ``start_update``
        on), smooth them over the seen bins, recompute every bin's transform, clear the accumulators and
        increment ``epoch``. With ``sync=True`` a collective: every process of the group calls it, and the
        statistics folded are those of every process's data (docs/methods.md §7.2)."""
        group = D.sync_group(self.sync, self.process_group)
        folding = int(self.epoch) >= self.start_update
        if group is not None:
            with D.agreement(group, "FDS.update", self.edges.device) as agreed:
                agreed.signature = {"feature_dim": self.feature_dim, "bin edges": D.fingerprint(self.edges),
                                    "covariance": D.fingerprint(self.covariance), "epoch": int(self.epoch),
                                    "start_update": self.start_update}
            if folding:
                self._merge_processes(group)
        if folding and self._fold():
            self._recompute_transforms(group)
        self.accum_count.zero_()
        self.accum_mean.zero_()
        self.accum_m2.zero_()
        self.epoch.add_(1)
        self._sync_epoch()

    def _merge_processes(self, group) -> None:
        """Replace this process's accumulators by those of the concatenated data of every process (Chan):
            n = sum_r n_r,   mean = sum_r n_r mean_r / n,   M2 = sum_r (M2_r + n_r d_r d_r^T),  d_r = mean_r - mean.
        Two float64 all-reduces; every process gets the same bits (docs/methods.md §7.2)."""
        n_r, mean_r = self.accum_count, self.accum_mean
        sums = D.all_reduce(torch.cat([n_r.unsqueeze(1), n_r.unsqueeze(1) * mean_r], 1), "sum", group)
        n = sums[:, 0]
        mean = sums[:, 1:] / n.clamp(min=1.0).unsqueeze(1)
        delta = mean_r - mean                                          # 0 rows of an empty bin: n_r = 0
        m2 = self.accum_m2.clone()
        if self.full:
            m2.baddbmm_((delta * n_r.unsqueeze(1)).unsqueeze(2), delta.unsqueeze(1))
        else:
            m2.addcmul_(delta * n_r.unsqueeze(1), delta)
        self.accum_m2.copy_(D.all_reduce(m2, "sum", group))
        self.accum_mean.copy_(mean)
        self.accum_count.copy_(n)

    def _fold(self) -> bool:
        n = self.accum_count
        ok = n >= 2                                                                  # n_b < 2: keep previous
        if not bool(ok.any()):
            return False
        if self.momentum is None:
            factor = 1.0 - n / (self.num_samples_tracked + n).clamp(min=1.0)
        else:
            factor = torch.full_like(n, self.momentum)
        factor = torch.where(self.num_samples_tracked > 0, factor, torch.zeros_like(factor))   # first: replace
        stat = (-1,) + (1,) * (self.running_cov.dim() - 1)
        cov = self.accum_m2 / (n - 1.0).clamp(min=1.0).view(stat)                    # unbiased
        new_mean = (1.0 - factor).unsqueeze(1) * self.accum_mean + factor.unsqueeze(1) * self.running_mean
        new_cov = (1.0 - factor).view(stat) * cov + factor.view(stat) * self.running_cov
        self.running_mean.copy_(torch.where(ok.unsqueeze(1), new_mean, self.running_mean))
        self.running_cov.copy_(torch.where(ok.view(stat), new_cov, self.running_cov))
        self.num_samples_tracked.add_(torch.where(ok, n, torch.zeros_like(n)))
        return True

    def _smooth(self, stats: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """sum_j w_j x[r(b + j)] over the seen bins of each window, renormalised by their total weight
        (reflect padding r); a window covering only seen bins is the plain convolution (no division)."""
        nb = stats.shape[0]
        flat = stats.reshape(nb, -1)
        weights = self._window.unsqueeze(0) * seen.to(flat.dtype)[self._window_src]  # [nb, ks]
        num = torch.zeros_like(flat)
        for j in range(weights.shape[1]):                                             # ks taps
            num.addcmul_(weights[:, j:j + 1], flat[self._window_src[:, j]])
        den = weights.sum(1, keepdim=True)
        all_seen = (weights == self._window.unsqueeze(0)).all(1, keepdim=True)
        out = torch.where(all_seen, num, num / den.clamp(min=torch.finfo(flat.dtype).tiny))
        return torch.where(den > 0, out, flat).reshape(stats.shape)

    def _full_transforms(self, bins, mean, cov, smoothed_mean, smoothed_cov):
        """``covariance='full'``: (A_b [k, C, C], shift_b [k, C]) of the bins ``bins`` [k]."""
        eye = torch.eye(self.feature_dim, dtype=cov.dtype, device=cov.device)
        # A = (S~ + eps I)^{1/2} (S + eps I)^{-1/2}, both roots from eigh: V f(lambda) V^T; eigenvalues
        # of a regularised PSD matrix are >= eps (clamped there against rounding).
        lam, vec = torch.linalg.eigh(cov[bins] + self.eps * eye)
        inv_root = (vec * lam.clamp(min=self.eps).rsqrt().unsqueeze(-2)) @ vec.mT
        lam, vec = torch.linalg.eigh(smoothed_cov[bins] + self.eps * eye)
        root = (vec * lam.clamp(min=self.eps).sqrt().unsqueeze(-2)) @ vec.mT
        a = root @ inv_root
        return a, smoothed_mean[bins] - (a @ mean[bins].unsqueeze(2)).squeeze(2)

    def _recompute_transforms(self, group=None) -> None:
        seen = self.num_samples_tracked > 0
        mean, cov = self.running_mean, self.running_cov
        smoothed_mean, smoothed_cov = self._smooth(mean, seen), self._smooth(cov, seen)
        self.smoothed_mean.copy_(smoothed_mean)
        self.smoothed_cov.copy_(smoothed_cov)
        if self.full:
            c = self.feature_dim
            idx = seen.nonzero().squeeze(1)
            stats = (mean, cov, smoothed_mean, smoothed_cov)
            if group is None:
                a_seen, shift_seen = self._full_transforms(idx, *stats)
            else:
                # the seen bins in world_size contiguous chunks: each process decomposes its chunk and one
                # all_gather assembles the transforms (the same bits on every process; docs/methods.md §7.2)
                chunks = torch.tensor_split(idx, D.world_size(group))
                a_own, shift_own = self._full_transforms(chunks[D.rank(group)], *stats)
                packed = torch.cat([a_own.reshape(-1, c * c), shift_own], 1)
                packed = torch.cat(D.all_gather(packed, group, sizes=[chunk.numel() for chunk in chunks]))
                a_seen, shift_seen = packed[:, :c * c].reshape(-1, c, c), packed[:, c * c:]
            a = torch.eye(c, dtype=cov.dtype, device=cov.device).expand_as(cov).clone()
            shift = torch.zeros_like(mean)                                            # unseen: identity, 0
            a[idx] = a_seen
            shift[idx] = shift_seen
        else:
            # published calibrate_mean_var: channels with var == 0, and bins with sum(var) < 1e-10, unchanged
            valid = (cov != 0) & (cov.sum(1, keepdim=True) >= _TINY_VARIANCE_SUM)
            ratio = (smoothed_cov / torch.where(valid, cov, torch.ones_like(cov))).clamp(*self.clip)
            a = torch.where(valid, ratio.sqrt(), torch.ones_like(cov))
            shift = torch.where(valid, smoothed_mean - a * mean, torch.zeros_like(mean))
            a = torch.where(seen.unsqueeze(1), a, torch.ones_like(a))                 # unseen: identity
        shift = torch.where(seen.unsqueeze(1), shift, torch.zeros_like(shift))
        self.transform.copy_(a)
        self.shift.copy_(shift)
        self._refresh_f32()
