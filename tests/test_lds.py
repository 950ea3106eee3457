"""LDS windows, smoothing, histograms and label-density weights (imbreg_fast.lds) against independent
references: scipy.ndimage.gaussian_filter1d / convolve1d, scipy.signal.windows.triang, and the reference's
``_prepare_weights`` / ``_get_bucket_weights`` (YyzHarry/imbalanced-regression) rewritten here with numpy
loops."""
import math
import time

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d, gaussian_filter1d
from scipy.signal.windows import triang

from imbreg_fast import lds
from imbreg_fast.lds import LabelWeights, kernel_window, label_density, sample_weights, smooth_counts


# --------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------


def ref_window(kind, ks, sigma, normalize="max"):
    half = (ks - 1) // 2
    if kind == "gaussian":
        delta = [0.0] * half + [1.0] + [0.0] * half
        w = gaussian_filter1d(delta, sigma=sigma)
    elif kind == "sampled_gaussian":
        w = np.array([math.exp(-x * x / (2 * sigma * sigma)) for x in range(-half, half + 1)])
    elif kind == "triang":
        w = triang(ks)
    else:  # the reference's laplace: exp(-|x|/sigma) / (2 sigma)
        w = np.array([math.exp(-abs(x) / sigma) / (2.0 * sigma) for x in range(-half, half + 1)])
    w = np.asarray(w, dtype=np.float64)
    return w / (w.max() if normalize == "max" else w.sum())


def ref_prepare_weights(labels, reweight, max_target, lds_on, kernel, ks, sigma):
    """The reference's AgeDB/IMDB-WIKI ``_prepare_weights`` (float64 instead of its float32 cast)."""
    value = {x: 0 for x in range(max_target)}
    for label in labels:
        value[min(max_target - 1, int(label))] += 1
    if reweight == "sqrt_inv":
        value = {k: np.sqrt(v) for k, v in value.items()}
    elif reweight == "inverse":
        value = {k: np.clip(v, 5, 1000) for k, v in value.items()}
    num_per_label = [value[min(max_target - 1, int(label))] for label in labels]
    if reweight == "none":
        return [1.0] * len(labels)
    if lds_on:
        window = ref_window(kernel, ks, sigma)
        smoothed = convolve1d(np.asarray([v for _, v in value.items()], dtype=np.float64), weights=window,
                              mode="constant")
        num_per_label = [smoothed[min(max_target - 1, int(label))] for label in labels]
    weights = [1.0 / x for x in num_per_label]
    scaling = len(weights) / np.sum(weights)
    return [scaling * x for x in weights]


def ref_bucket_weights(counts, reweight, window, mode):
    """The reference's NYUD2 ``_get_bucket_weights`` with LDS (bucket_start = 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    value = np.sqrt(counts) if reweight == "sqrt_inv" else counts
    smoothed = convolve1d(value, weights=window, mode=mode)
    scaling = np.sum(counts) / np.sum(counts / smoothed)
    return [scaling / smoothed[b] for b in range(len(counts))]


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


def test_gaussian_window_documented_values():
    w = kernel_window("gaussian", 5, 2.0)
    assert w.dtype == torch.float64 and w.shape == (5,)
    np.testing.assert_allclose(w.numpy(), [0.858, 0.946, 1.0, 0.946, 0.858], atol=5e-4)
    # not the sampled Gaussian
    assert abs(float(w[0]) - math.exp(-4.0 / 8.0)) > 0.2


@pytest.mark.parametrize("kind", lds.KERNELS)
@pytest.mark.parametrize("ks", [1, 3, 5, 7, 9, 15, 31])
@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 2.0, 3.7, 10.0])
@pytest.mark.parametrize("normalize", ["max", "sum"])
def test_window_matches_scipy(kind, ks, sigma, normalize):
    got = kernel_window(kind, ks, sigma, normalize=normalize).numpy()
    np.testing.assert_allclose(got, ref_window(kind, ks, sigma, normalize), rtol=1e-13, atol=1e-15)


def loop_gaussian_window(ks, sigma, normalize="max"):
    """gaussian_filter1d(delta, sigma) with plain Python loops: pad the centred delta by r on each side with
    scipy's 'reflect' rule (d c b a | a b c d | d c b a), then out[i] = sum_k g_k padded[i + k]."""
    r = int(4.0 * sigma + 0.5)
    g = [math.exp(-0.5 / (sigma * sigma) * k * k) for k in range(-r, r + 1)]
    centre = ks // 2
    ones = []                                  # positions p in [-r, ks - 1 + r] where the padded delta is 1
    for p in range(-r, ks + r):
        j = p % (2 * ks)
        if j >= ks:
            j = 2 * ks - 1 - j
        if j == centre:
            ones.append(p)
    out = [math.fsum(g[p - i + r] for p in ones if abs(p - i) <= r) for i in range(ks)]
    total = max(out) if normalize == "max" else math.fsum(out)
    return np.array([v / total for v in out])


