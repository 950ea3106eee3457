"""Label priors: imbreg_fast.fit_gmm / kmeans (GAI) and imbreg_fast.bin_prior (BNI).

References here are independent: numpy/scipy EM and Lloyd loops written from the algorithm's definition
(scikit-learn's GaussianMixture / KMeans), a plain-loop histogram, numpy.histogram, scipy densities, and
scikit-learn itself when it is installed.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import imbreg_fast
from imbreg_fast import bin_prior, fit_gmm
from imbreg_fast.priors import GMM, ConvergenceWarning, kmeans

# --------------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------------


def naive_em(x, weights, means, covs, *, tol, reg_covar, max_iter):
    """EM for a full-covariance GMM from given initial parameters, one component at a time (numpy/scipy).

    Returns (weights, means, covs, n_iter, converged)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    k = len(weights)
    w, m, c = np.array(weights, float), np.array(means, float), np.array(covs, float)
    lower_bound, converged, it = -np.inf, False, 0
    for it in range(1, max_iter + 1):
        prev = lower_bound
        logp = np.empty((n, k))
        for j in range(k):
            logp[:, j] = math.log(w[j]) + stats.multivariate_normal(m[j], c[j]).logpdf(x).reshape(n)
        mx = logp.max(1, keepdims=True)
        log_norm = (mx + np.log(np.exp(logp - mx).sum(1, keepdims=True))).ravel()
        resp = np.exp(logp - log_norm[:, None])
        nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
        for j in range(k):
            m[j] = (resp[:, j:j + 1] * x).sum(0) / nk[j]
            diff = x - m[j]
            c[j] = np.einsum("n,ni,nj->ij", resp[:, j], diff, diff) / nk[j] + reg_covar * np.eye(d)
        w = nk / nk.sum()
        lower_bound = log_norm.mean()
        if abs(lower_bound - prev) < tol:
            converged = True
            break
    return w, m, c, it, converged


def naive_lloyd(x, centers, *, max_iter, tol):
    """Lloyd's k-means from given centers with scikit-learn's stopping and empty-cluster rules (loops).

    tol is already scaled by the data variance. Returns (centers, labels)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    centers = np.array(centers, float)
    k = len(centers)
    labels_old = None
    strict = False

    def assign(cs):
        labels = np.empty(n, dtype=int)
        for i in range(n):
            best, best_d = 0, np.inf
            for j in range(k):
                dist = ((x[i] - cs[j]) ** 2).sum()
                if dist < best_d:
                    best, best_d = j, dist
            labels[i] = best
        return labels

    for _ in range(max_iter):
        labels = assign(centers)
        sums = np.zeros_like(centers)
        counts = np.zeros(k)
        for i in range(n):
            sums[labels[i]] += x[i]
            counts[labels[i]] += 1
        empty = [j for j in range(k) if counts[j] == 0]
        if empty:
            dist = np.array([((x[i] - centers[labels[i]]) ** 2).sum() for i in range(n)])
            far = np.argsort(-dist, kind="stable")[:len(empty)]
            for new_id, row in zip(empty, far):
                old_id = labels[row]
                sums[old_id] -= x[row]
                counts[old_id] -= 1
                sums[new_id] = x[row]
                counts[new_id] = 1
        new = np.array([sums[j] / counts[j] for j in range(k)])
        shift = ((new - centers) ** 2).sum()
        centers = new
        if labels_old is not None and (labels == labels_old).all():
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        labels = assign(centers)
    return centers, labels


def naive_histogram(values, edges):
    """Counts per bin [e_k, e_{k+1}) (last bin closed), values outside clamped to the end bins."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        if v < edges[1]:
            k = 0
        elif v >= edges[-2]:
            k = len(counts) - 1
        else:
            k = next(j for j in range(len(counts)) if edges[j] <= v < edges[j + 1])
        counts[k] += 1
    return counts


