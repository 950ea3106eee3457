"""Self-test of imbreg_fast/experiments/published.py (the published formulations) against values worked out
by hand and the naive oracles of tests/ (plain loops, numpy).

Run: ``.venv/bin/python -m pytest tests/test_published_reference.py -q``
"""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import imbreg_fast.experiments.published as pub
from fds_reference import naive_accumulate, naive_recolor, naive_smooth
from imbreg_fast.experiments.published import (bmc_loss_candidates_published, bmc_loss_md_published,
                                               bmc_loss_published, bni_loss_published, gai_loss_published)
from imbreg_fast.lds import LabelWeights, kernel_window
from naive_weighted_losses import flat, weighted_loss_naive


def test_module_imports_only_torch_and_the_standard_library():
    tree = ast.parse(Path(pub.__file__).read_text())
    roots = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "array", "typing", "torch"}, roots


def test_all_is_complete():
    public = {n for n, v in vars(pub).items() if callable(v) and not n.startswith("_")
              and getattr(v, "__module__", None) == pub.__name__}
    assert public == set(pub.__all__)


# ----------------------------------------------------------------------------------------------------
# Balanced MSE
# ----------------------------------------------------------------------------------------------------


def test_bmc_single_row_is_zero():
    p = torch.tensor([[0.3]], requires_grad=True)
    for loss in (bmc_loss_published(p, torch.tensor([[1.7]]), 0.5),
                 bmc_loss_md_published(p, torch.tensor([[1.7]]), torch.tensor(0.5)),
                 bmc_loss_candidates_published(p, torch.tensor([[1.7]]), torch.empty(0, 1), 0.5)):
        assert loss.item() == 0.0


def test_bmc_two_rows_by_hand():
    # noise_var 0.5: l_ij = -(p_i - y_j)^2. Row 0 (p 0): [0, -4], positive 0 -> log(1 + e^-4).
    # Row 1 (p 1): [-1, -1], positive 1 -> log 2. Scale 2 * 0.5 = 1, mean over 2 rows.
    pred = torch.tensor([[0.0], [1.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    loss = bmc_loss_published(pred, target, torch.tensor(0.5, dtype=torch.float64))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-4)) + math.log(2)) / 2, rel=1e-12)
    # dL_i/dp_i = 2 (sum_j s_ij y_j - y_i) / N: row 0: 2 * 2 e^-4/(1 + e^-4) / 2, row 1: 2 (1 - 2) / 2.
    (grad,) = torch.autograd.grad(loss, pred)
    e = math.exp(-4)
    assert grad.reshape(-1).tolist() == pytest.approx([2 * e / (1 + e), -1.0], rel=1e-12)


def test_bmc_md_matches_1d():
    # The MVN normalising constant is the same for every logit and cancels in the cross-entropy.
    pred, target = torch.randn(7, 1, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    one_d = bmc_loss_published(pred, target, 0.8)
    as_2d = bmc_loss_md_published(torch.cat([pred, torch.zeros_like(pred)], 1),
                                  torch.cat([target, torch.zeros_like(target)], 1), 0.8)
    assert one_d.item() == pytest.approx(bmc_loss_md_published(pred, target, 0.8).item(), rel=1e-12)
    assert one_d.item() == pytest.approx(as_2d.item(), rel=1e-12)


def test_bmc_candidates_by_hand():
    # Row (p 0, y 0) against candidate 2, noise_var 0.5: logits [0, -4], positive first -> log(1 + e^-4).
    loss = bmc_loss_candidates_published(torch.tensor([0.0], dtype=torch.float64),
                                         torch.tensor([0.0], dtype=torch.float64),
                                         torch.tensor([2.0], dtype=torch.float64), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-4)), rel=1e-12)
    # d = 2, the same geometry along the first axis.
    loss2 = bmc_loss_candidates_published(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                                          torch.tensor([[2.0, 0.0]], dtype=torch.float64), 0.5)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)