# below 1024 every sigma sums the taps directly; above, sigma > 16 ks uses the closed form
SCIPY_GRID_SIGMAS = [1e-3, 0.5, 1.0, 2.0, 3.7, 10.0, 100.0, 1e3, 1500.0, 5000.0]


@pytest.mark.parametrize("ks", [1, 3, 5, 7, 11, 31])
@pytest.mark.parametrize("sigma", SCIPY_GRID_SIGMAS)
@pytest.mark.parametrize("normalize", ["max", "sum"])
def test_gaussian_window_matches_scipy_grid(ks, sigma, normalize):
    got = kernel_window("gaussian", ks, sigma, normalize=normalize).numpy()
    np.testing.assert_allclose(got, ref_window("gaussian", ks, sigma, normalize), rtol=1e-12, atol=0)


@pytest.mark.parametrize("ks, sigma", [
    # the switch r = int(4 sigma + 0.5) <= max(4096, 64 ks): r = 4095, 4096 (direct) | 4097 (closed form)
    (1, 1023.8), (3, 1023.8), (3, 1024.0), (3, 1024.2), (31, 1024.0), (31, 1024.2),
    # 64 ks = 6464 for ks 101, 128064 for ks 2001: r = 64 ks (direct) | 64 ks + 1 (closed form)
    (101, 1615.9), (101, 1616.2), (2001, 32015.9), (2001, 32016.2),
    # well inside the closed form
    (1, 2e4), (3, 2e4), (7, 2e4), (31, 2e4), (101, 2e4), (5, 1e5),
])
@pytest.mark.parametrize("normalize", ["max", "sum"])
def test_gaussian_window_matches_loop_reference(ks, sigma, normalize):
    got = kernel_window("gaussian", ks, sigma, normalize=normalize).numpy()
    np.testing.assert_allclose(got, loop_gaussian_window(ks, sigma, normalize), rtol=1e-12, atol=0)


def test_gaussian_window_edge_sizes():
    for sigma in [1e-3, 1.0, 1e3, 1e6, 1e12, 1e300]:
        assert kernel_window("gaussian", 1, sigma).tolist() == [1.0]
        assert kernel_window("gaussian", 1, sigma, normalize="sum").tolist() == [1.0]
    for sigma in [1e-300, 1e-3, 0.12]:                     # r = 0: a delta
        assert kernel_window("gaussian", 7, sigma).tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    big = 10001
    for sigma in [3.0, 100.0]:
        got = kernel_window("gaussian", big, sigma).numpy()
        np.testing.assert_allclose(got, ref_window("gaussian", big, sigma), rtol=1e-12, atol=0)
    for sigma in [1e5, 1e6, 1e300]:                       # direct (r <= 64 ks), closed form, huge sigma
        w = kernel_window("gaussian", big, sigma, normalize="sum")
        assert w.shape == (big,) and bool(torch.isfinite(w).all())
        assert torch.equal(w, w.flip(0))
        assert abs(float(w.sum()) - 1.0) < 1e-12
        assert float((w * big - 1.0).abs().max()) < 1e-4   # uniform up to the truncated tails when sigma >> ks


