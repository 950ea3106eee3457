"""Independent references for FDS (docs/methods.md §3), never the code under test.

1. Naive oracles, plain Python loops over pixels / bins / window taps on Python floats (scipy for the
   matrix square roots: a Schur-based algorithm, independent of the eigendecomposition the module uses):
   :func:`naive_bins`, :func:`naive_accumulate`, :func:`naive_recolor`, :func:`naive_smooth`, and
   :class:`NaiveFDS`, the whole module's state machine (it keeps every raw feature vector of the epoch,
   not sufficient statistics).
2. :func:`published_smooth`: the published code's smoothing, ``F.conv1d`` over ``F.pad(mode='reflect')``.
3. Reference-style formulations of the two kernels, imported by bench/bench_fds.py as baselines. They
   take dense features ``[B, C, H, W]`` and bins ``[B, H*W]`` (every pixel in ``[0, nb)``) and return
   ``[B, C, H, W]``, differentiable w.r.t. the features:

   (a) :func:`recolor_gathered`  -- gathered per-pixel matrices, ``bmm(A[bins], z)`` ([N, C, C] memory);
   (b) :func:`recolor_masked_loop` -- a Python loop over bins with boolean masks;
   (c) :func:`recolor_sorted_loop` -- sort pixels by bin, one matmul per bin segment;
   (d) :func:`recolor_grouped_mm` -- sort pixels by bin, ``torch.nn.functional.grouped_mm`` over the bin
       offsets (CPU: fp32 only, C a multiple of 4);

   and for the statistics: :func:`accumulate_masked_loop` (per-bin loop) and
   :func:`accumulate_outer` (``index_add`` of per-pixel outer products, [N, C, C] memory).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

__all__ = ["NaiveFDS", "naive_accumulate", "naive_bins", "naive_recolor", "naive_smooth", "published_smooth",
           "accumulate_masked_loop", "accumulate_outer", "recolor_gathered", "recolor_grouped_mm",
           "recolor_masked_loop", "recolor_sorted_loop", "rows_of"]


# ----------------------------------------------------------------------------------------------------
# Naive oracles
# ----------------------------------------------------------------------------------------------------


def naive_bins(labels, edges, mask=None) -> list:
    """Per label (flattened): the largest b with edges[b] <= y, clamped to [0, nb - 1]; -1 if masked out."""
    ys = torch.as_tensor(labels).detach().double().reshape(-1).tolist()
    es = [float(e) for e in torch.as_tensor(edges).reshape(-1).tolist()]
    keep = [True] * len(ys) if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
    nb = len(es) - 1
    out = []
    for y, kp in zip(ys, keep):
        if not kp:
            out.append(-1)
            continue
        b = 0
        for j in range(nb):
            if es[j] <= y:
                b = j
        out.append(min(max(b, 0), nb - 1))
    return out


def rows_of(features3) -> list:
    """[B, C, P] tensor -> list of B*P feature vectors (lists of C floats), pixel order (b, p)."""
    x = features3.detach().double()
    b_, c_, p_ = x.shape
    flat = x.permute(0, 2, 1).reshape(-1, c_).tolist()
    return flat


def naive_accumulate(features3, bins, num_bins: int, full: bool):
    """(count [nb], mean [nb, C], m2 [nb, C, C] | [nb, C]) as float64 tensors, by loops: per bin, the
    batch mean of its pixels and sum (z - mean)(z - mean)^T."""
    rows = rows_of(features3)
    ks = [int(k) for k in bins.reshape(-1).tolist()]
    c = features3.shape[1]
    count = [0] * num_bins
    sums = [[0.0] * c for _ in range(num_bins)]
    for z, k in zip(rows, ks):
        if k < 0:
            continue
        count[k] += 1
        for i in range(c):
            sums[k][i] += z[i]
    mean = [[s / count[k] if count[k] else 0.0 for s in sums[k]] for k in range(num_bins)]
    if full:
        m2 = [[[0.0] * c for _ in range(c)] for _ in range(num_bins)]
    else:
        m2 = [[0.0] * c for _ in range(num_bins)]
    for z, k in zip(rows, ks):
        if k < 0:
            continue
        e = [z[i] - mean[k][i] for i in range(c)]
        for i in range(c):
            if full:
                for j in range(c):
                    m2[k][i][j] += e[i] * e[j]
            else:
                m2[k][i] += e[i] * e[i]
    f64 = torch.float64
    return torch.tensor(count, dtype=f64), torch.tensor(mean, dtype=f64), torch.tensor(m2, dtype=f64)


def naive_recolor(features3, bins, transform, shift):
    """out[b, :, p] = transform[k] @ z + shift[k] (diag: transform[k] * z + shift[k]), z where k = -1;
    float64 [B, C, P]."""
    b_, c, p_ = features3.shape
    rows = rows_of(features3)
    ks = [int(k) for k in bins.reshape(-1).tolist()]
    t = transform.detach().double().tolist()
    s = shift.detach().double().tolist()
    full = transform.dim() == 3
    out = []
    for z, k in zip(rows, ks):
        if k < 0:
            out.append(list(z))
        elif full:
            out.append([sum(t[k][i][j] * z[j] for j in range(c)) + s[k][i] for i in range(c)])
        else:
            out.append([t[k][i] * z[i] + s[k][i] for i in range(c)])
    return torch.tensor(out, dtype=torch.float64).reshape(b_, p_, c).permute(0, 2, 1).contiguous()


def _torch_reflect(i: int, n: int) -> int:
    """Index i mapped into [0, n) like F.pad(mode='reflect') (edge not repeated), repeatedly."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def naive_smooth(stats, seen, window) -> torch.Tensor:
    """Per bin b: sum_j w_j [seen] x[r(b + j - h)] / sum_j w_j [seen] (reflect padding r; unseen bins get
    zero weight, window renormalised over the seen bins it covers). stats [nb, ...] -> float64 [nb, ...];
    a bin whose window covers no seen bin keeps its own value."""
    x = stats.detach().double()
    nb = x.shape[0]
    flat = x.reshape(nb, -1).tolist()
    w = [float(v) for v in torch.as_tensor(window, dtype=torch.float64).tolist()]
    h = (len(w) - 1) // 2
    out = []
    for b in range(nb):
        num = [0.0] * len(flat[0])
        den = 0.0
        for j, wj in enumerate(w):
            src = _torch_reflect(b + j - h, nb)
            if not seen[src]:
                continue
            den += wj
            for i, v in enumerate(flat[src]):
                num[i] += wj * v
        out.append([v / den for v in num] if den > 0 else list(flat[b]))
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def published_smooth(stats, window) -> torch.Tensor:
    """The published FDS smoothing of [nb, D] statistics: conv1d over the bin axis, reflect padding."""
    half = (window.shape[0] - 1) // 2
    x = stats.detach().double().reshape(stats.shape[0], -1)
    padded = torch.nn.functional.pad(x.t().unsqueeze(1), (half, half), mode="reflect")       # [D, 1, nb + 2h]
    out = torch.nn.functional.conv1d(padded, window.double().view(1, 1, -1)).squeeze(1).t()
    return out.reshape(stats.shape)


