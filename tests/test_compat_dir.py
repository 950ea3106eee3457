"""imbreg_fast.compat.dir against references written in this file from the published definitions of
YyzHarry/imbalanced-regression (loss.py, utils.py, datasets.py ``_prepare_weights``, fds.py and the schedule
and ``shot_metrics`` of train.py): plain Python / numpy loops in float64, scipy where the published code
calls scipy (``convolve1d``, ``gaussian_filter1d``, ``triang``). On the torch and cpp backends; float64 to
1e-10, float32 to 1e-5.

Run: ``.venv/bin/python -m pytest tests/test_compat_dir.py -q``
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from imbreg_fast import lds
from imbreg_fast.compat import dir as cdir

scipy_ndimage = pytest.importorskip("scipy.ndimage")
scipy_windows = pytest.importorskip("scipy.signal.windows")

BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.requires_cpp)]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def assert_close(actual, expected, dtype, msg=""):
    actual = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, np.asarray(expected, dtype=np.float64), err_msg=msg, **TOL[dtype])


# ----------------------------------------------------------------------------------------------------
# References (float64, element by element)
# ----------------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _focal(a, activate, beta, gamma):
    """(f(a), f'(a)) of the focal factor: g = 2 sigmoid(beta a) - 1 or tanh(beta a); f = g^gamma."""
    if activate == "tanh":
        g, dg = math.tanh(beta * a), beta * (1.0 - math.tanh(beta * a) ** 2)
    else:
        s = _sigmoid(beta * a)
        g, dg = 2.0 * s - 1.0, 2.0 * beta * s * (1.0 - s)
    f = g ** gamma
    df = gamma * g ** (gamma - 1) * dg if g != 0 else (dg if gamma == 1 else 0.0)
    return f, df


def ref_loss(kind, x, y, w, activate="sigmoid", beta=0.2, gamma=1.0):
    """(loss, d loss / d inputs) of the published weighted losses: mean over all M elements of w * l(e)."""
    x, y = x.detach().double().reshape(-1).tolist(), y.detach().double().reshape(-1).tolist()
    w = [1.0] * len(x) if w is None else w.tolist()
    m = len(x)
    total, grad = 0.0, []
    for xi, yi, wi in zip(x, y, w):
        e = xi - yi
        a = abs(e)
        sign = (e > 0) - (e < 0)
        if kind == "mse":
            l, dl = e * e, 2 * e
        elif kind == "l1":
            l, dl = a, sign
        elif kind == "huber":
            l, dl = (0.5 * a * a / beta, e / beta) if a < beta else (a - 0.5 * beta, sign)
        elif kind == "focal_mse":
            f, df = _focal(a, activate, beta, gamma)
            l, dl = e * e * f, 2 * e * f + e * e * df * sign
        else:
            f, df = _focal(a, activate, beta, gamma)
            l, dl = a * f, sign * (f + a * df)
        total += wi * l
        grad.append(wi * dl / m)
    return total / m, grad


def ref_window(kernel, ks, sigma, normalize):
    """The published windows: gaussian_filter1d of a delta / triang / laplace, max- (LDS) or sum- (FDS)
    normalised, in float64."""
    half = (ks - 1) // 2
    if kernel == "gaussian":
        delta = [0.0] * half + [1.0] + [0.0] * half
        w = scipy_ndimage.gaussian_filter1d(delta, sigma=sigma)
    elif kernel == "triang":
        w = scipy_windows.triang(ks)
    else:
        w = np.array([math.exp(-abs(x) / sigma) / (2.0 * sigma) for x in range(-half, half + 1)])
    return w / (max(w) if normalize == "max" else sum(w))


def ref_prepare_weights(labels, reweight, max_target=121, lds_on=False, kernel="gaussian", ks=5, sigma=2):
    """_prepare_weights: counts of min(max_target - 1, int(y)); sqrt, or clip to [5, 1000] keeping integers;
    scipy convolve1d with the LDS window (an integer array in, an integer array out); w = 1/x scaled to mean 1.
    Returns (weights, per-bin density)."""
    counts = {b: 0 for b in range(max_target)}
    labels = [float(v) for v in labels]
    for v in labels:
        counts[min(max_target - 1, int(v))] += 1
    if reweight == "sqrt_inv":
        value = np.array([math.sqrt(counts[b]) for b in range(max_target)])
    else:
        value = np.array([min(max(counts[b], 5), 1000) for b in range(max_target)], dtype=np.int64)
    if lds_on:
        value = scipy_ndimage.convolve1d(value, weights=ref_window(kernel, ks, sigma, "max"), mode="constant")
    per_label = [float(value[min(max_target - 1, int(v))]) for v in labels]
    inv = [1.0 / x for x in per_label]
    s = len(inv) / sum(inv)
    return np.array([s * x for x in inv]), value


def ref_shot_metrics(preds, labels, train_labels, many=100, low=20):
    """train.shot_metrics: one group per distinct test label; training count = #(int(train) == label)."""
    preds, labels = np.asarray(preds, np.float64).reshape(-1), np.asarray(labels, np.float64).reshape(-1)
    train = [int(v) for v in np.asarray(train_labels, np.float64).reshape(-1)]
    errors = {"many": [], "median": [], "low": []}
    for value in sorted(set(labels.tolist())):
        count = sum(1 for t in train if t == value)
        shot = "many" if count > many else ("low" if count < low else "median")
        errors[shot] += [p - y for p, y in zip(preds, labels) if y == value]
    out = {}
    for shot, e in errors.items():
        if not e:
            out[shot] = {"mse": math.nan, "l1": math.nan, "gmean": math.nan}
            continue
        a = [abs(v) for v in e]
        gmean = 0.0 if min(a) == 0 else math.exp(sum(math.log(v) for v in a) / len(a))
        out[shot] = {"mse": sum(v * v for v in e) / len(e), "l1": sum(a) / len(a), "gmean": gmean}
    return out


class RefFDS:
    """The published FDS state machine in numpy float64 (row features), aliasing included: after the first
    update_last_epoch_stats, running_*_last_epoch is the running_* array object itself."""

    def __init__(self, c, bucket_num, bucket_start, start_update, start_smooth, window, momentum, clip):
        nb = bucket_num - bucket_start
        self.bn, self.bs, self.su, self.ss = bucket_num, bucket_start, start_update, start_smooth
        self.window, self.momentum, self.clip = np.asarray(window, np.float64), momentum, clip
        self.epoch = float(start_update)
        self.running_mean, self.running_var = np.zeros((nb, c)), np.ones((nb, c))
        self.running_mean_last_epoch, self.running_var_last_epoch = np.zeros((nb, c)), np.ones((nb, c))
        self.smoothed_mean_last_epoch, self.smoothed_var_last_epoch = np.zeros((nb, c)), np.ones((nb, c))
        self.num_samples_tracked = np.zeros(nb)

    def _conv(self, stats):
        nb, h = stats.shape[0], (len(self.window) - 1) // 2
        out = np.zeros_like(stats)
        for b in range(nb):
            for j in range(-h, h + 1):
                i = b + j
                i = -i if i < 0 else (2 * (nb - 1) - i if i >= nb else i)   # F.pad reflect
                out[b] += self.window[j + h] * stats[i]
        return out

    def update_last_epoch_stats(self, epoch):
        if epoch == self.epoch + 1:
            self.epoch += 1
            self.running_mean_last_epoch = self.running_mean                     # aliased, as published
            self.running_var_last_epoch = self.running_var
            self.smoothed_mean_last_epoch = self._conv(self.running_mean_last_epoch)
            self.smoothed_var_last_epoch = self._conv(self.running_var_last_epoch)

    def _groups(self, labels):
        for value in sorted(set(labels.tolist())):
            if value > self.bn - 1 or value < self.bs:
                continue
            if value == self.bs:
                sel = labels <= value
            elif value == self.bn - 1:
                sel = labels >= value
            else:
                sel = labels == value
            yield int(value - self.bs), sel

    def update_running_stats(self, features, labels, epoch):
        if epoch < self.epoch:
            return
        for i, sel in self._groups(labels):
            z = features[sel]
            n = z.shape[0]
            mean, var = z.mean(0), z.var(0, ddof=1 if n != 1 else 0)
            self.num_samples_tracked[i] += n
            f = self.momentum if self.momentum is not None else 1 - n / self.num_samples_tracked[i]
            f = 0 if epoch == self.su else f
            self.running_mean[i] = (1 - f) * mean + f * self.running_mean[i]
            self.running_var[i] = (1 - f) * var + f * self.running_var[i]

    def smooth(self, features, labels, epoch):
        """(calibrated copy, d out / d features element-wise)."""
        out, slope = features.copy(), np.ones_like(features)
        if epoch < self.ss:
            return out, slope
        for i, sel in self._groups(labels):
            m1, v1 = self.running_mean_last_epoch[i], self.running_var_last_epoch[i]
            m2, v2 = self.smoothed_mean_last_epoch[i], self.smoothed_var_last_epoch[i]
            if v1.sum() < 1e-10:
                continue
            for ch in range(features.shape[1]):
                if v1[ch] == 0:
                    continue
                s = math.sqrt(min(max(v2[ch] / v1[ch], self.clip[0]), self.clip[1]))
                out[sel, ch] = (features[sel, ch] - m1[ch]) * s + m2[ch]
                slope[sel, ch] = s
        return out, slope

    def buffers(self):
        return {"epoch": [self.epoch], "running_mean": self.running_mean, "running_var": self.running_var,
                "running_mean_last_epoch": self.running_mean_last_epoch,
                "running_var_last_epoch": self.running_var_last_epoch,
                "smoothed_mean_last_epoch": self.smoothed_mean_last_epoch,
                "smoothed_var_last_epoch": self.smoothed_var_last_epoch,
                "num_samples_tracked": self.num_samples_tracked}


# ----------------------------------------------------------------------------------------------------
# Weighted losses
# ----------------------------------------------------------------------------------------------------

LOSSES = {
    "mse": lambda x, y, w, **kw: cdir.weighted_mse_loss(x, y, w, **kw),
    "l1": lambda x, y, w, **kw: cdir.weighted_l1_loss(x, y, w, **kw),
    "huber": lambda x, y, w, **kw: cdir.weighted_huber_loss(x, y, w, 0.7, **kw),
    "focal_mse": lambda x, y, w, **kw: cdir.weighted_focal_mse_loss(x, y, w, "sigmoid", 0.3, 2, **kw),
    "focal_l1": lambda x, y, w, **kw: cdir.weighted_focal_l1_loss(x, y, w, "tanh", 0.25, 1.5, **kw),
}
REF_ARGS = {"mse": {}, "l1": {}, "huber": dict(beta=0.7), "focal_mse": dict(activate="sigmoid", beta=0.3, gamma=2),
            "focal_l1": dict(activate="tanh", beta=0.25, gamma=1.5)}


class TestWeightedLosses:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("kind", list(LOSSES))
    @pytest.mark.parametrize("shape,wshape", [((7, 1), (7, 1)), ((7, 1), None), ((2, 1, 3, 4), (2, 1, 1, 1))])
    def test_value_and_gradient(self, kind, dtype, backend, shape, wshape):
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_()
        y = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
        if len(shape) == 2:
            with torch.no_grad():
                x[0] = y[0]                                      # an exact hit: e = 0
        w = None if wshape is None else (torch.rand(wshape, dtype=torch.float64) * 2).to(dtype)
        loss = LOSSES[kind](x, y, w, backend=backend)
        loss.backward()
        w_full = None if w is None else w.expand(shape).double().reshape(-1)
        ref, ref_grad = ref_loss(kind, x, y, w_full, **REF_ARGS[kind])
        assert loss.dtype == dtype
        assert_close(loss, ref, dtype, kind)
        assert_close(x.grad.reshape(-1), ref_grad, dtype, kind + " grad")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_huber_beta_zero_is_l1(self, backend):
        x, y = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
        ref, _ = ref_loss("l1", x, y, None)
        assert_close(cdir.weighted_huber_loss(x, y, None, 0.0, backend=backend), ref, torch.float64)

    def test_bad_arguments(self):
        x = torch.randn(4, 1)
        with pytest.raises(ValueError, match="inputs and targets"):
            cdir.weighted_mse_loss(x, torch.randn(4))
        with pytest.raises(ValueError, match="weights"):
            cdir.weighted_l1_loss(x, x, torch.ones(5, 1))
        with pytest.raises(TypeError, match="targets"):
            cdir.weighted_l1_loss(x, [1.0, 2.0])
        with pytest.raises(ValueError, match="activate"):
            cdir.weighted_focal_mse_loss(x, x, None, "relu")
        with pytest.raises(ValueError, match="beta"):
            cdir.weighted_huber_loss(x, x, None, -1.0)


# ----------------------------------------------------------------------------------------------------
# LDS: windows and prepare_weights
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["gaussian", "triang", "laplace"])
@pytest.mark.parametrize("ks,sigma", [(5, 2), (9, 1), (3, 0.5), (7, 3)])
def test_get_lds_kernel_window(kernel, ks, sigma):
    w = cdir.get_lds_kernel_window(kernel, ks, sigma)
    assert w.dtype == torch.float64 and w.shape == (ks,)
    np.testing.assert_allclose(w.numpy(), ref_window(kernel, ks, sigma, "max"), rtol=1e-14, atol=1e-15)
    if kernel == "triang":                  # rational values: bit-identical, so integer sums tie the same way
        assert np.array_equal(w.numpy(), ref_window(kernel, ks, sigma, "max"))


