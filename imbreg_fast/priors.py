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
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from . import _validation as V

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
# k-means (scikit-learn's KMeans(init='k-means++', n_init=1, algorithm='lloyd'))
# --------------------------------------------------------------------------------------------------


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[N, d], [M, d] -> [M, N] squared Euclidean distances (clamped at 0)."""
    return (c.pow(2).sum(1, keepdim=True) - 2.0 * c @ x.T + x.pow(2).sum(1)).clamp_min_(0.0)


def _kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: indices [k] of the chosen rows of x [N, d].

    Center 0 is a uniformly drawn row; each further center is the best (lowest potential sum_n min_c
    |x_n - c|^2) of ``2 + int(log k)`` rows drawn with probability proportional to the current squared
    distance to the nearest center (Arthur & Vassilvitskii; scikit-learn's ``_kmeans_plusplus``).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    indices = torch.empty(k, dtype=torch.long)
    indices[0] = int(torch.randint(n, (1,), generator=gen))
    closest = _sq_dist(x, x[indices[0]].reshape(1, -1))[0]                 # [N]
    pot = closest.sum()
    for c in range(1, k):
        draws = torch.rand(trials, generator=gen, dtype=x.dtype).to(x.device) * pot
        cand = torch.searchsorted(torch.cumsum(closest, 0), draws).clamp_max_(n - 1)   # [T]
        dist = torch.minimum(closest, _sq_dist(x, x[cand]))                # [T, N]
        cand_pot = dist.sum(1)
        best = int(torch.argmin(cand_pot))
        pot, closest = cand_pot[best], dist[best]
        indices[c] = int(cand[best])
    return indices.to(x.device)


def _assign(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Nearest center of each row (ties -> lowest index): [N]."""
    return torch.argmin(_sq_dist(x, centers), dim=0)


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from ``centers`` [K, d]; (centers, labels).

    Stops when the labels do not change, or when sum_k |c_k' - c_k|^2 <= tol. A cluster left empty takes the
    row farthest from its current center (scikit-learn's relocation rule). Sums use a one-hot matmul, so
    the result does not depend on atomics or thread count.
    """
    k = centers.shape[0]
    labels_old = None
    strict = False
    for _ in range(max_iter):
        labels = _assign(x, centers)
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)       # [N, K]
        sums, counts = onehot.T @ x, onehot.sum(0)                         # [K, d], [K]
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() > 0:
            dist = (x - centers[labels]).pow(2).sum(1)
            far = torch.topk(dist, empty.numel()).indices
            for new_id, row in zip(empty.tolist(), far.tolist()):
                old_id = int(labels[row])
                sums[old_id] -= x[row]
                counts[old_id] -= 1
                sums[new_id] = x[row]
                counts[new_id] = 1
        new_centers = sums / counts.clamp_min(1).unsqueeze(1)
        shift = float((new_centers - centers).pow(2).sum())
        centers = new_centers
        if labels_old is not None and torch.equal(labels, labels_old):
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
           seed=0):
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

    Returns:
        ``(centers [K, d] float64, labels [N] int64)`` on ``x``'s device.
    """
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
    _check_distinct(x, k, "n_clusters")
    return _kmeans(x, k, V.check_int("max_iter", max_iter, 1), V.check_nonnegative("tol", tol), _generator(seed),
                   init)


def _kmeans(x: torch.Tensor, k: int, max_iter: int, tol: float, gen: torch.Generator, init=None):
    mean = x.mean(0)
    xc = x - mean                                       # centred for accurate |c|^2 - 2 x.c distances
    tol = float(xc.pow(2).mean(0).mean()) * tol         # mean per-feature (population) variance * tol
    start = xc[_kmeans_plusplus(xc, k, gen)] if init is None else init - mean
    centers, labels = _lloyd(xc, start, max_iter, tol)
    return centers + mean, labels


def _check_distinct(x: torch.Tensor, k: int, name: str) -> None:
    if x.shape[0] < k:
        raise ValueError(f"{name}={k} needs at least {k} samples, got {x.shape[0]}")
    distinct = torch.unique(x, dim=0).shape[0]
    if distinct < k:
        raise ValueError(f"{name}={k} is more than the number of distinct samples ({distinct}); "
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


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float):
    """(unnormalised weights nk [K], means [K, d], covariances [K, d, d]) from responsibilities resp [N, K].

    nk = sum_n r_nk + 10 eps;  mu_k = sum_n r_nk x_n / nk;
    Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / nk + reg_covar I.
    """
    nk = resp.sum(0) + 10.0 * torch.finfo(resp.dtype).eps
    means = (resp.T @ x) / nk.unsqueeze(1)
    diff = x.unsqueeze(0) - means.unsqueeze(1)                                   # [K, N, d]
    cov = (resp.T.unsqueeze(2) * diff).transpose(1, 2) @ diff / nk.reshape(-1, 1, 1)
    cov = 0.5 * (cov + cov.transpose(1, 2))
    cov = cov + reg_covar * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return nk, means, cov


def _initial_params(x: torch.Tensor, k: int, init, reg_covar: float, gen: torch.Generator):
    """(weights, means, covariances) before the first E-step, as scikit-learn's ``_initialize_parameters``."""
    n = x.shape[0]
    if not isinstance(init, str):
        return init
    if init == "kmeans":
        _, labels = _kmeans(x, k, 300, 1e-4, gen)
        resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    elif init == "k-means++":
        mean = x.mean(0)
        resp = x.new_zeros(n, k)
        resp[_kmeans_plusplus(x - mean, k, gen), torch.arange(k, device=x.device)] = 1.0
    elif init == "random":
        resp = torch.rand(n, k, generator=gen, dtype=x.dtype).to(x.device)
        resp = resp / resp.sum(1, keepdim=True)
    else:  # random_from_data
        resp = x.new_zeros(n, k)
        resp[torch.randperm(n, generator=gen)[:k].to(x.device), torch.arange(k, device=x.device)] = 1.0
    nk, means, cov = _m_step(x, resp, reg_covar)
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
            dtype: torch.dtype = torch.float64) -> GMM:
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

    Returns:
        :class:`GMM` ``(weights [K], means [K, d], covariances [K, d, d])`` on ``targets``' device.

    Memory: O(N K d) per iteration (responsibilities and centred samples).
    """
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
            raise ValueError(f"init must be one of {_INITS} or a (weights, means, covariances) tuple, got {init!r}")
    else:
        init = _check_init_params(init, k, x.shape[1], x)
    if x.shape[0] < 2:
        raise ValueError(f"targets must have at least 2 samples, got {x.shape[0]}")
    _check_distinct(x, k, "n_components")
    gen = _generator(seed)

    best, best_lb, best_converged = None, -math.inf, False
    for _ in range(n_init):
        weights, means, cov = _initial_params(x, k, init, reg_covar, gen)
        chol = _cholesky(cov)
        lower_bound, converged = -math.inf, False
        for _ in range(max_iter):
            prev = lower_bound
            # E-step: log r_nk = log phi_k + log N(x_n; mu_k, Sigma_k) - log p(x_n)
            weighted = torch.log(weights) + _gaussian_log_prob(x, means, chol)     # [N, K]
            log_norm = torch.logsumexp(weighted, dim=1)
            resp = torch.exp(weighted - log_norm.unsqueeze(1))
            # M-step
            nk, means, cov = _m_step(x, resp, reg_covar)
            weights = nk / nk.sum()
            chol = _cholesky(cov)
            lower_bound = float(log_norm.mean())
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


def bin_prior(targets: torch.Tensor, edges_or_bins, *, range=None, smooth=None, drop_empty: bool = True,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram prior of the training labels for BNI: ``(bin_centers [K], bin_weights [K])``.

    ``bin_weights[k] = count_k / sum_j count_j`` over the bins, bins with zero weight dropped (docs/methods.md
    §1.3), ``bin_centers[k]`` the midpoint of bin k's edges. Bin k is ``[e_k, e_{k+1})``, the last bin
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
        drop_empty: drop bins with zero (smoothed) count. ``False`` keeps every bin, for inspection only: the
            BNI loss needs weights > 0.
        dtype: floating dtype of the results (counting is exact; results are computed in float64).

    Returns:
        ``(bin_centers [K], bin_weights [K])`` on ``targets``' device.
    """
    t = V.check_real_tensor("targets", targets).detach().reshape(-1).to(torch.float64)
    if t.numel() == 0:
        raise ValueError("targets is empty")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("targets contains NaN or inf")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(edges_or_bins, bool):
        raise TypeError("edges_or_bins must be an int (number of bins) or a 1-D tensor of bin edges, got bool")
    if isinstance(edges_or_bins, int):
        n_bins = V.check_int("edges_or_bins", edges_or_bins, 1)
        if range is None:
            lo, hi = float(t.min()), float(t.max())
        else:
            try:
                lo, hi = (float(v) for v in range)
            except (TypeError, ValueError):
                raise TypeError(f"range must be None or (lo, hi), got {range!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ValueError(f"range must be finite with lo <= hi, got {range!r}")
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)
    else:
        if range is not None:
            raise ValueError("range is only used with an int number of bins; the edges already fix the range")
        edges = _check_edges(edges_or_bins)
    edges = edges.to(t.device)
    n_bins = edges.numel() - 1
    # index = number of inner edges <= t: [e_k, e_{k+1}) -> k; below e_1 -> 0, at or above e_{K-1} -> K-1
    index = torch.bucketize(t, edges[1:-1], right=True)
    counts = torch.bincount(index, minlength=n_bins).to(torch.float64)
    if smooth is not None:
        counts = _smooth_counts(counts, smooth)
    centers = 0.5 * (edges[:-1] + edges[1:])
    if drop_empty:
        keep = counts > 0
        centers, counts = centers[keep], counts[keep]
    return centers.to(dtype), (counts / counts.sum()).to(dtype)