def _mixture_samples(gen, spec, n):
    """Samples from a mixture spec [(weight, mean [d], cov [d, d])] with exact component counts."""
    parts = []
    for w, mu, cov in spec:
        mu, cov = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
        z = torch.randn(int(round(w * n)), mu.numel(), generator=gen, dtype=torch.float64)
        parts.append(mu + z @ torch.linalg.cholesky(cov).T)
    x = torch.cat(parts)
    return x[torch.randperm(len(x), generator=gen)]


def _sorted_by_mean(gmm: GMM):
    order = torch.argsort(gmm.means[:, 0])
    return gmm.weights[order], gmm.means[order], gmm.covariances[order]


SPEC_1D = [(0.5, [0.0], [[0.25]]), (0.3, [5.0], [[0.09]]), (0.2, [10.0], [[1.0]])]
SPEC_2D = [(0.45, [0.0, 0.0], [[1.0, 0.6], [0.6, 0.8]]),
           (0.35, [6.0, 1.0], [[0.5, -0.2], [-0.2, 0.3]]),
           (0.20, [2.0, 7.0], [[0.3, 0.0], [0.0, 1.2]])]


# --------------------------------------------------------------------------------------------------
# fit_gmm
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SPEC_1D, SPEC_2D], ids=["1d", "2d"])
def test_fit_gmm_recovers_well_separated_mixture(spec):
    gen = torch.Generator().manual_seed(3)
    x = _mixture_samples(gen, spec, 6000)
    if len(spec[0][1]) == 1:
        x = x.reshape(-1)                                   # [N] input for d = 1
    gmm = fit_gmm(x, len(spec))
    d = len(spec[0][1])
    assert gmm.weights.shape == (3,) and gmm.means.shape == (3, d) and gmm.covariances.shape == (3, d, d)
    assert gmm.weights.dtype == torch.float64
    w, m, c = _sorted_by_mean(gmm)
    true = sorted(spec, key=lambda s: s[1][0])
    for j, (tw, tm, tc) in enumerate(true):
        assert abs(float(w[j]) - tw) < 0.02
        assert torch.allclose(m[j], torch.tensor(tm, dtype=torch.float64), atol=0.08)
        assert torch.allclose(c[j], torch.tensor(tc, dtype=torch.float64), atol=0.12, rtol=0.1)
    assert abs(float(gmm.weights.sum()) - 1.0) < 1e-12


def test_fit_gmm_deterministic_with_seed():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(700, generator=gen), torch.rand(300, generator=gen) * 8 + 2])
    a = fit_gmm(x, 8, seed=5)
    b = fit_gmm(x, 8, seed=5)
    c = fit_gmm(x, 8, seed=torch.Generator().manual_seed(5))
    for ta, tb, tc in zip(a, b, c):
        assert torch.equal(ta, tb) and torch.equal(ta, tc)
    for init in ("k-means++", "random", "random_from_data"):
        r1 = fit_gmm(x, 4, init=init, seed=1, max_iter=300)
        r2 = fit_gmm(x, 4, init=init, seed=1, max_iter=300)
        assert all(torch.equal(p, q) for p, q in zip(r1, r2))
    # the global RNG plays no part
    torch.manual_seed(123)
    d = fit_gmm(x, 8, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a, d))


def test_fit_gmm_seed_changes_random_init():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=gen, dtype=torch.float64)
    a = fit_gmm(x, 3, init="random_from_data", seed=0, max_iter=0)
    b = fit_gmm(x, 3, init="random_from_data", seed=1, max_iter=0)
    assert not torch.equal(a.means, b.means)