class NaiveFDS:
    """The FDS module's state machine, naively: raw feature vectors kept per bin during an epoch; at
    ``update()``: per-bin mean and unbiased covariance (numpy), EMA (first fold replaces; bins with < 2
    vectors keep their statistics), smoothing over seen bins (:func:`naive_smooth`), transforms
    ``sqrtm(S~ + eps I) @ inv(sqrtm(S + eps I))`` with scipy (full) or the published
    ``calibrate_mean_var`` rule (diag: clamp(v~ / v, clip) on channels with v != 0, identity if
    sum(v) < 1e-10); then the epoch counter increments. Unseen bins calibrate to the identity."""

    def __init__(self, feature_dim, edges, *, full, window, momentum=0.9, eps=1e-5, clip=(0.1, 10.0),
                 start_update=0, start_smooth=1):
        self.c, self.edges, self.full = feature_dim, edges, full
        self.nb = len(edges) - 1
        self.window = window
        self.momentum, self.eps, self.clip = momentum, eps, clip
        self.start_update, self.start_smooth = start_update, start_smooth
        self.epoch = 0
        self.tracked = [0] * self.nb
        self.mean = [np.zeros(self.c) for _ in range(self.nb)]
        self.cov = [np.eye(self.c) if full else np.ones(self.c) for _ in range(self.nb)]
        self.batch = [[] for _ in range(self.nb)]
        self.transform = [None] * self.nb      # (A or scale, shift) per seen bin

    def accumulate(self, features3, labels, mask=None):
        if self.epoch < self.start_update:
            return
        for z, k in zip(rows_of(features3), naive_bins(labels, self.edges, mask)):
            if k >= 0:
                self.batch[k].append(np.array(z))

    def update(self):
        if self.epoch >= self.start_update:
            for k in range(self.nb):
                xs = self.batch[k]
                if len(xs) < 2:
                    continue
                x = np.stack(xs)
                mu = x.mean(0)
                cov = np.atleast_2d(np.cov(x.T, ddof=1)) if self.full else x.var(0, ddof=1)
                if self.tracked[k] == 0:
                    factor = 0.0
                elif self.momentum is None:
                    factor = 1.0 - len(xs) / (self.tracked[k] + len(xs))
                else:
                    factor = self.momentum
                self.mean[k] = (1 - factor) * mu + factor * self.mean[k]
                self.cov[k] = (1 - factor) * cov + factor * self.cov[k]
                self.tracked[k] += len(xs)
        seen = [t > 0 for t in self.tracked]
        means = torch.tensor(np.stack(self.mean))
        covs = torch.tensor(np.stack(self.cov))
        self.smoothed_mean = naive_smooth(means, seen, self.window).numpy()
        self.smoothed_cov = naive_smooth(covs, seen, self.window).numpy()
        for k in range(self.nb):
            if not seen[k]:
                self.transform[k] = None
                continue
            if self.full:
                eye = np.eye(self.c)
                root_raw = np.real(scipy.linalg.sqrtm(self.cov[k] + self.eps * eye))
                root_smooth = np.real(scipy.linalg.sqrtm(self.smoothed_cov[k] + self.eps * eye))
                a = root_smooth @ np.linalg.inv(root_raw)
                self.transform[k] = (a, self.smoothed_mean[k] - a @ self.mean[k])
            else:
                v1, v2 = self.cov[k], self.smoothed_cov[k]
                scale, shift = np.ones(self.c), np.zeros(self.c)
                if v1.sum() >= 1e-10:
                    for i in range(self.c):
                        if v1[i] != 0:
                            scale[i] = math.sqrt(min(max(v2[i] / v1[i], self.clip[0]), self.clip[1]))
                            shift[i] = self.smoothed_mean[k][i] - scale[i] * self.mean[k][i]
                self.transform[k] = (scale, shift)
        self.batch = [[] for _ in range(self.nb)]
        self.epoch += 1

    def forward(self, features3, labels, mask=None, training=True):
        """Calibrated features, float64 [B, C, P]."""
        b_, c, p_ = features3.shape
        rows = rows_of(features3)
        if not training or self.epoch < self.start_smooth:
            out = rows
        else:
            out = []
            for z, k in zip(rows, naive_bins(labels, self.edges, mask)):
                if k < 0 or self.transform[k] is None:
                    out.append(z)
                    continue
                t, s = self.transform[k]
                z = np.array(z)
                out.append(list((t @ z if self.full else t * z) + s))
        return torch.tensor(np.array(out), dtype=torch.float64).reshape(b_, p_, c).permute(0, 2, 1).contiguous()


# ----------------------------------------------------------------------------------------------------
# Reference-style formulations (bench baselines). Dense features [B, C, H, W], bins [B, H*W].
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
    inverse)`` to leave the sort out of the timing)."""
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