class _LargestTensor(torch.overrides.TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch call returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("sigma", [1e6, 1e12])
def test_gaussian_window_cost_independent_of_sigma(sigma):
    # was a [ks, 2r + 1] table, r = 4 sigma: 1.4 s and 1.4 GB at sigma = 1e6
    for ks in (5, 31):
        with _LargestTensor() as largest:
            kernel_window("gaussian", ks, sigma)
        assert largest.numel <= 64 * ks
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            w = kernel_window("gaussian", ks, sigma)
            best = min(best, time.perf_counter() - start)
        assert best < 0.5
        assert torch.equal(w, w.flip(0)) and float(w.max()) == 1.0 and float(w.min()) > 1.0 - 1e-8


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(kind="gaussian", ks=4, sigma=1.0), ValueError, "ks"),
    (dict(kind="gaussian", ks=0, sigma=1.0), ValueError, "ks"),
    (dict(kind="gaussian", ks=-3, sigma=1.0), ValueError, "ks"),
    (dict(kind="gaussian", ks=5.0, sigma=1.0), TypeError, "ks"),
    (dict(kind="gaussian", ks=5, sigma=0.0), ValueError, "sigma"),
    (dict(kind="laplace", ks=5, sigma=-1.0), ValueError, "sigma"),
    (dict(kind="laplace", ks=5, sigma=float("nan")), ValueError, "sigma"),
    (dict(kind="box", ks=5, sigma=1.0), ValueError, "kind"),
    (dict(kind="triang", ks=5, sigma=1.0, normalize="l2"), ValueError, "normalize"),
])
def test_window_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        kernel_window(**kwargs)


# --------------------------------------------------------------------------------------------------
# Smoothing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", lds.MODES)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("ks", [1, 3, 5, 9, 21])
def test_smooth_counts_matches_convolve1d(mode, n, ks):
    rng = np.random.default_rng(n * 100 + ks)
    counts = rng.integers(0, 50, n).astype(np.float64)
    window = rng.random(ks)                           # asymmetric: checks the convolution direction
    got = smooth_counts(torch.from_numpy(counts), torch.from_numpy(window), mode).numpy()
    np.testing.assert_allclose(got, convolve1d(counts, window, mode=mode), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", lds.MODES)
@pytest.mark.parametrize("kind", ["gaussian", "triang", "laplace"])
@pytest.mark.parametrize("ks", [3, 5, 9])
def test_smooth_counts_symmetric_window_bit_exact(mode, kind, ks):
    """Symmetric windows: scipy's summation order, so the result is convolve1d's to the last bit (the
    published 'inverse' + LDS weights truncate it), for integer counts (many clipped to 5) and float counts,
    with leading dims."""
    window = kernel_window(kind, ks, 1.5)
    assert torch.equal(window, window.flip(0))
    rng = np.random.default_rng(ks * 31 + len(kind) + lds.MODES.index(mode))
    integer = rng.integers(0, 12, (4, 23)).clip(5, None).astype(np.float64)   # about half the bins are 5
    uniform = np.full((1, 23), 5.0)
    real = rng.random((3, 23)) * rng.choice([1e-3, 1.0, 1e3], (3, 1))
    for counts in (integer, uniform, real, integer[0, :1], real[0, :ks - 1]):
        got = smooth_counts(torch.from_numpy(counts), window, mode)
        want = torch.from_numpy(convolve1d(counts, window.numpy(), mode=mode, axis=-1))
        assert got.dtype == torch.float64 and torch.equal(got, want), (counts.shape, (got - want).abs().max())


def test_smooth_counts_truncated_triang_counts():
    """triang(5) over counts equal to 5 sums to 15 in real arithmetic; scipy's order gives 14.999999999999998,
    so the reference's integer smoothing gives 14, as does trunc(smooth_counts)."""
    counts = torch.full((12,), 5.0, dtype=torch.float64)
    window = kernel_window("triang", 5, 1.0)
    smoothed = torch.trunc(smooth_counts(counts, window, "constant"))
    want = convolve1d(np.full(12, 5), window.numpy(), mode="constant")     # an integer array, as published
    assert torch.equal(smoothed, torch.from_numpy(want).to(torch.float64))
    assert smoothed[6] == 14


def test_smooth_counts_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        smooth_counts(torch.ones(4), torch.ones(3), "circular")
    with pytest.raises(ValueError, match="window"):
        smooth_counts(torch.ones(4), torch.ones(4))


# --------------------------------------------------------------------------------------------------
# Bins, histograms, weights
# --------------------------------------------------------------------------------------------------


def test_histogram_and_clamping():
    labels = torch.tensor([-3.0, 0.0, 0.49, 0.5, 1.2, 2.99, 3.0, 7.5, 1e9])
    counts = lds.label_histogram(labels, 6, range=(0.0, 3.0))
    # bins of width 0.5: [0,.5) [.5,1) [1,1.5) [1.5,2) [2,2.5) [2.5,3]; below -> 0, at/above 3 -> last
    expected = [0] * 6
    for v in labels.tolist():
        expected[min(max(int(math.floor(v / 0.5)), 0), 5)] += 1
    assert counts.tolist() == expected
    edges = torch.tensor([0.0, 1.0, 5.0, 6.0])            # 3 bins: [0,1) [1,5) [5,6]
    assert lds.label_histogram(labels, edges).tolist() == [4, 3, 2]


def test_histogram_mask_and_errors():
    labels = torch.tensor([[0.1, float("nan")], [2.5, 0.2]])
    mask = torch.tensor([[True, False], [True, True]])
    assert lds.label_histogram(labels, 3, range=(0, 3), mask=mask).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="labels contain NaN"):
        lds.label_histogram(labels, 3, range=(0, 3))
    with pytest.raises(ValueError, match="range"):
        lds.label_histogram(labels, 3, range=(3, 0), mask=mask)
    with pytest.raises(ValueError, match="range"):
        lds.label_histogram(labels, 3, mask=mask)
    with pytest.raises(ValueError, match="bins"):
        lds.label_histogram(labels, 0, range=(0, 3), mask=mask)
    with pytest.raises(ValueError, match="increasing"):
        lds.label_histogram(labels, torch.tensor([0.0, 2.0, 1.0]), mask=mask)
    with pytest.raises(ValueError, match="mask"):
        lds.label_histogram(labels, 3, range=(0, 3), mask=mask[0])