@pytest.mark.parametrize("d", [1, 2])
def test_fit_gmm_em_matches_naive_em_from_same_init(d):
    rng = np.random.RandomState(d)
    x = np.concatenate([rng.randn(120, d) * 0.6, rng.randn(80, d) * 0.9 + 2.5, rng.gamma(2.0, 1.0, (60, d)) + 1])
    k = 3
    w0 = np.array([0.5, 0.3, 0.2])
    m0 = x[[0, 130, 230]]
    c0 = np.stack([np.cov(x.T).reshape(d, d) * s for s in (1.0, 0.5, 2.0)])
    ref_w, ref_m, ref_c, n_iter, converged = naive_em(x, w0, m0, c0, tol=1e-7, reg_covar=1e-6, max_iter=400)
    assert converged and n_iter > 5
    gmm = fit_gmm(torch.from_numpy(x), k, init=(torch.tensor(w0), torch.tensor(m0), torch.tensor(c0)),
                  tol=1e-7, max_iter=400)
    np.testing.assert_allclose(gmm.weights.numpy(), ref_w, rtol=0, atol=1e-9)
    np.testing.assert_allclose(gmm.means.numpy(), ref_m, rtol=0, atol=1e-9)
    np.testing.assert_allclose(gmm.covariances.numpy(), ref_c, rtol=0, atol=1e-9)
    # stopping rule: with max_iter = the reference's iteration count - 1 EM has not converged yet
    with pytest.warns(ConvergenceWarning):
        early = fit_gmm(torch.from_numpy(x), k, init=(torch.tensor(w0), torch.tensor(m0), torch.tensor(c0)),
                        tol=1e-7, max_iter=n_iter - 1)
    assert not np.allclose(early.means.numpy(), ref_m, rtol=0, atol=1e-12)


def test_fit_gmm_max_iter_zero_returns_kmeans_init():
    gen = torch.Generator().manual_seed(0)
    x = _mixture_samples(gen, SPEC_1D, 600)
    gmm = fit_gmm(x, 3, max_iter=0, seed=2)
    centers, labels = kmeans(x, 3, seed=2)
    for j in range(3):
        members = x[labels == j, 0]
        assert abs(float(gmm.weights[j]) - members.numel() / 600) < 1e-12
        assert abs(float(gmm.means[j, 0]) - float(members.mean())) < 1e-10
        assert abs(float(gmm.covariances[j, 0, 0]) - (float(members.var(unbiased=False)) + 1e-6)) < 1e-10
        assert abs(float(centers[j, 0]) - float(members.mean())) < 1e-10


def test_fit_gmm_n_init_keeps_best():
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(400, generator=gen), torch.randn(400, generator=gen) * 2 + 4,
                   torch.rand(200, generator=gen) * 12 - 3])
    one = fit_gmm(x, 6, init="random", seed=0, max_iter=300)
    three = fit_gmm(x, 6, init="random", n_init=3, seed=0, max_iter=300)
    assert float(three.log_prob(x).mean()) >= float(one.log_prob(x).mean()) - 1e-3


def test_fit_gmm_dtypes_devices_and_loss_integration():
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(300, generator=gen), torch.randn(100, generator=gen) + 5]).float()
    g64 = fit_gmm(y, 2)
    assert all(t.dtype == torch.float64 and t.device == y.device for t in g64)
    g32 = fit_gmm(y, 2, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in g32)
    assert all(torch.equal(a.float(), b) for a, b in zip(g64, g32))
    ages = torch.randint(0, 100, (500,), generator=gen)
    assert fit_gmm(ages, 4).means.dtype == torch.float64
    pred = (y + 0.3 * torch.randn(400, generator=gen)).requires_grad_()
    loss = imbreg_fast.functional.gai_loss(pred, y, 0.5, g64, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    module = imbreg_fast.nn.GAILoss(g32, backend="torch")
    assert torch.isfinite(module(pred.detach(), y))


@pytest.mark.parametrize("d", [1, 2])
def test_gmm_log_prob_matches_scipy(d):
    gen = torch.Generator().manual_seed(d)
    spec = SPEC_1D if d == 1 else SPEC_2D
    x = _mixture_samples(gen, spec, 300)
    gmm = fit_gmm(x, 3)
    ref = np.zeros(len(x))
    for w, m, c in zip(gmm.weights.numpy(), gmm.means.numpy(), gmm.covariances.numpy()):
        ref += w * stats.multivariate_normal(m, c).pdf(x.numpy())
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), np.log(ref), rtol=1e-10, atol=1e-10)


