"""Label distribution smoothing (LDS) and label-density re-weighting (docs/methods.md §2).

Reference: Yang et al., ICML 2021, code YyzHarry/imbalanced-regression (``get_lds_kernel_window``,
``_prepare_weights``). Everything here is computed with torch (no scipy at runtime):

- :func:`kernel_window` — the symmetric smoothing windows ('gaussian' = the reference's
  ``gaussian_filter1d(delta, sigma)``, 'sampled_gaussian', 'triang', 'laplace').
- :func:`smooth_counts` — ``scipy.ndimage.convolve1d(counts, window, mode=...)`` over the bin axis.
- :func:`bin_edges`, :func:`label_histogram` — equal-width or explicit bins; labels outside the range
  count in the edge bins. :func:`bin_index` assigns labels to bins by one of :data:`EDGE_RULES`:
  ``'closed-left'`` (default: bin b is ``[e_b, e_{b+1})``, compared in float64) or ``'float32-truncate'``
  (the published depth code's ``int(depth * 10)`` in float32, for equal-width bins; see :func:`bin_index`).
- :func:`label_density` — the effective density ñ_b whose inverse is the weight: the counts, transformed by
  the scheme (``'sqrt_inv'``: √n_b, ``'inv'``: clip(n_b, 5, 1000), the reference clipping counts, not weights),
  then LDS-smoothed.
- :class:`LabelWeights` — fitted once on the training labels (or a precomputed histogram); then
  ``weights(labels, mask)`` is one ``bucketize`` + one gather for any label shape (e.g. dense ``[B, 1, H, W]``
  depth maps), on the labels' device.
- :func:`sample_weights` — ``LabelWeights(...).fit(labels).weights(labels)``: the reference's per-sample
  weights w_i = 1/ñ_{b(y_i)}, rescaled to mean 1 over the training set.

Sharded training sets (:mod:`imbreg_fast.distributed`): :func:`label_histogram`, :func:`label_density`,
:func:`sample_weights` and :meth:`LabelWeights.fit` take ``sync=True`` (and ``process_group``): the counts of
every process are summed (one float64 all-reduce of ``[K]``, exact), so the result is that of the
concatenated labels of all processes, on every process (docs/methods.md §7.3).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _validation as V
from . import distributed as D

__all__ = ["EDGE_RULES", "KERNELS", "SCHEMES", "LabelWeights", "bin_edges", "bin_index", "check_edge_rule",
           "kernel_window", "label_density", "label_histogram", "sample_weights", "smooth_counts"]

KERNELS = ("gaussian", "sampled_gaussian", "triang", "laplace")
SCHEMES = ("sqrt_inv", "inv", "none")
MODES = ("constant", "reflect", "nearest", "mirror", "wrap")
EDGE_RULES = ("closed-left", "float32-truncate")
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter1d's default radius, in standard deviations


# --------------------------------------------------------------------------------------------------
# Windows and smoothing
# --------------------------------------------------------------------------------------------------


def _extend_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map positions ``idx`` (any integers) into [0, n) with scipy.ndimage's boundary ``mode``
    ('constant' positions outside stay outside and are masked by the caller)."""
    if mode == "reflect":        # d c b a | a b c d | d c b a  (period 2n)
        j = torch.remainder(idx, 2 * n)
        return torch.where(j >= n, 2 * n - 1 - j, j)
    if mode == "mirror":         # d c b | a b c d | c b a      (period 2n - 2)
        if n == 1:
            return torch.zeros_like(idx)
        j = torch.remainder(idx, 2 * n - 2)
        return torch.where(j >= n, 2 * n - 2 - j, j)
    if mode == "nearest":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return torch.remainder(idx, n)
    return idx


def _check_ks(ks) -> int:
    ks = V.check_int("ks", ks, 1)
    if ks % 2 == 0:
        raise ValueError(f"ks must be an odd integer >= 1, got {ks}")
    return ks