AGE_CASES = [
    ("sqrt_inv", True, "gaussian", 5, 2.0),
    ("sqrt_inv", True, "triang", 9, 1.0),
    ("sqrt_inv", True, "laplace", 5, 2.0),
    ("inverse", True, "gaussian", 5, 2.0),
    ("inverse", True, "gaussian", 3, 1.0),
    ("sqrt_inv", False, "gaussian", 5, 2.0),
    ("inverse", False, "gaussian", 5, 2.0),
    ("none", False, "gaussian", 5, 2.0),
]


@pytest.mark.parametrize("reweight, lds_on, kernel, ks, sigma", AGE_CASES)
def test_sample_weights_match_reference(reweight, lds_on, kernel, ks, sigma):
    rng = np.random.default_rng(0)
    # skewed ages in [0, 130): some above max_target-1 = 120 (clamped by the reference), many rare bins
    ages = np.concatenate([rng.gamma(4.0, 8.0, 3000), rng.uniform(0, 130, 40)])
    ages = np.clip(ages, 0, 129.99)
    expected = ref_prepare_weights(ages.tolist(), reweight, 121, lds_on, kernel, ks, sigma)
    scheme = {"inverse": "inv"}.get(reweight, reweight)
    got = sample_weights(torch.tensor(ages), 121, scheme, lds_on, range=(0, 121), kernel=kernel, ks=ks, sigma=sigma)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert abs(float(got.mean()) - 1.0) < 1e-12
    # float32 labels keep their dtype
    got32 = sample_weights(torch.tensor(ages, dtype=torch.float32), 121, scheme, lds_on, range=(0, 121),
                           kernel=kernel, ks=ks, sigma=sigma)
    assert got32.dtype == torch.float32


@pytest.mark.parametrize("reweight", ["sqrt_inv", "inverse"])
@pytest.mark.parametrize("kernel, ks, sigma", [("gaussian", 5, 2.0), ("triang", 7, 1.0)])
def test_depth_bucket_weights_match_reference(reweight, kernel, ks, sigma):
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 10_000_000, 100)
    expected = ref_bucket_weights(counts, reweight, ref_window(kernel, ks, sigma), "reflect")
    scheme = "sqrt_inv" if reweight == "sqrt_inv" else "inv"
    lw = LabelWeights.from_counts(torch.tensor(counts), 100, range=(0.0, 10.0), scheme=scheme, clip=None,
                                  kernel=kernel, ks=ks, sigma=sigma, mode="reflect")
    np.testing.assert_allclose(lw.bin_weights.numpy(), expected, rtol=1e-12)
    # per-pixel lookup of a dense batch == the reference's Python map over pixels
    depth = torch.rand(2, 1, 9, 11, dtype=torch.float32) * 11.0
    mask = torch.rand(2, 1, 9, 11) > 0.2
    w = lw.weights(depth, mask)
    assert w.shape == depth.shape and w.dtype == torch.float32
    table = [np.float32(v) for v in expected]
    ref = [table[min(int(v * np.float32(10)), 99)] if m else 0.0
           for v, m in zip(depth.reshape(-1).numpy(), mask.reshape(-1).tolist())]
    np.testing.assert_allclose(w.reshape(-1).numpy(), ref, rtol=1e-6)


