"""Training-label priors of the Balanced MSE losses (docs/methods.md §1.2, §1.3).

- :func:`fit_gmm`: a Gaussian mixture fitted by EM, the prior of GAI (:func:`imbreg_fast.functional.gai_loss`).
  Same algorithm and defaults as scikit-learn's ``GaussianMixture(covariance_type='full')`` (k-means
  initialisation, EM until the mean log-likelihood changes by less than ``tol``), in PyTorch, seeded by a
  ``torch.Generator``.
- :func:`bin_prior`: the label histogram with empty bins dropped, the prior of BNI
  (:func:`imbreg_fast.functional.bni_loss`).
- :func:`kmeans`: the k-means (k-means++ seeding, Lloyd iterations) used to initialise :func:`fit_gmm`.

These run once before training, on the training labels; they are not hot paths (one host sync per
iteration to test convergence).

Sharded training sets (``sync=True``, ``process_group``; :mod:`imbreg_fast.distributed`): each process passes
its shard and every process gets the result on the concatenated labels of all processes (rank order):
:func:`bin_prior` all-reduces the counts (and the data range), :func:`kmeans` and :func:`fit_gmm` run the
same iterations with their sums all-reduced and the seeding draws resolved across processes
(docs/methods.md §7.4).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from . import _validation as V
from . import distributed as D

__all__ = ["GMM", "ConvergenceWarning", "fit_gmm", "kmeans", "bin_prior"]

_INITS = ("kmeans", "k-means++", "random", "random_from_data")


class ConvergenceWarning(UserWarning):
    """EM or k-means stopped at ``max_iter`` before meeting its tolerance."""


class GMM(NamedTuple):
    """A Gaussian mixture: ``weights [K]`` (> 0, summing to 1), ``means [K, d]``, ``covariances [K, d, d]``.

    Unpacks as ``weights, means, covariances = gmm``, the form :func:`imbreg_fast.functional.gai_loss` and
    :class:`imbreg_fast.nn.GAILoss` take.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of the mixture at ``x`` (``[N]`` for d = 1, or ``[N, d]``) -> ``[N]`` (2 pi terms included).

        Computed in the mixture's dtype.
        """
        x = _as_samples("x", x, self.means.dtype)
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"x has dimension {x.shape[1]} but the mixture has dimension {self.means.shape[1]}")
        chol = _cholesky(self.covariances)
        return torch.logsumexp(torch.log(self.weights) + _gaussian_log_prob(x.to(self.means.device), self.means, chol),
                               dim=1)


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _as_samples(name: str, x, dtype: torch.dtype) -> torch.Tensor:
    """[N] or [N, d] real tensor -> [N, d] tensor of ``dtype`` (detached), finite."""
    x = V.check_real_tensor(name, x)
    if x.dim() == 1:
        x = x.reshape(-1, 1)
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be [N] or [N, d] with d >= 1, got shape {tuple(x.shape)}")
    x = x.detach().to(dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _generator(seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError("seed must be an int or a CPU torch.Generator")
        return seed
    seed = V.check_int("seed", seed, 0)
    return torch.Generator(device="cpu").manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Where this process's samples sit among every process's (sync=True); the identity without a group
# --------------------------------------------------------------------------------------------------


class _Partition:
    """The samples of a fit are the concatenation of every process's rows in rank order; this process holds
    ``sizes[rank]`` of them, from global row ``offset`` on. The k-means and EM code is written once, with
    the few cross-process steps it needs as methods; without a group (one process) every method is the plain
    single-process operation, so ``sync=False`` computes exactly what it always did (docs/methods.md §7.4)."""

    def __init__(self, group, sizes):
        self.group = group
        self.sizes = [int(v) for v in sizes]
        self.rank = 0 if group is None else D.rank(group)
        self.offset = sum(self.sizes[:self.rank])
        self.total = sum(self.sizes)

    def sum(self, *tensors):
        """Each tensor summed over the processes (one float64 all-reduce for all of them)."""
        if self.group is None:
            return tensors
        flat = D.all_reduce(torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]), "sum", self.group)
        out, at = [], 0
        for t in tensors:
            out.append(flat[at:at + t.numel()].reshape(t.shape).to(t.dtype))
            at += t.numel()
        return tuple(out)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the rows of x [n, d] over every process."""
        if self.group is None:
            return x.mean(0)
        return self.sum(x.sum(0))[0] / self.total

    def per_process(self, values: torch.Tensor) -> torch.Tensor:
        """[world_size, T]: every process's ``values`` [T] (one all_gather)."""
        if self.group is None:
            return values.unsqueeze(0)
        return torch.stack(D.all_gather(values.unsqueeze(0), self.group, sizes=[1] * len(self.sizes))).squeeze(1)

    def owned(self, index: torch.Tensor):
        """(positions in ``index``, local rows) of the global row indices ``index`` held here."""
        if self.group is None:
            return torch.arange(index.numel(), device=index.device), index
        mine = (index >= self.offset) & (index < self.offset + self.sizes[self.rank])
        return torch.nonzero(mine).squeeze(1), index[mine] - self.offset

    def rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Global rows ``index`` [T] of the concatenated x: [T, d], on every process (the holder of each row
        contributes it, the others zeros, to one all-reduce: exact)."""
        if self.group is None:
            return x[index]
        out = x.new_zeros(index.numel(), x.shape[1])
        at, local = self.owned(index.to(x.device))
        out[at] = x[local]
        return self.sum(out)[0]

    def draw(self, x: torch.Tensor, weights: torch.Tensor, totals: torch.Tensor, draws: torch.Tensor):
        """(global indices [T], rows [T, d]) of the rows drawn with probability proportional to ``weights``
        (this process's [n]) for uniform draws u * sum(weights) in ``draws`` [T]: the first row whose
        cumulative weight reaches the draw. ``totals`` [world_size]: every process's sum of weights. With a
        group, the cumulative weights are each process's own cumulative sums shifted by the totals of the
        processes before it; the holder of each drawn row contributes its index and values, the others
        zeros, to one all-reduce (exact)."""
        if self.group is None:
            index = torch.searchsorted(torch.cumsum(weights, 0), draws).clamp_max_(self.total - 1)
            return index, x[index]
        prefix = torch.cumsum(totals.to(draws.device), 0)
        last = max(r for r, n in enumerate(self.sizes) if n > 0)
        owner = torch.searchsorted(prefix, draws).clamp_max_(last)
        packed = x.new_zeros(draws.numel(), 1 + x.shape[1])                  # [global index, row]
        mine = owner == self.rank
        if bool(mine.any()):
            before = prefix[self.rank - 1] if self.rank > 0 else prefix.new_zeros(())
            local = torch.searchsorted(before + torch.cumsum(weights, 0), draws[mine])
            local = local.clamp_max_(self.sizes[self.rank] - 1)
            packed[mine, 0] = (local + self.offset).to(x.dtype)
            packed[mine, 1:] = x[local]
        packed = self.sum(packed)[0]
        return packed[:, 0].round().long(), packed[:, 1:]

    def farthest(self, x: torch.Tensor, dist: torch.Tensor, labels: torch.Tensor, count: int):
        """The ``count`` rows with the largest ``dist`` over every process, farthest first: (rows [count, d],
        their labels as a list)."""
        if self.group is None:
            far = torch.topk(dist, count).indices
            return x[far], labels[far].tolist()
        take = min(count, dist.shape[0])
        values, local = torch.topk(dist, take)
        packed = x.new_full((count, 2 + x.shape[1]), -math.inf)
        packed[:take, 0] = values
        packed[:take, 1] = labels[local].to(x.dtype)
        packed[:take, 2:] = x[local]
        packed = torch.cat(D.all_gather(packed, self.group, sizes=[count] * len(self.sizes)))
        order = torch.sort(packed[:, 0], descending=True, stable=True).indices[:count]
        return packed[order, 2:], packed[order, 1].round().long().tolist()

    def uniform(self, gen: torch.Generator, k: int, dtype: torch.dtype, device) -> torch.Tensor:
        """This process's rows of ``torch.rand(total, k, generator=gen)`` [n, k]; every process draws the
        whole stream (in chunks), so the generator stays in step on every process."""
        if self.group is None:
            return torch.rand(self.total, k, generator=gen, dtype=dtype).to(device)
        start, stop = self.offset, self.offset + self.sizes[self.rank]
        chunk = max(1, (1 << 20) // k)
        kept = []
        for lo in range(0, self.total, chunk):
            hi = min(lo + chunk, self.total)
            block = torch.rand(hi - lo, k, generator=gen, dtype=dtype)
            if lo < stop and hi > start:
                kept.append(block[max(start - lo, 0):min(stop, hi) - lo])
        return (torch.cat(kept) if kept else torch.empty(0, k, dtype=dtype)).to(device)


# --------------------------------------------------------------------------------------------------
# k-means (scikit-learn's KMeans(init='k-means++', n_init=1, algorithm='lloyd'))
# --------------------------------------------------------------------------------------------------


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[N, d], [M, d] -> [M, N] squared Euclidean distances (clamped at 0)."""
    return (c.pow(2).sum(1, keepdim=True) - 2.0 * c @ x.T + x.pow(2).sum(1)).clamp_min_(0.0)


def _kmeans_plusplus(part: _Partition, x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: global indices [k] of the chosen rows of the samples (x [n, d] here).

    Center 0 is a uniformly drawn row; each further center is the best (lowest potential sum_n min_c
    |x_n - c|^2) of ``2 + int(log k)`` rows drawn with probability proportional to the current squared
    distance to the nearest center (Arthur & Vassilvitskii; scikit-learn's ``_kmeans_plusplus``). Across
    processes: the potentials are per-process sums gathered, the draws are located in the per-process
    cumulative sums, and the drawn rows are shared by their holders (docs/methods.md §7.4).
    """
    trials = 2 + int(math.log(k))
    indices = torch.empty(k, dtype=torch.long)
    indices[0] = int(torch.randint(part.total, (1,), generator=gen))
    closest = _sq_dist(x, part.rows(x, indices[:1].to(x.device)))[0]       # [n]
    totals = part.per_process(closest.sum().reshape(1))[:, 0]              # [world]
    pot = totals.sum()
    for c in range(1, k):
        draws = torch.rand(trials, generator=gen, dtype=x.dtype).to(x.device) * pot
        cand, cand_rows = part.draw(x, closest, totals, draws)             # [T], [T, d]
        dist = torch.minimum(closest, _sq_dist(x, cand_rows))              # [T, n]
        table = part.per_process(dist.sum(1))                              # [world, T]
        cand_pot = table.sum(0)
        best = int(torch.argmin(cand_pot))
        pot, closest, totals = cand_pot[best], dist[best], table[:, best]
        indices[c] = int(cand[best])
    return indices.to(x.device)


def _assign(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Nearest center of each row (ties -> lowest index): [N]."""
    return torch.argmin(_sq_dist(x, centers), dim=0)


def _lloyd(part: _Partition, x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from ``centers`` [K, d]; (centers, labels of this process's rows).

    Stops when the labels do not change, or when sum_k |c_k' - c_k|^2 <= tol. A cluster left empty takes the
    row farthest from its current center (scikit-learn's relocation rule). Sums use a one-hot matmul, so
    the result does not depend on atomics or thread count; across processes the per-cluster sums, counts and
    the number of changed labels are one all-reduce per iteration.
    """
    k = centers.shape[0]
    labels_old = None
    strict = False
    for _ in range(max_iter):
        labels = _assign(x, centers)
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)       # [N, K]
        changed = onehot.new_zeros(()) if labels_old is None else (labels != labels_old).sum().to(x.dtype)
        sums, counts, changed = part.sum(onehot.T @ x, onehot.sum(0), changed)   # [K, d], [K], []
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() > 0:
            dist = (x - centers[labels]).pow(2).sum(1)
            rows, old_ids = part.farthest(x, dist, labels, empty.numel())
            for new_id, row, old_id in zip(empty.tolist(), rows, old_ids):
                sums[old_id] -= row
                counts[old_id] -= 1
                sums[new_id] = row
                counts[new_id] = 1
        new_centers = sums / counts.clamp_min(1).unsqueeze(1)
        shift = float((new_centers - centers).pow(2).sum())
        centers = new_centers
        if labels_old is not None and int(changed) == 0:
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    else:
        warnings.warn(f"kmeans did not converge in max_iter={max_iter} iterations", ConvergenceWarning,
                      stacklevel=3)
    if not strict:
        labels = _assign(x, centers)
    return centers, labels


def kmeans(x: torch.Tensor, n_clusters: int, *, init="k-means++", max_iter: int = 300, tol: float = 1e-4,
           seed=0, sync: bool = False, process_group=None):
    """k-means clustering with k-means++ seeding and Lloyd iterations (scikit-learn's ``KMeans`` with
    ``n_init=1``, ``algorithm='lloyd'``).

    Args:
        x: ``[N]`` or ``[N, d]`` samples (real dtype; computed in float64).
        n_clusters: K >= 1; ``x`` must have at least K distinct rows.
        init: ``'k-means++'`` (greedy k-means++ seeding: the first center a uniformly drawn row, each
            next one the best of ``2 + int(log K)`` rows drawn with probability proportional to their squared
            distance to the nearest chosen center), or initial centers ``[K, d]``.
        max_iter: maximum number of Lloyd iterations.
        tol: stop when the squared center shift, summed over clusters, is <= ``tol`` times the mean
            per-feature variance of ``x`` (or when no label changes).
        seed: int or CPU ``torch.Generator`` (random draws are made on the CPU, so the result does not
            depend on the device).
        sync, process_group: ``sync=True``: ``x`` is this process's shard; the clustering is that of the
            concatenated samples of every process of ``process_group`` (module docstring), the same centers
            on every process (a generator must be in the same state on every process).

    Returns:
        ``(centers [K, d] float64, labels [N] int64)`` on ``x``'s device (with ``sync``, the labels of this
        process's rows).
    """
    group = D.sync_group(sync, process_group)
    with D.agreement(group, "kmeans", getattr(x, "device", None)) as agreed:
        x = _as_samples("x", x, torch.float64)
        k = V.check_int("n_clusters", n_clusters, 1)
        if isinstance(init, str):
            if init != "k-means++":
                raise ValueError(f"init must be 'k-means++' or initial centers [K, d], got {init!r}")
            init = None
        else:
            init = _as_samples("init", init, torch.float64).to(x.device)
            if tuple(init.shape) != (k, x.shape[1]):
                raise ValueError(f"init centers must have shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        max_iter = V.check_int("max_iter", max_iter, 1)
        tol = V.check_nonnegative("tol", tol)
        gen = _generator(seed)
        agreed.signature = {"the sample dimension": x.shape[1], "n_clusters": k,
                            "max_iter and tol": D.fingerprint(max_iter, tol), "init": D.fingerprint(init),
                            "the generator state": D.fingerprint(gen.get_state())}
        agreed.shared = (x.shape[0],)
    part = _Partition(group, [x.shape[0]] if group is None else agreed.table[:, 0].tolist())
    _check_distinct(part, x, k, "n_clusters")
    return _kmeans(part, x, k, max_iter, tol, gen, init)


def _kmeans(part: _Partition, x: torch.Tensor, k: int, max_iter: int, tol: float, gen: torch.Generator, init=None):
    mean = part.mean(x)
    xc = x - mean                                       # centred for accurate |c|^2 - 2 x.c distances
    tol = float(part.mean(xc.pow(2)).mean()) * tol      # mean per-feature (population) variance * tol
    start = part.rows(xc, _kmeans_plusplus(part, xc, k, gen)) if init is None else init - mean
    centers, labels = _lloyd(part, xc, start, max_iter, tol)
    return centers + mean, labels


def _check_distinct(part: _Partition, x: torch.Tensor, k: int, name: str) -> None:
    if part.total < k:
        raise ValueError(f"{name}={k} needs at least {k} samples, got {part.total}")
    distinct = torch.unique(x, dim=0)
    if part.group is not None:
        # at least k distinct rows overall iff the union of every process's first k distinct rows has k
        distinct = torch.unique(torch.cat(D.all_gather(distinct[:k], part.group)), dim=0)
    if distinct.shape[0] < k:
        raise ValueError(f"{name}={k} is more than the number of distinct samples ({distinct.shape[0]}); "
                         f"use fewer components")


# --------------------------------------------------------------------------------------------------
# Gaussian mixture EM (scikit-learn's GaussianMixture(covariance_type='full'))
# --------------------------------------------------------------------------------------------------


def _gaussian_log_prob(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """log N(x_n; mu_k, Sigma_k) -> [N, K]; x [N, d], means [K, d], chol [K, d, d] = cholesky(Sigma_k)."""
    d = x.shape[1]
    diff = (x.unsqueeze(0) - means.unsqueeze(1)).transpose(1, 2)                 # [K, d, N]
    if d == 1:   # element-wise: batched LAPACK calls on 1x1 matrices cost far more than the maths
        z = diff / chol
    else:
        z = torch.linalg.solve_triangular(chol, diff, upper=False)               # L^-1 (x - mu)
    maha = z.pow(2).sum(1)                                                       # [K, N]
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)     # [K]
    return (-0.5 * (d * math.log(2.0 * math.pi) + maha + logdet.unsqueeze(1))).T


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    if cov.shape[-1] == 1:
        ok = cov.reshape(-1) > 0
        chol = torch.sqrt(cov)
    else:
        chol, info = torch.linalg.cholesky_ex(cov)
        ok = info == 0
    if not bool(ok.all()):
        bad = int(torch.nonzero(~ok)[0])
        raise ValueError(f"the covariance of component {bad} is not positive definite (in fit_gmm: the component "
                         "collapsed onto too few distinct samples; use fewer components or a larger reg_covar)")
    return chol


def _m_step(part: _Partition, x: torch.Tensor, resp: torch.Tensor, reg_covar: float, *extra: torch.Tensor):
    """(unnormalised weights nk [K], means [K, d], covariances [K, d, d], *extra) from responsibilities resp [N, K].

    nk = sum_n r_nk + 10 eps;  mu_k = sum_n r_nk x_n / nk;
    Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / nk + reg_covar I.
    Across processes the sums run over every process's rows: two all-reduces (nk with sum_n r_nk x_n, and the
    ``extra`` tensors summed along; then the centred scatter, around the global means).
    """
    nk, weighted_sum, *extra = part.sum(resp.sum(0), resp.T @ x, *extra)
    nk = nk + 10.0 * torch.finfo(resp.dtype).eps
    means = weighted_sum / nk.unsqueeze(1)
    diff = x.unsqueeze(0) - means.unsqueeze(1)                                   # [K, N, d]
    cov = part.sum((resp.T.unsqueeze(2) * diff).transpose(1, 2) @ diff)[0] / nk.reshape(-1, 1, 1)
    cov = 0.5 * (cov + cov.transpose(1, 2))
    cov = cov + reg_covar * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return (nk, means, cov, *extra)


def _initial_params(part: _Partition, x: torch.Tensor, k: int, init, reg_covar: float, gen: torch.Generator):
    """(weights, means, covariances) before the first E-step, as scikit-learn's ``_initialize_parameters``."""
    n = part.total
    if not isinstance(init, str):
        return init
    if init == "kmeans":
        _, labels = _kmeans(part, x, k, 300, 1e-4, gen)
        resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    elif init == "k-means++":
        mean = part.mean(x)
        resp = x.new_zeros(x.shape[0], k)
        cols, rows = part.owned(_kmeans_plusplus(part, x - mean, k, gen))
        resp[rows, cols] = 1.0
    elif init == "random":
        resp = part.uniform(gen, k, x.dtype, x.device)
        resp = resp / resp.sum(1, keepdim=True)
    else:  # random_from_data
        resp = x.new_zeros(x.shape[0], k)
        cols, rows = part.owned(torch.randperm(n, generator=gen)[:k].to(x.device))
        resp[rows, cols] = 1.0
    nk, means, cov = _m_step(part, x, resp, reg_covar)
    return nk / n, means, cov


def _check_init_params(init, k: int, d: int, x: torch.Tensor):
    try:
        weights, means, covariances = init
    except (TypeError, ValueError):
        raise TypeError(f"init must be one of {_INITS} or a (weights, means, covariances) tuple, "
                        f"got {init!r}") from None
    out = []
    specs = (("weights", weights, (k,)), ("means", means, (k, d)), ("covariances", covariances, (k, d, d)))
    for name, t, shape in specs:
        t = V.check_real_tensor(f"init {name}", t).detach().to(device=x.device, dtype=x.dtype)
        if d == 1 and name != "weights" and t.numel() == k:
            t = t.reshape(shape)
        if tuple(t.shape) != shape:
            raise ValueError(f"init {name} must have shape {shape}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"init {name} contains NaN or inf")
        out.append(t)
    if bool((out[0] <= 0).any()):
        raise ValueError("init weights must be > 0")
    return out[0] / out[0].sum(), out[1], out[2]


def fit_gmm(targets: torch.Tensor, n_components: int, *, tol: float = 1e-3, reg_covar: float = 1e-6,
            max_iter: int = 100, n_init: int = 1, init="kmeans", seed=0,
            dtype: torch.dtype = torch.float64, sync: bool = False, process_group=None) -> GMM:
    """Fit a Gaussian mixture with full covariances to the training labels by EM: the GAI prior.

    The algorithm and defaults of scikit-learn's ``GaussianMixture(n_components, covariance_type='full')``:
    initial responsibilities from ``init``, then EM iterations (E-step with the current parameters, M-step)
    until the mean per-sample log-likelihood changes by less than ``tol`` (the log-likelihood of iteration t
    is that of the parameters entering it). ``reg_covar`` is added to the diagonal of every covariance. With
    ``n_init > 1`` the run with the highest final log-likelihood is kept. Not converging in ``max_iter``
    iterations emits a :class:`ConvergenceWarning`.

    Random draws come from a CPU ``torch.Generator`` seeded with ``seed``: the same call gives the same
    result every time and on every device (up to floating-point reductions of the device). The numbers
    differ from scikit-learn's (numpy's generator); the fitted mixture agrees whenever the EM optimum
    reached is the same.

    Args:
        targets: training labels ``[N]`` (d = 1) or ``[N, d]``, any real dtype; N >= 2 and at least
            ``n_components`` distinct rows. Dense label maps: pass ``target[mask].reshape(-1)``.
        n_components: K >= 1 (the reference uses 8 for age, 16 for depth).
        tol: convergence threshold on the change of the mean log-likelihood.
        reg_covar: non-negative value added to the diagonal of each covariance.
        max_iter: maximum EM iterations per run (0: return the initial parameters).
        n_init: number of runs (with successive draws of the generator).
        init: ``'kmeans'`` (default: labels of :func:`kmeans` -> one-hot responsibilities), ``'k-means++'``
            (responsibility 1 for the k-means++ seed rows only), ``'random'`` (uniform random
            responsibilities, row-normalised), ``'random_from_data'`` (K distinct random rows), or initial
            parameters ``(weights [K], means [K, d], covariances [K, d, d])`` (scikit-learn's
            ``weights_init``/``means_init``/``precisions_init``).
        seed: int, or a CPU ``torch.Generator`` to draw from.
        dtype: dtype of the returned tensors. EM always runs in float64 (like the reference, whose GMM
            comes from numpy); the Balanced MSE losses cast the prior to their compute dtype.
        sync, process_group: ``sync=True``: ``targets`` is this process's shard (it may be empty); the fit is
            that of the concatenated labels of every process of ``process_group`` (module docstring), the same
            mixture on every process. Every iteration all-reduces the E-step's sufficient statistics; the
            seeding draws are resolved across processes (docs/methods.md §7.4). ``seed`` must give the same
            draws on every process (an int, or generators in the same state).

    Returns:
        :class:`GMM` ``(weights [K], means [K, d], covariances [K, d, d])`` on ``targets``' device.

    Memory: O(N K d) per iteration (responsibilities and centred samples).
    """
    group = D.sync_group(sync, process_group)
    with D.agreement(group, "fit_gmm", getattr(targets, "device", None)) as agreed:
        x = _as_samples("targets", targets, torch.float64)
        k = V.check_int("n_components", n_components, 1)
        tol = V.check_nonnegative("tol", tol)
        reg_covar = V.check_nonnegative("reg_covar", reg_covar)
        max_iter = V.check_int("max_iter", max_iter, 0)
        n_init = V.check_int("n_init", n_init, 1)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if isinstance(init, str):
            if init not in _INITS:
                raise ValueError(f"init must be one of {_INITS} or a (weights, means, covariances) tuple, "
                                 f"got {init!r}")
        else:
            init = _check_init_params(init, k, x.shape[1], x)
        gen = _generator(seed)
        agreed.signature = {"the target dimension": x.shape[1], "n_components": k,
                            "tol, reg_covar, max_iter and n_init": D.fingerprint(tol, reg_covar, max_iter, n_init),
                            "init": D.fingerprint(*init) if isinstance(init, tuple) else D.fingerprint(init),
                            "the generator state": D.fingerprint(gen.get_state())}
        agreed.shared = (x.shape[0],)
    part = _Partition(group, [x.shape[0]] if group is None else agreed.table[:, 0].tolist())
    if part.total < 2:
        raise ValueError(f"targets must have at least 2 samples, got {part.total}")
    _check_distinct(part, x, k, "n_components")

    best, best_lb, best_converged = None, -math.inf, False
    for _ in range(n_init):
        weights, means, cov = _initial_params(part, x, k, init, reg_covar, gen)
        chol = _cholesky(cov)
        lower_bound, converged = -math.inf, False
        for _ in range(max_iter):
            prev = lower_bound
            # E-step: log r_nk = log phi_k + log N(x_n; mu_k, Sigma_k) - log p(x_n)
            weighted = torch.log(weights) + _gaussian_log_prob(x, means, chol)     # [N, K]
            log_norm = torch.logsumexp(weighted, dim=1)
            resp = torch.exp(weighted - log_norm.unsqueeze(1))
            # M-step (its first all-reduce also sums the log-likelihoods)
            nk, means, cov, log_norm_sum = _m_step(part, x, resp, reg_covar, log_norm.sum())
            weights = nk / nk.sum()
            chol = _cholesky(cov)
            lower_bound = float(log_norm.mean()) if group is None else float(log_norm_sum) / part.total
            if abs(lower_bound - prev) < tol:
                converged = True
                break
        if lower_bound > best_lb or best_lb == -math.inf:      # (scikit-learn's rule)
            best, best_lb, best_converged = (weights, means, cov), lower_bound, converged
    if max_iter > 0 and not best_converged:
        warnings.warn(f"fit_gmm: EM did not converge in max_iter={max_iter} iterations (tol={tol}); increase "
                      "max_iter or tol, or check the targets", ConvergenceWarning, stacklevel=2)
    return GMM(*(t.to(dtype) for t in best))


# --------------------------------------------------------------------------------------------------
# Histogram prior (BNI)
# --------------------------------------------------------------------------------------------------


def _check_edges(edges) -> torch.Tensor:
    if not isinstance(edges, torch.Tensor):
        try:
            edges = torch.as_tensor(edges, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("edges_or_bins must be an int (number of bins) or a 1-D tensor of bin edges, "
                            f"got {type(edges).__name__}") from None
    edges = V.check_real_tensor("edges_or_bins", edges).detach().to(torch.float64)
    if edges.dim() != 1 or edges.numel() < 2:
        raise ValueError(f"bin edges must be a 1-D tensor with at least 2 entries, got shape {tuple(edges.shape)}")
    if not bool(torch.isfinite(edges).all()):
        raise ValueError("bin edges contain NaN or inf")
    if not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("bin edges must be strictly increasing")
    return edges


def _smooth_counts(counts: torch.Tensor, smooth) -> torch.Tensor:
    """Counts [B] convolved over the bin axis with the max-normalised LDS window (docs/methods.md §2)."""
    if not isinstance(smooth, (tuple, list)) or len(smooth) not in (3, 4):
        raise TypeError(f"smooth must be None, (kind, ks, sigma) or (kind, ks, sigma, mode), got {smooth!r}")
    kind, ks, sigma = smooth[:3]
    mode = smooth[3] if len(smooth) == 4 else "constant"
    from .lds import kernel_window, smooth_counts  # lazily: only bin_prior(smooth=...) needs LDS

    return smooth_counts(counts, kernel_window(kind, ks, sigma, "max"), mode=mode)


def bin_prior(targets: torch.Tensor, edges_or_bins, *, range=None, smooth=None, drop_empty: bool = False,
              dtype: torch.dtype = torch.float64, sync: bool = False, process_group=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram prior of the training labels for BNI: ``(bin_centers [K], bin_weights [K])``.

    ``bin_weights[k] = count_k / sum_j count_j`` over the bins (docs/methods.md §1.3), empty bins kept with
    weight 0 unless ``drop_empty``, ``bin_centers[k]`` the midpoint of bin k's edges. Bin k is ``[e_k, e_{k+1})``, the last bin
    ``[e_{K-1}, e_K]`` (numpy's convention). Targets outside ``[e_0, e_K]`` are counted in the first / last bin
    (the reference drops labels above its ``max_target`` instead).

    Args:
        targets: training labels, any shape; every element is one scalar label (e.g. ``[N]``, ``[N, 1]``, or
            ``target[mask]`` of a dense map). NaN/inf raise.
        edges_or_bins: number of equal-width bins over ``range`` (int >= 1), or a 1-D strictly increasing
            tensor of bin edges. For integer labels (ages) use edges ``arange(lo - 0.5, hi + 1.5)``: the
            centers are then the integers, as the reference's buckets.
        range: ``(lo, hi)`` for an int ``edges_or_bins``; default ``(targets.min(), targets.max())``. If
            ``lo == hi``, ``(lo - 0.5, hi + 0.5)`` is used (as numpy).
        smooth: ``None``, or ``(kind, ks, sigma)`` / ``(kind, ks, sigma, mode)`` to convolve the counts of all
            bins with the max-normalised LDS window :func:`imbreg_fast.lds.kernel_window` before dropping empty
            bins and normalising (:func:`imbreg_fast.lds.smooth_counts`; ``mode`` default ``'constant'``: zeros
            outside the bin range), as the reference's ``get_bucket_info(lds=True)`` (which truncates the
            smoothed counts to integers; we keep them real). Bins next to occupied ones then get weight.
        drop_empty: drop bins with zero (smoothed) count, as the reference's buckets. The default ``False``
            keeps every bin (weight 0 for the empty ones, which contribute nothing to the BNI loss): evenly
            spaced bins (an int ``edges_or_bins``, or evenly spaced edges) then stay a uniform grid, on which
            the fused BNI kernels need 2 exps per chunk of up to 16 bins instead of one per bin
            (docs/methods.md §1.5). The loss value is the same either way.
        dtype: floating dtype of the results (counting is exact; results are computed in float64).
        sync, process_group: ``sync=True``: ``targets`` is this process's shard (it may be empty); the prior
            is that of the concatenated labels of every process of ``process_group``, on every process (the
            counts all-reduced, and without ``range`` the data range first; docs/methods.md §7.3).

    Returns:
        ``(bin_centers [K], bin_weights [K])`` on ``targets``' device.
    """
    group = D.sync_group(sync, process_group)
    with D.agreement(group, "bin_prior", getattr(targets, "device", None)) as agreed:
        t = V.check_real_tensor("targets", targets).detach().reshape(-1).to(torch.float64)
        if t.numel() == 0 and group is None:
            raise ValueError("targets is empty")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("targets contains NaN or inf")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if isinstance(edges_or_bins, bool):
            raise TypeError("edges_or_bins must be an int (number of bins) or a 1-D tensor of bin edges, got bool")
        edges = bounds = None
        if isinstance(edges_or_bins, int):
            n_bins = V.check_int("edges_or_bins", edges_or_bins, 1)
            if range is not None:
                try:
                    bounds = tuple(float(v) for v in range)
                    lo, hi = bounds
                except (TypeError, ValueError):
                    raise TypeError(f"range must be None or (lo, hi), got {range!r}") from None
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                    raise ValueError(f"range must be finite with lo <= hi, got {range!r}")
        else:
            if range is not None:
                raise ValueError("range is only used with an int number of bins; the edges already fix the range")
            edges = _check_edges(edges_or_bins)
        agreed.signature = {"the bins": D.fingerprint(edges_or_bins if edges is None else edges, bounds),
                            "smooth": D.fingerprint(smooth)}
    if edges is None:
        if bounds is not None:
            lo, hi = bounds
        else:
            lo, hi = D.value_range(t, group, "targets is empty on every process")
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)
    edges = edges.to(t.device)
    n_bins = edges.numel() - 1
    # index = number of inner edges <= t: [e_k, e_{k+1}) -> k; below e_1 -> 0, at or above e_{K-1} -> K-1
    index = torch.bucketize(t, edges[1:-1], right=True)
    counts = torch.bincount(index, minlength=n_bins).to(torch.float64)
    if group is not None:
        counts = D.all_reduce(counts, "sum", group)
        if not bool(counts.sum() > 0):
            raise ValueError("targets is empty on every process")
    if smooth is not None:
        counts = _smooth_counts(counts, smooth)
    centers = 0.5 * (edges[:-1] + edges[1:])
    if drop_empty:
        keep = counts > 0
        centers, counts = centers[keep], counts[keep]
    return centers.to(dtype), (counts / counts.sum()).to(dtype)