def kernel_window(kind: str, ks: int, sigma: float, normalize: str = "max") -> torch.Tensor:
    """Symmetric smoothing window over ``ks`` neighbouring bins, as a float64 CPU tensor ``[ks]``.

    Args:
        kind: ``'gaussian'`` — exactly the reference's window, ``gaussian_filter1d(delta, sigma)`` of a
            length-``ks`` delta (scipy defaults: 'reflect' boundary, radius ``int(4 sigma + 0.5)``). When the
            Gaussian's support is wider than the window, the reflected tails fold back in, so this is NOT a
            sampled Gaussian (ks 5, sigma 2: [0.858, 0.946, 1, 0.946, 0.858] max-normalised).
            ``'sampled_gaussian'`` — ``exp(-x^2 / (2 sigma^2))`` at x = -(ks-1)/2 .. (ks-1)/2.
            ``'triang'`` — ``scipy.signal.windows.triang(ks)`` (sigma unused). ``'laplace'`` — ``exp(-|x|/sigma)``.
        ks: window size, an odd integer >= 1.
        sigma: kernel scale, > 0 (checked for every kind, unused by 'triang').
        normalize: ``'max'`` (peak 1: the reference's LDS windows) or ``'sum'`` (sums to 1: FDS windows).
    """
    if kind not in KERNELS:
        raise ValueError(f"kind must be one of {KERNELS}, got {kind!r}")
    ks = _check_ks(ks)
    sigma = V.check_positive("sigma", sigma)
    if normalize not in ("max", "sum"):
        raise ValueError(f"normalize must be 'max' or 'sum', got {normalize!r}")
    half = (ks - 1) // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    if kind == "gaussian":
        # correlate1d(delta, g, mode='reflect') of the centred delta, O(ks) for any sigma (see below)
        window = _reflected_gaussian(ks, sigma)
    elif kind == "sampled_gaussian":
        window = torch.exp(-x * x / (2.0 * sigma * sigma))
    elif kind == "triang":
        # scipy.signal.windows.triang, odd ks: 2n/(ks+1) for n = 1..(ks+1)/2, mirrored; 2n / (ks+1) in this
        # order (one rounding), bit-identical to scipy: integer counts smoothed with it can sum to exact integers
        window = (half + 1 - x.abs()) * 2.0 / (ks + 1)
    else:
        window = torch.exp(-x.abs() / sigma)
    return window / (window.max() if normalize == "max" else window.sum())


# The 'gaussian' window without the [ks, 2r+1] table. scipy computes out[i] = sum_k g_k delta[reflect(i + k)],
# k = -r..r, r = int(4 sigma + 0.5), g_k proportional to exp(-k^2 / (2 sigma^2)). With N = ks (odd) and centre
# c = (N - 1) / 2, reflect (period 2N) sends j to c exactly when j = c or j = N + c (mod 2N), i.e. when j = c
# (mod N). So out[i] = S((c - i) mod N), where S(a) is the sum of the taps over the progression k = a (mod N),
# |k| <= r; S(a) = S(-a). The common factor 1 / sum(g) cancels in kernel_window's normalisation.
_GAUSS_DIRECT_RADIUS = 4096     # r <= max(4096, 64 N): add the taps (O(r) = O(N) time and memory);
_GAUSS_DIRECT_PER_BIN = 64      # otherwise sigma > 16 N - 1/8 and the closed form is accurate to float64 rounding
# B_2j / (2j)!, j = 1..8: the Euler-Maclaurin coefficients
_EULER_MACLAURIN = (1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160, -691 / 1307674368000,
                    1 / 74724249600, -3617 / 10670622842880000)


def _gaussian_radius(sigma: float) -> int:
    """scipy's ``int(truncate * sigma + 0.5)``; its exact value where that float overflows (sigma > 4.4e307)."""
    x = GAUSSIAN_TRUNCATE * sigma + 0.5
    if math.isfinite(x):
        return int(x)
    from fractions import Fraction
    return math.floor(Fraction(GAUSSIAN_TRUNCATE) * Fraction(sigma) + Fraction(1, 2))