def test_label_weights_dense_fit_mask_and_mean_one():
    labels = torch.rand(3, 1, 13, 17, dtype=torch.float64) ** 2 * 8.0
    labels[0, 0, 0, :5] = float("nan")                 # holes, masked out
    mask = torch.isfinite(labels) & (labels > 0.05)
    lw = LabelWeights(40, range=(0.0, 8.0), scheme="sqrt_inv", ks=5, sigma=2.0, mode="reflect").fit(labels, mask)
    w = lw.weights(labels, mask)
    assert bool((w[~mask] == 0).all())
    assert abs(float(w[mask].mean()) - 1.0) < 1e-12
    # the gather equals a per-element loop over the fitted table
    edges = lw.edges.tolist()
    table = lw.bin_weights.tolist()
    for v, m, got in zip(labels.reshape(-1).tolist(), mask.reshape(-1).tolist(), w.reshape(-1).tolist()):
        if not m:
            continue
        b = sum(1 for e in edges[1:-1] if v >= e)
        assert got == table[b]
    # the same as label_density's density
    dens = label_density(labels, 40, range=(0.0, 8.0), mask=mask, scheme="sqrt_inv", ks=5, sigma=2.0, mode="reflect")
    torch.testing.assert_close(dens, lw.density)


def test_label_weights_empty_bins_get_zero_weight():
    train = torch.tensor([0.5, 0.6, 3.5])
    lw = LabelWeights(10, range=(0.0, 10.0), scheme="sqrt_inv", lds=False).fit(train)
    w = lw.weights(torch.tensor([0.55, 3.2, 7.0]))
    assert float(w[2]) == 0.0 and bool(torch.isfinite(w).all())
    assert float(w[0]) > 0 and float(w[1]) > 0
    lw_inv = LabelWeights(10, range=(0.0, 10.0), scheme="inv", lds=False).fit(train)
    assert float(lw_inv.weights(torch.tensor([7.0]))) > 0      # INV clips empty counts to 5


def test_label_weights_scheme_none_and_errors():
    lw = LabelWeights(5, range=(0, 5), scheme="none", lds=False).fit(torch.tensor([0.1, 0.2, 4.0]))
    assert lw.weights(torch.tensor([0.0, 3.0])).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="lds=True"):
        LabelWeights(5, range=(0, 5), scheme="none", lds=True)
    with pytest.raises(ValueError, match="scheme"):
        LabelWeights(5, range=(0, 5), scheme="log")
    with pytest.raises(ValueError, match="ks"):
        LabelWeights(5, range=(0, 5), ks=4)
    with pytest.raises(ValueError, match="mode"):
        LabelWeights(5, range=(0, 5), mode="edge")
    with pytest.raises(ValueError, match="clip"):
        LabelWeights(5, range=(0, 5), scheme="inv", clip=(10, 1))
    with pytest.raises(RuntimeError, match="before fit"):
        LabelWeights(5, range=(0, 5)).weights(torch.zeros(3))
    with pytest.raises(ValueError, match="counts"):
        LabelWeights.from_counts(torch.ones(4), 5, range=(0, 5))
    with pytest.raises(ValueError, match="counts"):
        LabelWeights.from_counts(torch.zeros(5), 5, range=(0, 5))
    with pytest.raises(ValueError, match="counts"):
        LabelWeights.from_counts(-torch.ones(5), 5, range=(0, 5))


def test_histograms_add_up_over_batches():
    batches = [torch.rand(4, 1, 5, 6) * 3 for _ in range(3)]
    total = sum(lds.label_histogram(b, 12, range=(0, 3)) for b in batches)
    whole = lds.label_histogram(torch.cat(batches), 12, range=(0, 3))
    assert total.tolist() == whole.tolist()
    lw1 = LabelWeights.from_counts(total, 12, range=(0, 3))
    lw2 = LabelWeights(12, range=(0, 3)).fit(torch.cat(batches))
    torch.testing.assert_close(lw1.bin_weights, lw2.bin_weights, rtol=0, atol=0)