def _age_labels(n, seed, hi=60, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ages = (torch.randn(n, generator=g) * 12 + 35).clamp(0, hi).floor()
    return ages.to(dtype)


class TestPrepareWeights:
    @pytest.mark.parametrize("reweight,lds_on", [("none", False), ("sqrt_inv", False), ("inverse", False),
                                                 ("sqrt_inv", True), ("inverse", True)])
    @pytest.mark.parametrize("kernel,ks,sigma", [("gaussian", 5, 2), ("triang", 5, 2), ("laplace", 9, 1.5)])
    def test_every_combination(self, reweight, lds_on, kernel, ks, sigma):
        labels = torch.cat([_age_labels(400, 1), torch.tensor([130.0, 121.0, 0.5, 7.9])])  # clamp + truncation
        out = cdir.prepare_weights(labels, reweight, 121, lds_on, kernel, ks, sigma)
        if reweight == "none":
            assert out is None
            return
        ref, _ = ref_prepare_weights(labels.tolist(), reweight, 121, lds_on, kernel, ks, sigma)
        assert out.dtype == torch.float64 and out.shape == (labels.numel(),)
        assert_close(out, ref, torch.float64)
        assert abs(float(out.mean()) - 1.0) < 1e-12

    def test_integer_truncation_changes_the_weight(self):
        # a sparse label set: the smoothed clipped counts are small, so truncating them moves the weights by %
        labels = torch.tensor([10.0] * 7 + [12.0] * 3 + [13.0] + [30.0] * 40, dtype=torch.float64)
        out = cdir.prepare_weights(labels, "inverse", 60, True, "gaussian", 5, 2)
        ref, density = ref_prepare_weights(labels.tolist(), "inverse", 60, True, "gaussian", 5, 2)
        assert density.dtype == np.int64                       # the published smoothing returns integers
        assert_close(out, ref, torch.float64)
        # float smoothing (the mainline's LDS) gives other weights
        float_w = lds.sample_weights(labels, torch.arange(61, dtype=torch.float64), "inv", True, kernel="gaussian",
                                     ks=5, sigma=2, clip=(5, 1000))
        assert float((out - float_w).abs().max() / float_w.abs().max()) > 0.01

    def test_triang_ties_follow_the_published_sums(self):
        # counts clipped to 5 smoothed with triang: exact integers in real arithmetic, so the last bit of each
        # floating-point sum decides the truncation; many random histograms against scipy itself
        g = torch.Generator().manual_seed(3)
        for trial in range(20):
            labels = torch.randint(0, 40, (int(torch.randint(30, 200, (1,), generator=g)),), generator=g).double()
            for ks in (5, 9):
                out = cdir.prepare_weights(labels, "inverse", 40, True, "triang", ks, 1)
                ref, _ = ref_prepare_weights(labels.tolist(), "inverse", 40, True, "triang", ks, 1)
                assert_close(out, ref, torch.float64, f"trial {trial}, ks {ks}")

    def test_inputs(self):
        ages = _age_labels(50, 2)
        ref, _ = ref_prepare_weights(ages.tolist(), "sqrt_inv", 121, True)
        for labels in (ages.numpy(), ages.tolist(), ages.double(), ages.reshape(5, 10)):
            assert_close(cdir.prepare_weights(labels, "sqrt_inv", lds=True), ref, torch.float64)
        assert cdir.prepare_weights(torch.zeros(0), "inverse") is None          # published: None when empty
        np.testing.assert_allclose(cdir.prepare_weights([-0.5, 0.0, 3.0], "inverse").numpy(),
                                   ref_prepare_weights([-0.5, 0.0, 3.0], "inverse")[0], rtol=1e-12)

    def test_bad_arguments(self):
        labels = _age_labels(20, 0)
        with pytest.raises(ValueError, match="reweight"):
            cdir.prepare_weights(labels, "inv")
        with pytest.raises(ValueError, match="lds=True"):
            cdir.prepare_weights(labels, "none", lds=True)
        with pytest.raises(ValueError, match="labels must be > -1"):
            cdir.prepare_weights(torch.tensor([3.0, -1.0]), "inverse")
        with pytest.raises(ValueError, match="NaN"):
            cdir.prepare_weights(torch.tensor([3.0, math.nan]), "inverse")
        with pytest.raises(ValueError, match="lds_kernel"):
            cdir.prepare_weights(labels, "inverse", lds=True, lds_kernel="box")
        with pytest.raises(ValueError, match="lds_ks"):
            cdir.prepare_weights(labels, "inverse", lds=True, lds_ks=4)
        with pytest.raises(ValueError, match="max_target"):
            cdir.prepare_weights(labels, "inverse", max_target=0)
        with pytest.raises(ValueError, match="kernel"):
            cdir.get_lds_kernel_window("box", 5, 2)
        with pytest.raises(TypeError, match="labels"):
            cdir.prepare_weights(object(), "inverse")


# ----------------------------------------------------------------------------------------------------
# Shot metrics
# ----------------------------------------------------------------------------------------------------


class TestShotMetrics:
    def _data(self, dtype):
        g = torch.Generator().manual_seed(5)
        train = torch.cat([torch.full((12,), 1.0), torch.full((6,), 2.0), torch.full((3,), 3.0),
                           torch.tensor([4.7, 4.2, 5.0, 1.9])])                   # counts: 1:13, 2:6, 3:3, 4:2, 5:1
        labels = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 5.0, 2.5, 6.0], dtype=dtype)
        preds = (labels.double() + torch.randn(labels.shape, generator=g, dtype=torch.float64)).to(dtype)
        preds[3] = labels[3]                                                     # one exact hit
        return preds, labels, train

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_against_reference(self, dtype):
        preds, labels, train = self._data(dtype)
        for many, low in ((5, 2), (10, 4), (100, 20)):
            out = cdir.shot_metrics(preds, labels, train, many, low)
            ref = ref_shot_metrics(preds.numpy(), labels.numpy(), train.numpy(), many, low)
            assert set(out) == {"many", "median", "low"}
            for shot in ref:
                for key in ("mse", "l1", "gmean"):
                    assert isinstance(out[shot][key], float)
                    assert_close([out[shot][key]], [ref[shot][key]], dtype, f"{many}/{low} {shot} {key}")

    def test_numpy_inputs_and_column_shapes(self):
        preds, labels, train = self._data(torch.float64)
        ref = ref_shot_metrics(preds.numpy(), labels.numpy(), train.numpy(), 5, 2)
        out = cdir.shot_metrics(preds.numpy()[:, None], labels.numpy()[:, None], train.tolist(), 5, 2)
        for shot in ref:
            assert_close([out[shot][k] for k in ref[shot]], [ref[shot][k] for k in ref[shot]], torch.float64)

    def test_empty_group_is_nan(self):
        preds, labels, train = self._data(torch.float64)
        out = cdir.shot_metrics(preds, labels, train)          # thresholds 100 / 20: everything is low-shot
        assert all(math.isnan(out["many"][k]) and math.isnan(out["median"][k]) for k in ("mse", "l1", "gmean"))
        ref = ref_shot_metrics(preds.numpy(), labels.numpy(), train.numpy())
        assert_close([out["low"][k] for k in ref["low"]], [ref["low"][k] for k in ref["low"]], torch.float64)
        assert out["low"]["gmean"] == 0.0                       # the exact hit: log(0)

    def test_bad_arguments(self):
        preds, labels, train = self._data(torch.float64)
        with pytest.raises(TypeError, match="preds"):
            cdir.shot_metrics(preds.tolist(), labels, train)
        with pytest.raises(ValueError, match="same number"):
            cdir.shot_metrics(preds[:-1], labels, train)
        with pytest.raises(ValueError, match="low_shot_thr"):
            cdir.shot_metrics(preds, labels, train, 5, 10)
        with pytest.raises(ValueError, match="labels"):
            cdir.shot_metrics(preds, torch.full_like(labels, math.nan), train)