def test_fit_gmm_errors():
    x = torch.randn(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_components"):
        fit_gmm(x, 0)
    with pytest.raises(TypeError, match="n_components"):
        fit_gmm(x, 2.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_gmm(torch.tensor([0.0, 1.0, float("nan"), 3.0]), 2)
    with pytest.raises(ValueError, match="inf"):
        fit_gmm(torch.tensor([0.0, 1.0, float("inf"), 3.0]), 2)
    with pytest.raises(ValueError, match="distinct"):
        fit_gmm(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0]), 3)
    with pytest.raises(ValueError, match="distinct"):
        fit_gmm(torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]), 3)
    with pytest.raises(ValueError, match="samples"):
        fit_gmm(torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_gmm(torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, d\]"):
        fit_gmm(torch.randn(4, 2, 2), 1)
    with pytest.raises(TypeError, match="targets"):
        fit_gmm(np.zeros(5), 1)
    with pytest.raises(TypeError, match="targets"):
        fit_gmm(torch.zeros(5, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="init"):
        fit_gmm(x, 2, init="spectral")
    with pytest.raises(ValueError, match="tol"):
        fit_gmm(x, 2, tol=-1.0)
    with pytest.raises(ValueError, match="reg_covar"):
        fit_gmm(x, 2, reg_covar=float("nan"))
    with pytest.raises(ValueError, match="n_init"):
        fit_gmm(x, 2, n_init=0)
    with pytest.raises(ValueError, match="init means"):
        fit_gmm(x, 2, init=(torch.ones(2) / 2, torch.zeros(3), torch.ones(2)))
    with pytest.raises(TypeError, match="dtype"):
        fit_gmm(x, 2, dtype=torch.int64)


def test_fit_gmm_collapsed_component_raises():
    # three distinct values but one a singleton: without reg_covar its covariance is exactly 0
    x = torch.tensor([0.0] * 50 + [1.0] * 50 + [2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive definite"):
        fit_gmm(x, 3, reg_covar=0.0)
    gmm = fit_gmm(x, 3)                                  # the default reg_covar keeps it well defined
    assert torch.isfinite(gmm.covariances).all()


def test_fit_gmm_warns_when_not_converged():
    x = torch.randn(200, generator=torch.Generator().manual_seed(0))
    with pytest.warns(ConvergenceWarning):
        fit_gmm(x, 4, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_gmm(x, 4, max_iter=0)


# --------------------------------------------------------------------------------------------------
# kmeans
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3])
def test_kmeans_matches_naive_lloyd_from_same_centers(d):
    rng = np.random.RandomState(10 + d)
    x = np.concatenate([rng.randn(60, d), rng.randn(50, d) * 0.7 + 3, rng.rand(40, d) * 6 - 2])
    init = x[[0, 1, 2, 70]]                      # poor start: three centers in one cluster
    tol = 1e-4 * x.var(0).mean()
    ref_c, ref_l = naive_lloyd(x, init, max_iter=300, tol=tol)
    c, l = kmeans(torch.from_numpy(x), 4, init=torch.from_numpy(init))
    np.testing.assert_array_equal(l.numpy(), ref_l)
    np.testing.assert_allclose(c.numpy(), ref_c, rtol=0, atol=1e-10)


def test_kmeans_relocates_empty_cluster():
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.randn(40, 1), rng.randn(40, 1) + 6])
    init = np.array([[0.0], [6.0], [100.0]])     # the third center attracts no sample
    ref_c, ref_l = naive_lloyd(x, init, max_iter=300, tol=1e-4 * x.var())
    c, l = kmeans(torch.from_numpy(x), 3, init=torch.from_numpy(init))
    assert len(set(l.tolist())) == 3
    np.testing.assert_array_equal(l.numpy(), ref_l)
    np.testing.assert_allclose(c.numpy(), ref_c, rtol=0, atol=1e-10)


def test_kmeans_plusplus_finds_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 20.0]], dtype=torch.float64)
    x = (true.repeat_interleave(80, 0) + 0.5 * torch.randn(400, 2, generator=gen, dtype=torch.float64))
    for seed in range(5):
        c, l = kmeans(x, 5, seed=seed)
        dist = torch.cdist(true, c)
        assert (dist.min(1).values < 0.3).all()                          # every true center found once
        assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3, 4]
        for j in range(5):                                                # Lloyd fixed point
            assert torch.allclose(c[j], x[l == j].mean(0), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# agreement with scikit-learn (when installed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, seed", [(1, 3), (2, 1)])
def test_fit_gmm_matches_sklearn_same_init(d, seed):
    mixture = pytest.importorskip("sklearn.mixture")
    rng = np.random.RandomState(seed)
    x = np.concatenate([rng.randn(250, d) * 0.5, rng.randn(200, d) * 0.8 + 3, rng.gamma(2, 1, (150, d)) + 1])
    k = 3
    w0 = np.full(k, 1 / k)
    m0 = x[[0, 300, 500]]
    c0 = np.stack([np.cov(x.T).reshape(d, d)] * k)
    sk = mixture.GaussianMixture(k, weights_init=w0, means_init=m0, precisions_init=np.linalg.inv(c0),
                                 tol=1e-6, max_iter=200).fit(x)
    assert sk.converged_
    ours = fit_gmm(torch.from_numpy(x), k, init=(torch.tensor(w0), torch.tensor(m0), torch.tensor(c0)),
                   tol=1e-6, max_iter=200)
    np.testing.assert_allclose(ours.weights.numpy(), sk.weights_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.means.numpy(), sk.means_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.covariances.numpy(), sk.covariances_, rtol=0, atol=1e-9)


def test_kmeans_matches_sklearn_same_init():
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.RandomState(7)
    x = np.concatenate([rng.randn(200, 2), rng.randn(150, 2) * 0.7 + 3, rng.rand(100, 2) * 6 - 2])
    init = x[[0, 1, 2, 300, 420]]
    km = cluster.KMeans(5, init=init, n_init=1).fit(x)
    c, l = kmeans(torch.from_numpy(x), 5, init=torch.from_numpy(init))
    np.testing.assert_array_equal(l.numpy(), km.labels_)
    np.testing.assert_allclose(c.numpy(), km.cluster_centers_, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spec", [SPEC_1D, SPEC_2D], ids=["1d", "2d"])
def test_fit_gmm_default_matches_sklearn_loglik(spec):
    mixture = pytest.importorskip("sklearn.mixture")
    x = _mixture_samples(torch.Generator().manual_seed(11), spec, 3000)
    sk = mixture.GaussianMixture(len(spec), random_state=0).fit(x.numpy())
    ours = fit_gmm(x, len(spec))
    assert abs(float(ours.log_prob(x).mean()) - sk.score(x.numpy())) < 1e-3
    order = np.argsort(sk.means_[:, 0])
    np.testing.assert_allclose(_sorted_by_mean(ours)[1].numpy(), sk.means_[order], atol=5e-3)


# --------------------------------------------------------------------------------------------------
# bin_prior
# --------------------------------------------------------------------------------------------------


def test_bin_prior_matches_naive_histogram_with_edges():
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0, 2.1, 3.0, 7.0])
    y = torch.cat([torch.randn(500, generator=gen) * 2,                       # includes out-of-range values
                   edges, torch.tensor([-50.0, 50.0, 2.05, 2.05])])
    counts = naive_histogram(y.tolist(), edges.tolist())
    assert counts[0] > 0 and counts[-1] > 0
    centers, weights = bin_prior(y, edges, drop_empty=True)
    ref_centers = [(a + b) / 2 for a, b, n in zip(edges[:-1].tolist(), edges[1:].tolist(), counts) if n > 0]
    ref_weights = [n / sum(counts) for n in counts if n > 0]
    np.testing.assert_allclose(centers.numpy(), ref_centers, rtol=0, atol=1e-12)
    np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=0, atol=1e-15)
    assert centers.dtype == torch.float64 and weights.dtype == torch.float64