def _reflected_gaussian(ks: int, sigma: float) -> torch.Tensor:
    """The 'gaussian' window [ks] (float64) up to a positive factor."""
    radius = _gaussian_radius(sigma)
    if radius <= max(_GAUSS_DIRECT_RADIUS, _GAUSS_DIRECT_PER_BIN * ks):
        sums = _progression_sums_direct(ks, sigma, radius)
    else:
        sums = _progression_sums_closed_form(ks, sigma, radius)
    centre = (ks - 1) // 2
    return sums[torch.remainder(centre - torch.arange(ks), ks)]


def _progression_sums_direct(ks: int, sigma: float, radius: int) -> torch.Tensor:
    """S(a), a = 0..ks-1: the taps k = 1..r (scipy's formula) folded by residue, mirrored for k < 0, plus k = 0."""
    k = torch.arange(1, radius + 1, dtype=torch.float64)
    # r = 0 (sigma < 0.125): no taps besides k = 0, and sigma^2 may underflow to 0
    taps = torch.exp(-0.5 / (sigma * sigma) * (k * k)) if radius > 0 else k
    rows = -(-radius // ks)
    padded = torch.zeros(rows * ks, dtype=torch.float64)
    padded[:radius] = taps
    positive = padded.view(rows, ks).sum(0).roll(1)       # [a] = sum of taps k = 1..r with k = a (mod ks)
    sums = positive + positive[torch.remainder(-torch.arange(ks), ks)]
    sums[0] += 1.0                                        # the k = 0 tap
    return sums


def _progression_sums_closed_form(ks: int, sigma: float, radius: int) -> torch.Tensor:
    """h * S(a), a = 0..ks-1, h = ks / sigma < 1/15.8: the whole-lattice sum minus the two tails beyond +-r.

    Whole lattice (Poisson summation): h * sum_{k = a mod N} exp(-k^2 / (2 sigma^2))
    = sqrt(2 pi) * (1 + 2 sum_{q >= 1} exp(-2 pi^2 q^2 / h^2) cos(2 pi q a / N)); the q terms are below
    exp(-2 pi^2 * 15.8^2) ~ 1e-2000, so it is sqrt(2 pi) for every a: all the a-dependence is in the tails.

    Tail above +r of residue a: F(m) = exp(-(t0 + m h)^2 / 2), m >= 0, where t0 = k0 / sigma, k0 the first
    k > r with k = a (mod N), so 4 < t0 <= 4 + h + 0.5 / sigma. Euler-Maclaurin to infinity:
        h * sum_m F(m) = sqrt(pi/2) erfc(t0 / sqrt 2) + phi(t0) (h/2 + sum_j B_2j/(2j)! h^2j He_{2j-1}(t0)) + R,
    phi(t) = exp(-t^2/2), He the probabilists' Hermite polynomials (d^n/dt^n phi = (-1)^n He_n phi). F is
    locally exp(-t0 h m): the series behaves like that of 1/(1 - e^-x), x = t0 h < 0.27, terms shrinking by
    ~(x / 2 pi)^2 < 2e-3 each; j = 4 is ~1e-12 of the tail and j = 8 ~1e-24, while
    |R| <= 2 zeta(16) / (2 pi)^16 * h^16 * int_4^inf |He_16| phi < 3e-28 (the tail itself is ~1e-4).
    The tail below -r of residue a is the tail above +r of residue -a. No step cancels: the tails are added
    to / taken from sqrt(2 pi) ~ 2.5 as small positive terms, each computed directly (erfc, not 1 - erf).
    """
    from fractions import Fraction
    h = ks / sigma
    # t0 = 4 + (r + 1 - 4 sigma + offset) / sigma, with r + 1 - 4 sigma (in [0.5, 1.5]) taken exactly
    lead = float(Fraction(radius + 1) - Fraction(GAUSSIAN_TRUNCATE) * Fraction(sigma))
    offset = torch.remainder(torch.arange(ks) - (radius + 1) % ks, ks).to(torch.float64)
    t0 = GAUSSIAN_TRUNCATE + (lead + offset) / sigma
    he_lo, he_hi = torch.ones_like(t0), t0                 # He_{n-1}, He_n with n = 1
    series = torch.full_like(t0, 0.5 * h)
    h_pow = 1.0
    for j, coeff in enumerate(_EULER_MACLAURIN, start=1):
        h_pow *= h * h
        series = series + (coeff * h_pow) * he_hi          # he_hi = He_{2j-1}(t0)
        n = 2 * j - 1                                      # He_{n+1} = t He_n - n He_{n-1}, twice
        he_lo, he_hi = he_hi, t0 * he_hi - n * he_lo
        he_lo, he_hi = he_hi, t0 * he_hi - (n + 1) * he_lo
    tails = math.sqrt(0.5 * math.pi) * torch.special.erfc(t0 * math.sqrt(0.5)) + torch.exp(-0.5 * t0 * t0) * series
    return math.sqrt(2.0 * math.pi) - tails - tails[torch.remainder(-torch.arange(ks), ks)]


def smooth_counts(counts: torch.Tensor, window: torch.Tensor, mode: str = "constant") -> torch.Tensor:
    """``scipy.ndimage.convolve1d(counts, window, mode=mode)`` along the last axis, in float64.

    ``counts``: any shape ``[..., K]``, K >= 1; ``window``: 1-D of odd length. ``mode``: 'constant' (zeros
    outside, the reference's age/STS-B setting), 'reflect' (its depth setting, edge bins repeated),
    'nearest', 'mirror' or 'wrap'. Returns float64 ``[..., K]`` on the counts' device.

    For a symmetric window (``window == window.flip(0)`` exactly; every :func:`kernel_window` is) the
    result equals scipy's bit for bit in every mode: the sums are formed in scipy's order
    (``NI_Correlate1D``), ``x_b w_0`` first, then ``(x_{b-j} + x_{b+j}) w_j`` from the outermost pair
    ``j = h`` inwards. The last bit matters where the smoothed counts are truncated: the reference's
    'inverse' + LDS weights smooth an integer array, so every smoothed count is truncated toward zero (a
    triang window over counts clipped to 5 sums to exactly 15 in real arithmetic, and to 14.999... or
    15.000... in floating point; :func:`imbreg_fast.compat.dir.prepare_weights`). Other windows: the
    same convolution, summed in another order (equal to scipy's up to float64 rounding).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(counts, torch.Tensor) or not isinstance(window, torch.Tensor):
        raise TypeError("counts and window must be torch tensors")
    if window.dim() != 1 or window.shape[0] % 2 == 0:
        raise ValueError(f"window must be 1-D of odd length, got shape {tuple(window.shape)}")
    if counts.dim() < 1 or counts.shape[-1] < 1:
        raise ValueError(f"counts must have at least one bin, got shape {tuple(counts.shape)}")
    n = counts.shape[-1]
    half = window.shape[0] // 2
    # symmetric: a Python bool for a CPU window, else a 0-d tensor on its device (no host sync)
    symmetric = (torch.equal(window, window.flip(0)) if window.device.type == "cpu"
                 else (window == window.flip(0)).all())
    counts = counts.to(torch.float64)
    window = window.to(device=counts.device, dtype=torch.float64)
    # taps[..., b, i] = counts_ext[b - j], j = i - half; out[b] = sum_i window[i] * taps[..., b, i]
    j = torch.arange(-half, half + 1, device=counts.device)
    src = torch.arange(n, device=counts.device).unsqueeze(1) - j.unsqueeze(0)              # [n, ks]
    src = _extend_index(src, n, mode)
    inside = (src >= 0) & (src < n)
    taps = counts[..., src.clamp(0, n - 1)] * inside.to(torch.float64)                     # [..., n, ks]
    if symmetric is False:
        return (taps * window).sum(-1)
    # scipy's order: taps[..., half - j] = x_{b+j}, taps[..., half + j] = x_{b-j}
    out = taps[..., half] * window[half]
    for k in range(half, 0, -1):
        out = out + (taps[..., half + k] + taps[..., half - k]) * window[half + k]
    if symmetric is True:
        return out
    return torch.where(symmetric.to(counts.device), out, (taps * window).sum(-1))


# --------------------------------------------------------------------------------------------------
# Bins and histograms
# --------------------------------------------------------------------------------------------------

BinsArg = Union[int, Sequence[float], torch.Tensor]


def bin_edges(bins: BinsArg, range: Optional[Sequence[float]] = None, *, device=None) -> torch.Tensor:
    """Bin edges ``[K + 1]`` (float64): ``bins`` equal-width bins over ``range = (lo, hi)``, or explicit
    increasing edges (then ``range`` must be None). Bin b is [e_b, e_{b+1}); labels below e_0 count in bin 0
    and labels at or above e_K in bin K-1 (the reference clamps ages to ``max_target - 1`` likewise)."""
    if isinstance(bins, bool):
        raise TypeError("bins must be an int (with range) or a sequence/tensor of edges, got bool")
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if range is None:
            raise ValueError("range=(lo, hi) is required when bins is a number of bins")
        try:
            lo, hi = (float(v) for v in range)
        except (TypeError, ValueError):
            raise TypeError(f"range must be a pair of numbers (lo, hi), got {range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"range must be finite with lo < hi, got ({lo}, {hi})")
        return torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=device)
    if range is not None:
        raise ValueError("range must be None when bins are explicit edges")
    edges = torch.as_tensor(bins, dtype=torch.float64, device=device)
    if edges.dim() != 1 or edges.shape[0] < 2:
        raise ValueError(f"bins edges must be 1-D with at least 2 values, got shape {tuple(edges.shape)}")
    if not bool(torch.isfinite(edges).all()) or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("bins edges must be finite and strictly increasing")
    return edges


def check_edge_rule(edge_rule, edges: torch.Tensor) -> str:
    """``edge_rule`` is one of :data:`EDGE_RULES`; ``'float32-truncate'`` also needs equal-width ``edges``
    (each within 1e-3 of a bin width of the uniform grid over ``[e_0, e_K]``; the rule itself uses e_0, e_K
    and K only)."""
    edge_rule = V.check_choice("edge_rule", edge_rule, EDGE_RULES)
    if edge_rule == "float32-truncate":
        k = edges.shape[0] - 1
        grid = torch.linspace(float(edges[0]), float(edges[-1]), k + 1, dtype=torch.float64)
        width = (float(edges[-1]) - float(edges[0])) / k
        if not bool(((edges.cpu() - grid).abs() <= 1e-3 * width).all()):
            raise ValueError("edge_rule='float32-truncate' needs equal-width bins (bins=int with range=(lo, hi), "
                             "or uniformly spaced edges)")
    return edge_rule


def bin_index(labels: torch.Tensor, edges: torch.Tensor, edge_rule: str = "closed-left") -> torch.Tensor:
    """Bin of each label (int64, labels' shape), edges from :func:`bin_edges`; out-of-range labels are
    clamped to the edge bins (NaN: the last bin).

    ``edge_rule``:

    - ``'closed-left'`` (default): bin b is ``[e_b, e_{b+1})``, compared in float64, so a label exactly on
      an edge goes up, and a float32 label just below an edge stays below it: float32 7.2 is
      7.19999981 < 7.2, bin 71 of the 0.1 m depth bins over [0, 10).
    - ``'float32-truncate'``: the published depth code's rule (YyzHarry/imbalanced-regression
      ``nyud2-dir``: ``int(depth * np.float32(10))``, ``floor(depth * 10)`` on float32 tensors), for
      equal-width bins (:func:`check_edge_rule`): ``b = floor(float32(float32(y - e_0) * s))`` with
      ``s = float32(K / (e_K - e_0))``, every step in float32 (labels are rounded to float32 first), then
      clamped to ``[0, K - 1]``. float32 7.2 times 10 rounds to 72.0: bin 72. With ``e_0 = 0`` this is the
      published product exactly; with 1-wide bins (ages) both rules agree.
    """
    if edge_rule == "closed-left":
        inner = edges[1:-1].to(labels.device)
        return torch.bucketize(labels.to(torch.float64), inner, right=True)
    if edge_rule != "float32-truncate":
        raise ValueError(f"edge_rule must be one of {EDGE_RULES}, got {edge_rule!r}")
    k = edges.shape[0] - 1
    e = edges.to(labels.device)
    lo = e[0].to(torch.float32)                                   # 0-d tensors: no host sync
    scale = (k / (e[-1] - e[0])).to(torch.float32)
    t = torch.floor((labels.to(torch.float32) - lo) * scale)      # float32 subtract and multiply
    return torch.nan_to_num(t, nan=k - 1).clamp_(0, k - 1).to(torch.int64)


def label_histogram(labels: torch.Tensor, bins: BinsArg, range=None, *, mask=None, check_finite: bool = True,
                    edge_rule: str = "closed-left", sync: bool = False, process_group=None) -> torch.Tensor:
    """Counts per bin, float64 ``[K]`` on the labels' device (kept labels only when ``mask`` is given).

    Histograms of several batches add up: ``sum(label_histogram(b, edges) for b in loader)`` gives the
    training counts for :meth:`LabelWeights.from_counts` when the training set does not fit in memory.
    ``sync=True``: the counts of every process of ``process_group`` summed (see the module docstring); with
    a loader, count locally and synchronise once (``imbreg_fast.distributed.all_reduce(counts)``).
    ``edge_rule``: how labels are assigned to bins (:func:`bin_index`).
    """
    group = D.sync_group(sync, process_group)
    with D.agreement(group, "label_histogram", getattr(labels, "device", None)) as agreed:
        V.check_labels(labels, mask, check_finite=check_finite)
        edges = bin_edges(bins, range)
        check_edge_rule(edge_rule, edges)
        agreed.signature = {"bin edges": D.fingerprint(edges)}
    counts = _count(labels, mask, edges, edge_rule)
    return counts if group is None else D.all_reduce(counts, "sum", group)


def _count(labels: torch.Tensor, mask, edges: torch.Tensor, edge_rule: str = "closed-left") -> torch.Tensor:
    """float64 counts [K] of the (kept) labels in the bins of ``edges``."""
    idx = bin_index(labels, edges, edge_rule).reshape(-1)
    if mask is not None:
        idx = idx[mask.reshape(-1)]
    return torch.bincount(idx, minlength=edges.shape[0] - 1).to(torch.float64)


def _check_scheme(scheme: str, lds: bool, clip) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if lds and scheme == "none":
        raise ValueError("lds=True needs scheme='sqrt_inv' or 'inv' (LDS smooths the density that is "
                         "inverted; with scheme='none' there is none), as the reference asserts")
    if clip is not None:
        try:
            lo, hi = (float(v) for v in clip)
        except (TypeError, ValueError):
            raise TypeError(f"clip must be None or a pair (lo, hi), got {clip!r}") from None
        if not (0 <= lo <= hi):
            raise ValueError(f"clip must satisfy 0 <= lo <= hi, got {clip!r}")


def _density_from_counts(counts, scheme, lds, kernel, ks, sigma, mode, clip):
    counts = counts.to(torch.float64)
    if scheme == "sqrt_inv":
        value = counts.sqrt()
    elif scheme == "inv":
        value = counts if clip is None else counts.clamp(float(clip[0]), float(clip[1]))
    else:
        value = counts.clone()
    if lds:
        window = kernel_window(kernel, ks, sigma, normalize="max").to(counts.device)
        value = smooth_counts(value, window, mode)
    return value


def label_density(labels: torch.Tensor, bins: BinsArg, range=None, *, mask=None, scheme: str = "sqrt_inv",
                  lds: bool = True, kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                  mode: str = "constant", clip=(5, 1000), check_finite: bool = True,
                  edge_rule: str = "closed-left", sync: bool = False, process_group=None) -> torch.Tensor:
    """Effective label density ñ per bin, float64 ``[K]``: the weight of a label in bin b is ∝ 1/ñ_b.

    ``scheme``: ``'sqrt_inv'`` (√n_b), ``'inv'`` (n_b clipped to ``clip``, default (5, 1000) as the
    reference; ``clip=None`` for raw counts, as its depth code), ``'none'`` (raw counts). With ``lds``, the
    result is smoothed with ``kernel_window(kernel, ks, sigma, 'max')`` by :func:`smooth_counts` with
    boundary ``mode`` ('constant' for age/STS-B, 'reflect' for depth in the reference). ``edge_rule``: how
    labels are assigned to bins (:func:`bin_index`). ``sync=True``: the density of the labels of every
    process of ``process_group`` (see the module docstring).
    """
    _check_scheme(scheme, False, clip)
    counts = label_histogram(labels, bins, range, mask=mask, check_finite=check_finite, edge_rule=edge_rule,
                             sync=sync, process_group=process_group)
    return _density_from_counts(counts, scheme, lds, kernel, ks, sigma, mode, clip)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


class LabelWeights:
    """Per-bin re-weighting fitted on training labels; ``weights(labels)`` is one bucketize + one gather.

    Example (dense depth, 0.1 m bins over [0, 10) m, as the reference)::

        lw = LabelWeights(100, range=(0.0, 10.0), scheme="inv", clip=None, mode="reflect").fit(train_depth, mask=valid)
        w = lw.weights(depth_batch, mask=valid_batch)        # [B, 1, H, W], mean 1 over the training pixels

    ``edge_rule`` (:func:`bin_index`): ``'closed-left'`` (default) or ``'float32-truncate'``, the published
    depth code's float32 ``int(depth * 10)`` (float32 7.2 m in bin 72, not 71), used both to count the
    training labels and to look up the weights.

    Fitted attributes (float64, on the fitting device): ``edges [K+1]``, ``counts [K]`` (training counts),
    ``density [K]`` (ñ), ``bin_weights [K]`` = s/ñ_b with s such that the mean weight over the training
    set is 1 (s = Σ n_b / Σ n_b/ñ_b). Bins with ñ_b = 0 (only possible for bins without training labels
    and with 'sqrt_inv' or 'none') get weight 0 instead of inf: they hold no training label. With
    ``scheme='none'`` every weight is 1.
    """

    def __init__(self, bins: BinsArg, range=None, *, scheme: str = "sqrt_inv", lds: bool = True,
                 kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0, mode: str = "constant",
                 clip=(5, 1000), edge_rule: str = "closed-left"):
        _check_scheme(scheme, lds, clip)
        if lds:
            kernel_window(kernel, ks, sigma)   # validates kernel, ks, sigma now rather than at fit time
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.edges = bin_edges(bins, range)
        self.edge_rule = check_edge_rule(edge_rule, self.edges)
        self.scheme, self.lds, self.kernel, self.ks, self.sigma, self.mode = scheme, lds, kernel, ks, sigma, mode
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.counts = self.density = self.bin_weights = None
        self._cache: dict = {}

    @property
    def num_bins(self) -> int:
        return self.edges.shape[0] - 1

    def fit(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None, *, check_finite: bool = True,
            sync: bool = False, process_group=None) -> "LabelWeights":
        """Count the training labels (kept ones when ``mask`` is given) and derive the bin weights.

        ``sync=True``: ``labels`` is this process's shard of the training set; the counts of every process of
        ``process_group`` are summed (module docstring), so every process fits the same weights, those of the
        whole training set (a process may hold no label)."""
        group = D.sync_group(sync, process_group)
        with D.agreement(group, "LabelWeights.fit", getattr(labels, "device", None)) as agreed:
            V.check_labels(labels, mask, check_finite=check_finite)
            agreed.signature = {"bin edges": D.fingerprint(self.edges)}
        counts = _count(labels, mask, self.edges.to(labels.device), self.edge_rule)
        return self.fit_counts(counts if group is None else D.all_reduce(counts, "sum", group))

    def fit_counts(self, counts: torch.Tensor) -> "LabelWeights":
        """Derive the bin weights from training counts per bin ``[K]`` (e.g. summed :func:`label_histogram`)."""
        counts = torch.as_tensor(counts)
        if counts.shape != (self.num_bins,):
            raise ValueError(f"counts must have shape [K] = [{self.num_bins}], got {tuple(counts.shape)}")
        counts = counts.to(torch.float64)
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("counts must be finite and >= 0")
        total = counts.sum()
        if not bool(total > 0):
            raise ValueError("counts are all zero: no training label to fit the weights on")
        self.edges = self.edges.to(counts.device)
        density = _density_from_counts(counts, self.scheme, self.lds, self.kernel, self.ks, self.sigma,
                                       self.mode, self.clip)
        inv = torch.where(density > 0, 1.0 / torch.where(density > 0, density, 1.0), 0.0)
        if self.scheme == "none":
            inv = torch.ones_like(counts)
        scaling = total / (counts * inv).sum()       # mean over the training set = 1
        self.counts, self.density, self.bin_weights = counts, density, inv * scaling
        self._cache = {}
        return self

    @classmethod
    def from_counts(cls, counts: torch.Tensor, bins: BinsArg, range=None, **kwargs) -> "LabelWeights":
        """``LabelWeights(bins, range, **kwargs).fit_counts(counts)``."""
        return cls(bins, range, **kwargs).fit_counts(counts)

    def _table(self, device, dtype):
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.edges[1:-1].to(device), self.bin_weights.to(device=device, dtype=dtype))
        return self._cache[key]

    def weights(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Weight of each label, labels' shape, on their device; 0 where ``mask`` is False.

        One ``bucketize`` against the bin edges and one gather from the bin-weight table. ``dtype``: of the
        result; default the labels' dtype for fp32/fp64 labels, else fp32.
        """
        if self.bin_weights is None:
            raise RuntimeError("LabelWeights.weights called before fit / fit_counts")
        V.check_labels(labels, mask, check_finite=False)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype (weights are fractional), got {dtype!r}")
        if dtype is None:
            dtype = labels.dtype if labels.dtype in (torch.float32, torch.float64) else torch.float32
        inner, table = self._table(labels.device, dtype)
        if self.edge_rule == "closed-left":
            idx = torch.bucketize(labels.to(torch.float64), inner, right=True)
        else:
            idx = bin_index(labels, self.edges, self.edge_rule)
        w = table[idx]
        if mask is not None:
            w = torch.where(mask, w, torch.zeros((), dtype=dtype, device=labels.device))
        return w

    __call__ = weights

    def to(self, device) -> "LabelWeights":
        """Move the fitted tables to ``device`` (weights() also moves them on demand, cached)."""
        self.edges = self.edges.to(device)
        if self.bin_weights is not None:
            self.counts, self.density, self.bin_weights = (t.to(device) for t in
                                                           (self.counts, self.density, self.bin_weights))
        self._cache = {}
        return self

    def __repr__(self) -> str:
        lds = f", lds={self.kernel}(ks={self.ks}, sigma={self.sigma}, mode={self.mode!r})" if self.lds else ""
        rule = "" if self.edge_rule == "closed-left" else f", edge_rule={self.edge_rule!r}"
        return (f"LabelWeights(bins={self.num_bins}, range=[{float(self.edges[0]):.4g}, {float(self.edges[-1]):.4g}], "
                f"scheme={self.scheme!r}{lds}{rule}, fitted={self.bin_weights is not None})")


def sample_weights(labels: torch.Tensor, bins: BinsArg, scheme: str = "sqrt_inv", lds: bool = True, *,
                   range=None, mask=None, kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                   mode: str = "constant", clip=(5, 1000), check_finite: bool = True,
                   edge_rule: str = "closed-left", sync: bool = False, process_group=None) -> torch.Tensor:
    """Per-sample weights of the training labels themselves, as the reference's ``_prepare_weights``:
    w_i = s/ñ_{b(y_i)} with mean 1 over the (kept) labels; labels' shape, 0 where ``mask`` is False.
    See :class:`LabelWeights` for the arguments; ``bins``: a number of bins with ``range``, or edges.
    ``sync=True``: the weights of this process's labels within the training set of every process (fitted on
    the summed counts; the mean is 1 over all processes' labels)."""
    lw = LabelWeights(bins, range, scheme=scheme, lds=lds, kernel=kernel, ks=ks, sigma=sigma, mode=mode, clip=clip,
                      edge_rule=edge_rule)
    return lw.fit(labels, mask, check_finite=check_finite, sync=sync, process_group=process_group).weights(labels, mask)
