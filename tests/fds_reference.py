"""Naive oracles for FDS (docs/methods.md §3), never the code under test: plain Python loops over pixels /
bins / window taps on Python floats (scipy for the matrix square roots: a Schur-based algorithm, independent
of the eigendecomposition the module uses): :func:`naive_bins`, :func:`naive_accumulate`,
:func:`naive_recolor`, :func:`naive_smooth`, and :class:`NaiveFDS`, the whole module's state machine (it
keeps every raw feature vector of the epoch, not sufficient statistics).

The published formulations (the published smoothing and dense FDS, and the reference-style formulations of
our two kernels that bench/bench_fds.py times) are in :mod:`imbreg_fast.experiments.published`.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

__all__ = ["NaiveFDS", "naive_accumulate", "naive_bins", "naive_recolor", "naive_smooth", "rows_of"]


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