def test_bin_prior_drops_empty_bins():
    y = torch.tensor([0.1, 0.2, 0.3, 3.5, 3.6, 9.9, 10.0])
    centers, weights = bin_prior(y, torch.arange(0.0, 11.0), drop_empty=True)
    counts = naive_histogram(y.tolist(), list(range(11)))
    assert counts.count(0) == 7
    np.testing.assert_allclose(centers.numpy(), [0.5, 3.5, 9.5])
    np.testing.assert_allclose(weights.numpy(), [3 / 7, 2 / 7, 2 / 7])
    c_all, w_all = bin_prior(y, torch.arange(0.0, 11.0))   # the default keeps empty bins
    assert c_all.shape == (10,) and (w_all == 0).sum() == 7
    np.testing.assert_allclose(w_all.numpy(), np.array(counts) / 7)


def test_bin_prior_int_bins_matches_numpy_histogram():
    gen = torch.Generator().manual_seed(1)
    y = torch.rand(1000, generator=gen, dtype=torch.float64) ** 2 * 7 + 1
    for bins, rng in ((13, None), (20, (0.0, 10.0)), (1, None)):
        c, w = bin_prior(y, bins, range=rng, drop_empty=False)
        ref_counts, ref_edges = np.histogram(y.numpy(), bins=bins, range=rng)
        np.testing.assert_allclose(w.numpy(), ref_counts / ref_counts.sum(), rtol=0, atol=1e-15)
        np.testing.assert_allclose(c.numpy(), (ref_edges[1:] + ref_edges[:-1]) / 2, rtol=0, atol=1e-12)