# ----------------------------------------------------------------------------------------------------
# FDS across the published schedule
# ----------------------------------------------------------------------------------------------------

C, BUCKET_NUM, BUCKET_START = 3, 12, 3


def _epoch_data(epoch, dtype, with_ends=True):
    """Training batches and the statistics pass of one epoch: integer labels 0..14 (outside the bucket range
    on both sides), two non-integer labels sharing bucket 2 with label 5, one-sample groups; some batches
    without the boundary labels 3 / 11 (their outside rows are then left out)."""
    g = torch.Generator().manual_seed(100 + epoch)
    labels = torch.randint(0, 15, (60,), generator=g).double()
    labels[:4] = torch.tensor([5.5, 5.25, 5.5, 3.0])
    labels[4:6] = torch.tensor([11.0, 13.0]) if with_ends else torch.tensor([12.0, 2.0])
    features = torch.randn(60, C, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]) + epoch
    batches = []
    for b in range(2):
        bl = torch.randint(0, 15, (9,), generator=g).double()
        bl = bl[(bl != BUCKET_START) & (bl != BUCKET_NUM - 1)] if b == 1 else torch.cat([bl, torch.tensor([3.0, 11.0])])
        bf = torch.randn(bl.numel(), C, generator=g, dtype=torch.float64) * 2 + epoch
        batches.append((bf.to(dtype), bl.to(dtype)))
    return features.to(dtype), labels.to(dtype), batches