def test_gai_one_component_by_hand():
    p, y, s, mu, v = 1.0, 0.25, 0.6, -0.5, 0.3
    row = (p - y) ** 2 / (2 * s) + 0.5 * math.log(s) - 0.5 * math.log(v + s) - (p - mu) ** 2 / (2 * (v + s))
    loss = gai_loss_published(torch.tensor([[p], [p]], dtype=torch.float64), torch.tensor([[y], [y]], dtype=torch.float64),
                              torch.tensor(s, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                              torch.tensor([mu], dtype=torch.float64), torch.tensor([v], dtype=torch.float64))
    assert loss.item() == pytest.approx(2 * s * row, rel=1e-12)


def test_gai_computes_in_pred_dtype():
    # The published code would return float64 here (numpy GMM); ours stays in pred's dtype.
    w, mu, v = (torch.tensor(x, dtype=torch.float64) for x in ([0.4, 0.6], [[0.0], [1.0]], [[[0.5]], [[0.2]]]))
    loss = gai_loss_published(torch.randn(5, 1), torch.randn(5, 1), torch.tensor(0.7), w, mu, v)
    assert loss.dtype == torch.float32


def test_bni_by_hand():
    # One bin (centre 3, weight 1): L = 2s[(p - y)^2/(2s) - (p - c)^2/(2s)] = (p - y)^2 - (p - c)^2 = 1 - 4.
    loss = bni_loss_published(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 0.7, torch.tensor([3.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(-3.0, rel=1e-6)
    # Two bins, weights 0.25 / 0.75 at centres 0 / 2, p = 1, y = 1, s = 0.5:
    # L = 2s * log(0.25 e^-1 + 0.75 e^-1) = -1.
    loss = bni_loss_published(torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                              0.5, torch.tensor([0.0, 2.0]), torch.tensor([0.25, 0.75]))
    assert loss.item() == pytest.approx(-1.0, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Weighted losses: torch.mean(w l) is the naive 'mean' reduction
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,fn,kwargs", [
    ("mse", pub.published_weighted_mse_loss, {}),
    ("l1", pub.published_weighted_l1_loss, {}),
    ("huber", pub.published_weighted_huber_loss, {"beta": 0.7}),
    ("focal_mse", pub.published_weighted_focal_mse_loss, {"beta": 0.4, "gamma": 2}),
    ("focal_mse", pub.published_weighted_focal_mse_loss, {"activate": "tanh", "beta": 0.4, "gamma": 2}),
    ("focal_l1", pub.published_weighted_focal_l1_loss, {"gamma": 3}),
    ("focal_l1", pub.published_weighted_focal_l1_loss, {"activate": "tanh"}),
])
def test_weighted_losses_match_naive_mean(kind, fn, kwargs):
    pred = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    target = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    weight = torch.rand(2, 1, 3, 4, dtype=torch.float64)
    beta = kwargs.get("beta", 1.0 if kind == "huber" else 0.2)
    want = weighted_loss_naive(flat(pred), flat(target), flat(weight), None, kind, "mean", 1.0, beta=beta,
                               gamma=kwargs.get("gamma", 1.0), activation=kwargs.get("activate", "sigmoid"))
    assert fn(pred, target, weight, **kwargs).item() == pytest.approx(want.loss, rel=1e-12, abs=1e-15)
    unweighted = weighted_loss_naive(flat(pred), flat(target), None, None, kind, "mean", 1.0, beta=beta,
                                     gamma=kwargs.get("gamma", 1.0), activation=kwargs.get("activate", "sigmoid"))
    assert fn(pred, target, None, **kwargs).item() == pytest.approx(unweighted.loss, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------------------
# Per-pixel weights of the depth loader
# ----------------------------------------------------------------------------------------------------


def _naive_pixel_weights(depth, table):
    """The published loader's lookup, literally with numpy float32 scalars."""
    t = [np.float32(w) for w in table]
    values = depth.reshape(-1).numpy()
    assert values.dtype == np.float32
    out = np.array([t[min(int(v * np.float32(10)), len(t) - 1)] for v in values], dtype=np.float32)
    return torch.from_numpy(out).view(depth.shape)


def test_pixel_weights_match_the_published_lookup():
    table = (torch.rand(100, dtype=torch.float64) * 3).tolist()
    # every bucket boundary k / 10 in float32 (where the float32 product decides the bucket), its float32
    # neighbours, random depths and depths beyond the last bucket
    edges = torch.arange(101, dtype=torch.float32) / 10
    depth = torch.cat([edges, torch.nextafter(edges, torch.tensor(20.0)), torch.nextafter(edges, torch.tensor(0.0)),
                       torch.rand(40) * 12, torch.tensor([0.0, 10.0, 25.0])]).view(1, -1, 1)
    got = pub.published_pixel_weights(depth, table)
    assert got.dtype == torch.float32 and got.shape == depth.shape
    assert torch.equal(got, _naive_pixel_weights(depth, table))
    # a tensor table gives the same; no table: ones
    assert torch.equal(pub.published_pixel_weights(depth, torch.tensor(table)), got)
    assert torch.equal(pub.published_pixel_weights(depth, None), torch.ones_like(depth))


def test_pixel_weights_match_label_weights_at_bin_centres():
    # our LabelWeights over 100 bins of 0.1 m from 0 (bucketize) on depths away from the bin edges
    lw = LabelWeights(100, range=(0.0, 10.0), scheme="inv", clip=None).fit_counts(torch.rand(100) * 50 + 1)
    depth = ((torch.randint(0, 100, (2, 1, 4, 5)).float() + 0.5) / 10)
    want = lw.weights(depth, dtype=torch.float32)
    got = pub.published_batch_pixel_weights(depth, lw.bin_weights)
    assert torch.equal(got, want)


def test_batch_pixel_weights_stack_the_samples():
    depth = torch.rand(3, 1, 4, 6) * 11
    table = torch.rand(100)
    got = pub.published_batch_pixel_weights(depth, table, device="cpu")
    assert torch.equal(got, torch.stack([pub.published_pixel_weights(d, table) for d in depth]))
    # buckets_per_unit: 2 buckets per unit, 5 buckets
    got = pub.published_batch_pixel_weights(depth, [1.0, 2.0, 3.0, 4.0, 5.0], buckets_per_unit=2)
    want = (torch.clamp(torch.floor(depth * 2), max=4) + 1).float()
    assert torch.equal(got, want)


def test_pixel_weights_bad_inputs():
    with pytest.raises(TypeError, match="depth"):
        pub.published_pixel_weights(torch.rand(1, 2, 2, dtype=torch.float64), [1.0])
    with pytest.raises(ValueError, match="below|<="):
        pub.published_pixel_weights(torch.tensor([0.5, -0.2]), [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        pub.published_pixel_weights(torch.tensor([0.5, float("nan")]), [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        pub.published_pixel_weights(torch.tensor([0.5]), [])
    with pytest.raises(ValueError, match="buckets_per_unit"):
        pub.published_pixel_weights(torch.tensor([0.5]), [1.0], buckets_per_unit=0)
    with pytest.raises(ValueError, match="batch"):
        pub.published_batch_pixel_weights(torch.empty(0, 1, 2, 2), [1.0])
    # (-0.1, 0) truncates to bucket 0, as published
    assert pub.published_pixel_weights(torch.tensor([-0.05]), [7.0, 8.0]).item() == 7.0


# ----------------------------------------------------------------------------------------------------
# FDS: smoothing, calibration, the published dense FDS
# ----------------------------------------------------------------------------------------------------


def test_published_smooth_is_the_reflect_convolution():
    window = kernel_window("gaussian", 5, 2.0, normalize="sum")
    stats = torch.randn(9, 3)
    got = pub.published_smooth(stats, window)
    assert got.dtype == torch.float32 and got.shape == stats.shape
    want = naive_smooth(stats, [True] * 9, window)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_calibrate_mean_var_branches_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]])
    m1, v1 = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.0, 4.0, 0.5])
    m2, v2 = torch.tensor([0.0, 2.0, 1.0]), torch.tensor([4.0, 1.0, 100.0])
    # all valid: per channel sqrt(clamp(v2 / v1, 0.2, 5)) = [2, sqrt(0.25) -> 0.5, sqrt(5)]
    scale = torch.tensor([2.0, 0.5, math.sqrt(5.0)])
    got = pub.published_calibrate_mean_var(x.clone(), m1, v1, m2, v2)
    torch.testing.assert_close(got, (x - m1) * scale + m2)
    # a channel with v1 = 0: left as is (written in place into the rows given)
    v1z = torch.tensor([1.0, 0.0, 0.5])
    rows = x.clone()
    got = pub.published_calibrate_mean_var(rows, m1, v1z, m2, v2)
    assert got is rows
    want = (x - m1) * scale + m2
    want[:, 1] = x[:, 1]
    torch.testing.assert_close(got, want)
    # variances summing below 1e-10: unchanged, the same tensor
    rows = x.clone()
    assert pub.published_calibrate_mean_var(rows, m1, torch.zeros(3), m2, v2) is rows
    # another clip
    got = pub.published_calibrate_mean_var(x.clone(), m1, v1, m2, v2, clip=(0.1, 10.0))
    torch.testing.assert_close(got, (x - m1) * torch.tensor([2.0, 0.5, math.sqrt(10.0)]) + m2)


def _naive_buckets(labels, start, num, per_unit=10.0):
    """clamp(int(float32(y) * float32(per_unit)), start, num - 1) per label, numpy scalars."""
    s = np.float32(per_unit)
    return [max(min(int(np.float32(y) * s), num - 1), start) for y in labels.reshape(-1).numpy()]


def _dense_case(b=2, c=3, h=4, w=5, lo=0.0, hi=1.3):
    features = torch.randn(b, c, h, w, dtype=torch.float64)
    labels = (torch.rand(b, 1, h, w) * (hi - lo) + lo)
    return features, labels


def _diag_transform(m1, v1, m2, v2, clip=(0.2, 5.0)):
    """Per-bucket (scale, shift) of the published rule, float64, by loops."""
    rows, c = m1.shape
    scale, shift = torch.ones(rows, c, dtype=torch.float64), torch.zeros(rows, c, dtype=torch.float64)
    for k in range(rows):
        if float(v1[k].sum()) < 1e-10:
            continue
        for i in range(c):
            a, b = float(v1[k, i]), float(v2[k, i])
            if a > 0 and b >= 0:
                scale[k, i] = math.sqrt(min(max(b / a, clip[0]), clip[1]))
                shift[k, i] = float(m2[k, i]) - scale[k, i] * float(m1[k, i])
    return scale, shift


def test_fds_smooth_matches_naive_recolor():
    nb, start = 12, 2
    features, labels = _dense_case()
    labels[0, 0, 0, :3] = torch.tensor([0.05, 5.0, 0.7])         # below bucket_start, beyond the last, a boundary
    rows = nb - start
    m1, v1 = torch.randn(rows, 3, dtype=torch.float64), torch.rand(rows, 3, dtype=torch.float64) + 0.05
    m2, v2 = torch.randn(rows, 3, dtype=torch.float64), torch.rand(rows, 3, dtype=torch.float64) * 3
    v1[3, 1] = 0.0                                               # partial branch in one bucket
    v1[4] = 0.0                                                  # sum(var) < 1e-10: unchanged
    f = features.clone().requires_grad_()
    got = pub.published_fds_smooth(f, labels, m1, v1, m2, v2, bucket_num=nb, bucket_start=start)
    assert got.shape == features.shape and got.dtype == features.dtype
    assert torch.equal(f.detach(), features)                     # the caller's features are not written
    b, c, h, w = features.shape
    bins = torch.tensor(_naive_buckets(labels, start, nb)).view(b, h * w) - start
    assert {0, 3, 4, rows - 1} <= set(bins.reshape(-1).tolist())   # the clamped and special buckets occur
    scale, shift = _diag_transform(m1, v1, m2, v2)
    want = naive_recolor(features.reshape(b, c, h * w), bins, scale, shift).view(b, c, h, w)
    torch.testing.assert_close(got.detach(), want, atol=1e-12, rtol=1e-12)
    # gradient: per channel the scale (identity where unchanged)
    g = torch.randn_like(features)
    (grad,) = torch.autograd.grad(got, f, g)
    want_grad = naive_recolor(g.reshape(b, c, h * w), bins, scale, torch.zeros_like(shift)).view(b, c, h, w)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-12)
    # [B, H, W] labels and float32 statistics (cast to the features' dtype) give the same
    same = pub.published_fds_smooth(features, labels.squeeze(1), m1.float(), v1, m2, v2, bucket_num=nb,
                                    bucket_start=start)
    torch.testing.assert_close(same, want, atol=1e-6, rtol=1e-6)


def test_fds_smooth_bad_inputs():
    features, labels = _dense_case()
    stats = [torch.ones(10, 3)] * 4
    with pytest.raises(ValueError, match="labels"):
        pub.published_fds_smooth(features, labels[:, :, :2], *stats, bucket_num=12, bucket_start=2)
    with pytest.raises(ValueError, match="features"):
        pub.published_fds_smooth(features[0], labels, *stats, bucket_num=12, bucket_start=2)
    with pytest.raises(ValueError, match="running_var"):
        pub.published_fds_smooth(features, labels, stats[0], torch.ones(9, 3), stats[2], stats[3],
                                 bucket_num=12, bucket_start=2)
    with pytest.raises(ValueError, match="bucket_start"):
        pub.published_fds_smooth(features, labels, *stats, bucket_num=2, bucket_start=2)
    with pytest.raises(TypeError, match="labels"):
        pub.published_fds_smooth(features, labels.long(), *stats, bucket_num=12, bucket_start=2)


@pytest.mark.parametrize("momentum", [0.9, None])
def test_fds_update_matches_naive_statistics(momentum):
    nb, start, c = 12, 2, 3
    rows = nb - start
    features, labels = _dense_case(c=c)
    labels = torch.where((labels >= 1.0) & (labels < 1.1), torch.tensor(0.5), labels)
    labels[0, 0, 0, 0] = 1.05                                     # bucket 10 holds a single pixel
    labels[0, 0, 0, 1:3] = torch.tensor([0.01, 9.0])              # clamped to bucket_start / the last bucket
    b, _, h, w = features.shape
    buckets = _naive_buckets(labels, start, nb)
    bins = torch.tensor(buckets).view(b, h * w) - start
    count, mean, m2 = naive_accumulate(features.reshape(b, c, h * w), bins, rows, False)
    var = m2 / (count - 1).clamp(min=1).unsqueeze(1)              # unbiased; n = 1: biased = 0
    seen = count > 0
    assert count[10 - start] == 1

    state = (torch.zeros(rows, c), torch.ones(rows, c), torch.zeros(rows))
    before = [t.clone() for t in state]
    # the first epoch of updates replaces the statistics of every bucket it sees
    got_mean, got_var, got_n = pub.published_fds_update(features, labels, *state, epoch=0, start_update=0,
                                                        momentum=momentum, bucket_num=nb, bucket_start=start)
    assert all(torch.equal(a, b) for a, b in zip(state, before))   # inputs are not modified
    torch.testing.assert_close(got_n, count.float())
    torch.testing.assert_close(got_mean, torch.where(seen.unsqueeze(1), mean, 0.0).float())
    torch.testing.assert_close(got_var, torch.where(seen.unsqueeze(1), var, 1.0).float())

    # a later epoch folds with the EMA (or the cumulative average without momentum)
    features2 = torch.randn_like(features)
    count2, mean2, m2_2 = naive_accumulate(features2.reshape(b, c, h * w), bins, rows, False)
    var2 = m2_2 / (count2 - 1).clamp(min=1).unsqueeze(1)
    new_mean, new_var, new_n = pub.published_fds_update(features2, labels, got_mean, got_var, got_n, epoch=1,
                                                        start_update=0, momentum=momentum, bucket_num=nb,
                                                        bucket_start=start)
    tracked = count + count2
    factor = (torch.full_like(count, momentum) if momentum is not None
              else 1 - count2 / tracked.clamp(min=1)).unsqueeze(1)
    want_mean = torch.where(seen.unsqueeze(1), (1 - factor) * mean2 + factor * got_mean.double(), got_mean.double())
    want_var = torch.where(seen.unsqueeze(1), (1 - factor) * var2 + factor * got_var.double(), got_var.double())
    torch.testing.assert_close(new_n, tracked.float())
    torch.testing.assert_close(new_mean, want_mean.float())
    torch.testing.assert_close(new_var, want_var.float())


def test_fds_update_bad_inputs():
    features, labels = _dense_case()
    state = (torch.zeros(10, 3), torch.ones(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="num_samples_tracked"):
        pub.published_fds_update(features, labels, *state[:2], torch.zeros(9), epoch=0, bucket_num=12,
                                 bucket_start=2)
    with pytest.raises(ValueError, match="momentum"):
        pub.published_fds_update(features, labels, *state, epoch=0, momentum=1.5, bucket_num=12, bucket_start=2)
    with pytest.raises(TypeError, match="epoch"):
        pub.published_fds_update(features, labels, *state, epoch=0.5, bucket_num=12, bucket_start=2)


# ----------------------------------------------------------------------------------------------------
# Reference-style formulations of our FDS kernels (bench baselines) against the naive oracles
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gathered", "masked_loop", "sorted_loop", "grouped_mm"])
def test_recolor_formulations_match_naive(name):
    nb, b, c, h, w = 5, 2, 4, 3, 5
    dtype = torch.float32 if name == "grouped_mm" else torch.float64   # grouped_mm on CPU: fp32 only
    features = torch.randn(b, c, h, w, dtype=dtype)
    bins = torch.randint(0, nb, (b, h * w))
    bins[0, :2] = torch.tensor([0, nb - 1])
    bins[bins == 2] = 1                                            # an empty bin
    transform = torch.randn(nb, c, c, dtype=dtype)
    shift = torch.randn(nb, c, dtype=dtype)
    fn = {"gathered": pub.recolor_gathered, "masked_loop": pub.recolor_masked_loop,
          "sorted_loop": pub.recolor_sorted_loop, "grouped_mm": pub.recolor_grouped_mm}[name]
    want = naive_recolor(features.reshape(b, c, h * w), bins, transform, shift).view(b, c, h, w)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fn(features, bins, transform, shift).double(), want, **tol)
    if name == "grouped_mm":
        presorted = pub.grouped_mm_presort(bins, nb)
        torch.testing.assert_close(fn(features, bins, transform, shift, presorted).double(), want, **tol)


@pytest.mark.parametrize("full", [True, False])
def test_accumulate_formulations_match_naive(full):
    nb, b, c, h, w = 5, 2, 3, 3, 4
    features = torch.randn(b, c, h, w, dtype=torch.float64)
    bins = torch.randint(0, nb, (b, h * w))
    bins[bins == 3] = 4                                            # an empty bin
    want = naive_accumulate(features.reshape(b, c, h * w), bins, nb, full)
    for got in [pub.accumulate_masked_loop(features, bins, nb, full)] + (
            [pub.accumulate_outer(features, bins, nb)] if full else []):
        for g, x in zip(got, want):
            torch.testing.assert_close(g, x, atol=1e-12, rtol=1e-12)