def test_bin_prior_int_bins_clamps_to_range_and_degenerate_range():
    y = torch.tensor([-3.0, 0.0, 0.5, 1.0, 4.0])
    c, w = bin_prior(y, 2, range=(0.0, 1.0))
    ref = naive_histogram(y.tolist(), [0.0, 0.5, 1.0])
    assert ref == [2, 3]
    np.testing.assert_allclose(c.numpy(), [0.25, 0.75])
    np.testing.assert_allclose(w.numpy(), [0.4, 0.6])
    c, w = bin_prior(torch.full((4,), 2.0), 4, drop_empty=True)   # all equal: range (1.5, 2.5) as numpy
    ref_counts, ref_edges = np.histogram(np.full(4, 2.0), bins=4)
    kept = ref_counts > 0
    np.testing.assert_allclose(c.numpy(), ((ref_edges[1:] + ref_edges[:-1]) / 2)[kept])
    np.testing.assert_allclose(w.numpy(), [1.0])


def test_bin_prior_integer_labels_and_bni_integration():
    gen = torch.Generator().manual_seed(2)
    ages = torch.randint(0, 80, (400,), generator=gen)
    c, w = bin_prior(ages, torch.arange(-0.5, 81.0), dtype=torch.float32, drop_empty=True)
    assert c.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.equal(c, torch.unique(ages).float())                       # centers are the integer labels
    counts = torch.bincount(ages)
    assert torch.allclose(w, (counts[counts > 0] / 400.0).float())
    y = ages.float()
    pred = (y + torch.randn(400, generator=gen)).requires_grad_()
    loss = imbreg_fast.functional.bni_loss(pred, y, 4.0, c, w, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert torch.isfinite(imbreg_fast.nn.BNILoss(c, w, backend="torch")(pred.detach(), y))


def test_bin_prior_errors():
    y = torch.randn(20)
    with pytest.raises(ValueError, match="NaN"):
        bin_prior(torch.tensor([0.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="empty"):
        bin_prior(torch.zeros(0), 4)
    with pytest.raises(ValueError, match="edges_or_bins"):
        bin_prior(y, 0)
    with pytest.raises(ValueError, match="increasing"):
        bin_prior(y, torch.tensor([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        bin_prior(y, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        bin_prior(y, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        bin_prior(y, torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="range"):
        bin_prior(y, torch.tensor([0.0, 1.0]), range=(0, 1))
    with pytest.raises(ValueError, match="range"):
        bin_prior(y, 4, range=(2.0, 1.0))
    with pytest.raises(TypeError, match="edges_or_bins"):
        bin_prior(y, True)
    with pytest.raises(TypeError, match="targets"):
        bin_prior([0.0, 1.0], 2)


def _reference_lds_window(kind, ks, sigma):
    """The reference's get_lds_kernel_window, max-normalised (scipy)."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal.windows import triang

    half = (ks - 1) // 2
    if kind == "gaussian":
        delta = np.zeros(ks)
        delta[half] = 1.0
        w = gaussian_filter1d(delta, sigma)
    elif kind == "triang":
        w = triang(ks)
    else:
        w = np.exp(-np.abs(np.arange(-half, half + 1)) / sigma)
    return w / w.max()


@pytest.mark.parametrize("kind, ks, sigma, mode", [("gaussian", 5, 2.0, None), ("triang", 5, 1.0, None),
                                                   ("laplace", 3, 1.5, "reflect")])
def test_bin_prior_lds_smoothing_matches_scipy(kind, ks, sigma, mode):
    pytest.importorskip("imbreg_fast.lds")
    from scipy.ndimage import convolve1d

    gen = torch.Generator().manual_seed(5)
    y = torch.cat([torch.randn(300, generator=gen) + 3, torch.tensor([9.2, 9.3])])   # gap of empty bins
    edges = torch.arange(-1.0, 12.5, 0.5)
    counts = np.array(naive_histogram(y.tolist(), edges.tolist()), dtype=np.float64)
    smoothed = convolve1d(counts, _reference_lds_window(kind, ks, sigma), mode=mode or "constant")
    keep = smoothed > 0
    assert keep.sum() > (counts > 0).sum()                       # smoothing spreads mass into empty bins
    assert not keep.all()                                         # ... but not into all of them
    smooth = (kind, ks, sigma) if mode is None else (kind, ks, sigma, mode)
    c, w = bin_prior(y, edges, smooth=smooth, drop_empty=True)
    ref_c = ((edges[1:] + edges[:-1]) / 2).double().numpy()[keep]
    np.testing.assert_allclose(c.numpy(), ref_c, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.numpy(), smoothed[keep] / smoothed[keep].sum(), rtol=1e-12, atol=1e-15)


def test_bin_prior_bad_smooth():
    pytest.importorskip("imbreg_fast.lds")
    with pytest.raises(TypeError, match="smooth"):
        bin_prior(torch.randn(10), 4, smooth="gaussian")
    with pytest.raises(ValueError, match="kind"):
        bin_prior(torch.randn(10), 4, smooth=("box", 5, 1.0))


# --------------------------------------------------------------------------------------------------
# shot metrics of a 1-D task (the priors' users are evaluated with them)
# --------------------------------------------------------------------------------------------------


def test_shot_metrics_matches_naive_loop():
    from imbreg_fast.metrics import shot_metrics

    gen = torch.Generator().manual_seed(0)
    train = torch.randn(3000, generator=gen, dtype=torch.float64) + 5
    target = torch.rand(500, generator=gen, dtype=torch.float64) * 10
    pred = target + 0.5 * torch.randn(500, generator=gen, dtype=torch.float64)
    edges = torch.linspace(0, 10, 21, dtype=torch.float64)
    counts = naive_histogram(train.tolist(), edges.tolist())
    groups = {"all": [], "many": [], "medium": [], "few": []}
    for p, t in zip(pred.tolist(), target.tolist()):
        n = counts[naive_histogram([t], edges.tolist()).index(1)]
        groups["all"].append(p - t)
        groups["many" if n > 100 else "few" if n < 20 else "medium"].append(p - t)
    out = shot_metrics(pred, target, train, edges)
    for name, errs in groups.items():
        assert out[f"{name}/count"].item() == len(errs) > 0
        assert out[f"{name}/mse"].item() == pytest.approx(sum(e * e for e in errs) / len(errs), rel=1e-12)
        assert out[f"{name}/mae"].item() == pytest.approx(sum(abs(e) for e in errs) / len(errs), rel=1e-12)
    empty = shot_metrics(pred, target, train, edges, many=10 ** 6)
    assert empty["many/count"].item() == 0
    assert math.isnan(empty["many/mse"].item()) and math.isnan(empty["many/mae"].item())