def _make(dtype, backend, kernel="gaussian", ks=5, sigma=2, momentum=0.9):
    fds = cdir.FDS(C, BUCKET_NUM, BUCKET_START, 0, 1, kernel, ks, sigma, momentum, backend=backend)
    fds = fds.double() if dtype == torch.float64 else fds
    ref = RefFDS(C, BUCKET_NUM, BUCKET_START, 0, 1, ref_window(kernel, ks, sigma, "sum"), momentum, (0.1, 10.0))
    return fds, ref


def _check_buffers(fds, ref, dtype, where):
    for name, value in ref.buffers().items():
        assert_close(getattr(fds, name), value, dtype, f"{where}: {name}")


class TestFDS:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("kernel,ks,sigma,momentum", [("gaussian", 5, 2, 0.9), ("triang", 3, 1, None),
                                                          ("laplace", 5, 1.5, 0.5)])
    def test_published_schedule(self, dtype, backend, kernel, ks, sigma, momentum):
        fds, ref = _make(dtype, backend, kernel, ks, sigma, momentum)
        fds.train()
        calibrated = 0
        for epoch in range(4):                                     # the smoothing of epochs 1, 2, 3
            features, labels, batches = _epoch_data(epoch, dtype, with_ends=epoch != 2)
            for x, y in batches:
                x = x.clone().requires_grad_()
                before = x.detach().clone()
                out = fds.smooth(x, y[:, None], epoch)
                expected, slope = ref.smooth(x.detach().double().numpy(), y.double().numpy(), epoch)
                assert_close(out, expected, dtype, f"smooth, epoch {epoch}")
                assert torch.equal(x.detach(), before)             # never in place
                if epoch >= 1:
                    assert out is not x and out.dtype == dtype
                    grad = torch.randn_like(x)
                    out.backward(grad)
                    assert_close(x.grad, slope * grad.double().numpy(), dtype, f"grad, epoch {epoch}")
                calibrated += int(not np.allclose(expected, x.detach().double().numpy()))
            fds.update_last_epoch_stats(epoch)
            ref.update_last_epoch_stats(epoch)
            fds.update_running_stats(features, labels, epoch)
            ref.update_running_stats(features.double().numpy(), labels.double().numpy(), epoch)
            _check_buffers(fds, ref, dtype, f"epoch {epoch}")
        assert calibrated >= 3                                     # the calibration did something

    def test_first_smoothing_epoch_is_identity_and_schedule_gates(self):
        fds, ref = _make(torch.float64, "torch")
        features, labels, batches = _epoch_data(0, torch.float64)
        x, y = batches[0]
        assert fds.smooth(x, y, 0) is x                            # before start_smooth: the input itself
        fds.update_last_epoch_stats(0)                             # 0 != epoch + 1: nothing
        assert float(fds.epoch) == 0
        fds.update_running_stats(features, labels, 0)
        assert torch.equal(fds.smooth(x, y, 1), x)                 # epoch 1: last-epoch buffers still 0 / 1
        fds.update_last_epoch_stats(3)                             # not epoch + 1: nothing
        assert float(fds.epoch) == 0 and torch.equal(fds.smoothed_var_last_epoch, torch.ones_like(fds.running_var))
        fds.update_last_epoch_stats(1)
        assert float(fds.epoch) == 1
        tracked = fds.num_samples_tracked.clone()
        fds.update_running_stats(features, labels, 0)              # epoch < self.epoch: skipped
        assert torch.equal(fds.num_samples_tracked, tracked)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_state_dict_round_trip(self, backend):
        fds, _ = _make(torch.float64, backend)
        for epoch in range(2):
            features, labels, _ = _epoch_data(epoch, torch.float64)
            fds.update_last_epoch_stats(epoch)
            fds.update_running_stats(features, labels, epoch)
        state = copy.deepcopy(fds.state_dict())
        assert sorted(state) == sorted(["epoch", "running_mean", "running_var", "running_mean_last_epoch",
                                        "running_var_last_epoch", "smoothed_mean_last_epoch",
                                        "smoothed_var_last_epoch", "num_samples_tracked"])   # published keys
        assert state["epoch"].shape == (1,) and state["num_samples_tracked"].shape == (BUCKET_NUM - BUCKET_START,)
        resumed = cdir.FDS(C, BUCKET_NUM, BUCKET_START, backend=backend).double()
        resumed.load_state_dict(state)
        for epoch in range(2, 4):                                  # continue the schedule on both
            features, labels, batches = _epoch_data(epoch, torch.float64)
            for x, y in batches:
                assert torch.equal(fds.smooth(x, y, epoch), resumed.smooth(x, y, epoch))
            for m in (fds, resumed):
                m.update_last_epoch_stats(epoch)
                m.update_running_stats(features, labels, epoch)
            for name, value in fds.state_dict().items():
                assert torch.equal(value, resumed.state_dict()[name]), name

    def test_dtype_and_device_moves(self):
        fds = cdir.FDS(C, BUCKET_NUM, BUCKET_START)
        assert fds.running_mean.dtype == torch.float32             # published buffers: the default dtype
        assert fds.double().running_var.dtype == torch.float64
        assert "bucket_start=3" in repr(fds)

    def test_bad_arguments(self):
        fds = cdir.FDS(C, BUCKET_NUM, BUCKET_START)
        x, y = torch.randn(5, C), torch.arange(5.0)
        with pytest.raises(ValueError, match="features"):
            fds.smooth(torch.randn(5, C + 1), y, 2)
        with pytest.raises(ValueError, match="labels"):
            fds.update_running_stats(x, torch.arange(4.0), 0)
        with pytest.raises(TypeError, match="features"):
            fds.smooth(x.long(), y, 2)
        with pytest.raises(ValueError, match="NaN"):
            fds.update_running_stats(x, torch.full((5,), math.nan), 0)
        with pytest.raises(TypeError, match="epoch"):
            fds.smooth(x, y, 1.5)
        with pytest.raises(ValueError, match="kernel"):
            cdir.FDS(C, kernel="box")
        with pytest.raises(ValueError, match="ks"):
            cdir.FDS(C, ks=4)
        with pytest.raises(ValueError, match="bucket_start"):
            cdir.FDS(C, bucket_num=3, bucket_start=3)
        with pytest.raises(ValueError, match="momentum"):
            cdir.FDS(C, momentum=1.5)
