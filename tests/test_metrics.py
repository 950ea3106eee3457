"""DIR evaluation (imbreg_fast.metrics: DIRMetrics, shot_metrics) against references written here from the
literal definitions, over the concatenated kept samples:

- the DIR shot protocol (YyzHarry/imbalanced-regression agedb-dir/train.py ``shot_metrics``): a plain loop
  that bins each sample, looks up its bin's training count and puts it in its shot group; MAE / MSE / GM per
  group from the per-sample lists (math.fsum);
- the published per-unique-label procedure itself (integer labels), and the balanced bMAE / bMSE of Balanced
  MSE (jiawei-ren/BalancedMSE imdb-wiki-dir/train.py ``balanced_metrics``, ``shot_metrics_balanced``):
  mean over label classes of each class's mean error;
- the NYUD2 depth metrics (imbalanced-regression nyud2-dir/util.py ``Evaluator.evaluate``): RMSE, MAE,
  AbsRel, log10, δ1-δ3 over the valid pixels (δ with a strict <, see docs/methods.md §6);
- Pearson: two-pass centred sums in float64 (numpy) over the concatenation.
"""
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from imbreg_fast import metrics as M
from imbreg_fast.lds import bin_edges, bin_index, label_histogram
from imbreg_fast.metrics import GM_FLOOR, SHOTS, DIRMetrics, shot_metrics

INT_KEYS = ("count", "gm_floored")
BASE_KEYS = ("count", "mae", "mse", "rmse", "gm", "gm_floored", "bmae", "bmse")
DEPTH_KEYS = ("absrel", "log10", "delta1", "delta2", "delta3")


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def ref_bin(label, edges):
    """Bin [e_b, e_{b+1}) of a label, out-of-range labels in the end bins (NaN: the last bin)."""
    k = len(edges) - 1
    for b in range(1, k):
        if label < edges[b]:
            return b - 1
    return k - 1


def ref_counts(train_labels, edges):
    counts = [0] * (len(edges) - 1)
    for y in train_labels:
        counts[ref_bin(y, edges)] += 1
    return counts


def _mean(values):
    return math.fsum(values) / len(values)


def reference(pred, target, edges, counts, *, many=100, few=20, mask=None, depth=False, floor=GM_FLOOR):
    """Every key of DIRMetrics.compute() from the per-sample definitions (plain Python loops)."""
    edges = [float(e) for e in edges]
    p_all = pred.double().reshape(-1).tolist()
    g_all = target.double().reshape(-1).tolist()
    keep = [True] * len(g_all) if mask is None else mask.reshape(-1).tolist()
    groups = {shot: [] for shot in SHOTS}
    for p, g, k in zip(p_all, g_all, keep):
        if not k:
            continue
        b = ref_bin(g, edges)
        n = counts[b]
        shot = "many" if n > many else "few" if n < few else "medium"
        groups["all"].append((b, p, g))
        groups[shot].append((b, p, g))
    out = {}
    for shot, items in groups.items():
        errs = [p - g for _, p, g in items]
        out[f"{shot}/count"] = len(items)
        out[f"{shot}/gm_floored"] = sum(abs(e) < floor for e in errs)
        keys = ("mae", "mse", "rmse", "gm", "bmae", "bmse") + (DEPTH_KEYS if depth else ())
        if not items:
            out.update({f"{shot}/{key}": math.nan for key in keys})
        else:
            out[f"{shot}/mae"] = _mean([abs(e) for e in errs])
            out[f"{shot}/mse"] = _mean([e * e for e in errs])
            out[f"{shot}/rmse"] = math.sqrt(out[f"{shot}/mse"])
            out[f"{shot}/gm"] = math.exp(_mean([math.log(max(abs(e), floor)) for e in errs]))
            per_bin = defaultdict(list)
            for b, p, g in items:
                per_bin[b].append(p - g)
            out[f"{shot}/bmae"] = _mean([_mean([abs(e) for e in es]) for es in per_bin.values()])
            out[f"{shot}/bmse"] = _mean([_mean([e * e for e in es]) for es in per_bin.values()])
            if depth:
                out[f"{shot}/absrel"] = _mean([abs(p - g) / g for _, p, g in items])
                out[f"{shot}/log10"] = _mean([abs(math.log10(p) - math.log10(g)) for _, p, g in items])
                for k in (1, 2, 3):
                    out[f"{shot}/delta{k}"] = _mean([float(max(p / g, g / p) < 1.25 ** k) for _, p, g in items])
    ps = [p for _, p, _ in groups["all"]]
    gs = [g for _, _, g in groups["all"]]
    out["all/pearson"] = ref_pearson(ps, gs) if len(ps) > 1 else math.nan
    return out


def ref_pearson(ps, gs):
    mp, mg = _mean(ps), _mean(gs)
    spg = math.fsum((p - mp) * (g - mg) for p, g in zip(ps, gs))
    spp = math.fsum((p - mp) ** 2 for p in ps)
    sgg = math.fsum((g - mg) ** 2 for g in gs)
    return spg / math.sqrt(spp * sgg) if spp > 0 and sgg > 0 else math.nan


def published_protocol(pred, target, train_labels, many=100, few=20):
    """The published DIR / Balanced MSE evaluation on integer labels, from its definition: one class per
    distinct test label; a class's training count is the number of (int) training labels equal to it; group
    MSE / MAE = per-sample means over the group's classes; GM over the group's concatenated |e|; balanced =
    mean over the group's classes of each class's mean."""
    p = pred.double().numpy().reshape(-1)
    g = target.double().numpy().reshape(-1)
    train = np.asarray(train_labels).astype(int)
    classes = {"many": [], "medium": [], "few": []}
    for label in np.unique(g):
        sel = g == label
        n_train = int((train == label).sum())
        shot = "many" if n_train > many else "few" if n_train < few else "medium"
        classes[shot].append(p[sel] - g[sel])
    out = {}
    every = [e for errs in classes.values() for e in errs]
    for shot, errs in (("all", every), *classes.items()):
        e = np.concatenate(errs)
        out[f"{shot}/mse"] = float(np.mean(e ** 2))
        out[f"{shot}/mae"] = float(np.mean(np.abs(e)))
        out[f"{shot}/gm"] = float(np.exp(np.mean(np.log(np.abs(e)))))
        out[f"{shot}/bmse"] = float(np.mean([np.mean(c ** 2) for c in errs]))
        out[f"{shot}/bmae"] = float(np.mean([np.mean(np.abs(c)) for c in errs]))
        out[f"{shot}/count"] = int(e.size)
    return out


def assert_matches(ours, ref, rel=1e-11, abs_=1e-13):
    assert set(ours) == set(ref)
    for key, want in ref.items():
        got = ours[key]
        assert isinstance(got, torch.Tensor) and got.dim() == 0, key
        if key.split("/")[1] in INT_KEYS:
            assert got.dtype == torch.int64 and got.item() == want, (key, got, want)
        else:
            assert got.dtype == torch.float64, key
            if math.isnan(want):
                assert math.isnan(got.item()), (key, got)
            else:
                assert got.item() == pytest.approx(want, rel=rel, abs=abs_), key


def assert_same(a, b, rel=1e-12):
    assert set(a) == set(b)
    for key in a:
        x, y = a[key].item(), b[key].item()
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), key
        else:
            assert y == pytest.approx(x, rel=rel, abs=1e-14), key


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def skewed_labels(n, gen, lo=0.0, hi=10.0):
    """Float labels in [lo, hi), exponentially dense at lo (all shot groups present)."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return lo + torch.remainder(-torch.log1p(-u) / 0.45, hi - lo)


def regression_data(n=2000, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    train = skewed_labels(6000, gen)
    target = (torch.rand(n, generator=gen, dtype=torch.float64) * 11.0 - 0.5).to(dtype)   # some out of range
    pred = (target.double() + 0.7 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    return pred, target, train


UNEQUAL_EDGES = [0.0, 0.3, 0.5, 1.25, 2.0, 2.1, 3.5, 5.0, 7.5, 10.0]


# --------------------------------------------------------------------------------------------------
# Values against the definitions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins, range_", [(UNEQUAL_EDGES, None), (40, (0.0, 10.0)), (torch.linspace(0, 10, 21), None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_labels_match_definitions(bins, range_, dtype):
    pred, target, train = regression_data(dtype=dtype)
    edges = bin_edges(bins, range_).tolist()
    counts = ref_counts(train.tolist(), edges)
    few, many = (int(q) for q in np.quantile(counts, [1 / 3, 2 / 3]))      # every group non-empty
    metric = DIRMetrics(bins, range_, train_labels=train, many=many, few=few)
    metric.update(pred, target)
    out = metric.compute()
    ref = reference(pred, target, edges, counts, many=many, few=few)
    assert all(ref[f"{s}/count"] > 0 for s in SHOTS)
    assert_matches(out, ref)


def test_shot_rule_at_the_thresholds():
    # training counts exactly at and around the thresholds: > many is many, < few is few, else medium
    counts = torch.tensor([101.0, 100.0, 20.0, 19.0, 0.0])
    target = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 0.5], dtype=torch.float64)
    pred = target + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 3.0], dtype=torch.float64)
    out = DIRMetrics(5, (0.0, 5.0), train_counts=counts, many=100, few=20)
    out.update(pred, target)
    res = out.compute()
    assert [res[f"{s}/count"].item() for s in SHOTS] == [6, 2, 2, 2]
    assert res["many/mae"].item() == 2.0 and res["medium/mae"].item() == 2.5 and res["few/mae"].item() == 4.5
    assert res["many/bmae"].item() == 2.0            # one bin: errors 1 and 3
    assert res["all/bmae"].item() == pytest.approx((2 + 2 + 3 + 4 + 5) / 5)


def test_integer_labels_match_published_protocol():
    gen = torch.Generator().manual_seed(3)
    train = torch.clamp((-torch.log1p(-torch.rand(5000, generator=gen)) / 0.08).floor(), max=60).double()
    target = torch.randint(0, 61, (3000,), generator=gen).double()
    pred = target + 3.0 * torch.randn(3000, generator=gen, dtype=torch.float64)
    edges = torch.arange(0, 62, dtype=torch.float64)              # one bin [l, l + 1) per integer label
    res = shot_metrics(pred, target, train, edges)
    want = published_protocol(pred, target, train.numpy())
    assert all(want[f"{s}/count"] > 0 for s in SHOTS)
    for key, value in want.items():
        got = res[key].item()
        assert got == (value if key.endswith("count") else pytest.approx(value, rel=1e-11)), key


def test_depth_dense_masked_matches_nyud2_definitions():
    gen = torch.Generator().manual_seed(1)
    shape = (3, 1, 24, 32)
    train = (0.7 + torch.distributions.Gamma(4.0, 1.6).sample((40000,))).clamp(max=9.99).double()
    target = 0.5 + 9.0 * torch.rand(shape, generator=gen)
    pred = (target * torch.exp(0.15 * torch.randn(shape, generator=gen))).float()
    mask = torch.rand(shape, generator=gen) > 0.25
    target = target.masked_fill(~mask, math.nan)       # holes of a depth map
    pred = pred.masked_fill(~mask & (torch.rand(shape, generator=gen) > 0.5), math.nan)
    metric = DIRMetrics(100, (0.0, 10.0), train_labels=train, depth=True)
    metric.update(pred, target, mask)
    out = metric.compute()
    edges = bin_edges(100, (0.0, 10.0)).tolist()
    ref = reference(pred, target, edges, ref_counts(train.tolist(), edges), mask=mask, depth=True)
    assert all(ref[f"{s}/count"] > 0 for s in SHOTS)
    assert_matches(out, ref)


def test_delta_threshold_is_strict():
    # p/g exactly 1.25 (5/4) and 1.5625 (25/16): not within delta1 / delta2, within delta2 / delta3
    target = torch.tensor([4.0, 16.0, 2.0], dtype=torch.float64)
    pred = torch.tensor([5.0, 25.0, 2.0], dtype=torch.float64)
    out = DIRMetrics(1, (0.0, 100.0), train_counts=torch.tensor([500.0]), depth=True)
    out.update(pred, target)
    res = out.compute()
    assert res["all/delta1"].item() == pytest.approx(1 / 3)
    assert res["all/delta2"].item() == pytest.approx(2 / 3)
    assert res["all/delta3"].item() == 1.0


def test_input_layouts_agree():
    gen = torch.Generator().manual_seed(2)
    target = 10 * torch.rand(2, 1, 8, 9, generator=gen)
    pred = target + torch.randn(target.shape, generator=gen)
    mask = torch.rand(target.shape, generator=gen) > 0.3
    train = skewed_labels(3000, gen)
    results = []
    for shape in [(-1,), (-1, 1), (2, 8, 9), (2, 1, 8, 9)]:
        metric = DIRMetrics(UNEQUAL_EDGES, train_labels=train, depth=True)
        metric.update(pred.reshape(shape), target.reshape(shape), mask.reshape(shape))
        results.append(metric.compute())
    for other in results[1:]:
        assert_same(results[0], other, rel=0)
    flat = DIRMetrics(UNEQUAL_EDGES, train_labels=train, depth=True)
    flat.update(pred[mask], target[mask])
    assert_same(results[0], flat.compute(), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Empty groups, GM floor, Pearson accuracy
# --------------------------------------------------------------------------------------------------


def test_empty_groups_are_nan_with_count_zero():
    pred, target, train = regression_data(200)
    metric = DIRMetrics(20, (0.0, 10.0), train_labels=train, many=10 ** 9, few=0, depth=True)
    metric.update(pred.abs() + 0.1, target.abs() + 0.1)
    res = metric.compute()
    assert res["medium/count"].item() == res["all/count"].item() == 200
    for shot in ("many", "few"):
        assert res[f"{shot}/count"].item() == 0 and res[f"{shot}/gm_floored"].item() == 0
        for key in ("mae", "mse", "rmse", "gm", "bmae", "bmse") + DEPTH_KEYS:
            assert math.isnan(res[f"{shot}/{key}"].item()), key
    for key in BASE_KEYS + DEPTH_KEYS:
        assert res[f"medium/{key}"].item() == res[f"all/{key}"].item(), key


def test_nothing_kept_or_no_update_is_nan_not_a_crash():
    pred, target, train = regression_data(50)
    fresh = DIRMetrics(10, (0.0, 10.0), train_labels=train)
    with pytest.warns(UserWarning, match="compute"):
        res = fresh.compute()
    masked = DIRMetrics(10, (0.0, 10.0), train_labels=train)
    masked.update(pred, target, torch.zeros(50, dtype=torch.bool))
    masked.update(pred[:0], target[:0])
    for out in (res, masked.compute()):
        assert all(out[f"{s}/count"].item() == 0 for s in SHOTS)
        assert all(math.isnan(v.item()) for k, v in out.items() if k.split("/")[1] not in INT_KEYS)
    assert "-" in fresh.as_table()


def test_gm_floor_for_exact_zero_errors():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    pred = target + torch.tensor([0.0, 0.5, 0.0, 2.0, 1e-5], dtype=torch.float64)
    counts = torch.full((1,), 500.0)
    default = DIRMetrics(1, (0.0, 10.0), train_counts=counts)
    default.update(pred, target)
    res = default.compute()
    tiny = torch.finfo(torch.float64).tiny
    assert GM_FLOOR == tiny
    want = math.exp((2 * math.log(tiny) + math.log(0.5) + math.log(2.0) + math.log(1e-5)) / 5)
    assert res["all/gm"].item() == pytest.approx(want, rel=1e-12)
    assert res["all/gm_floored"].item() == 2
    assert res["all/mae"].item() == pytest.approx(2.50001 / 5)
    coarse = DIRMetrics(1, (0.0, 10.0), train_counts=counts, gm_floor=1e-3)
    coarse.update(pred, target)
    out = coarse.compute()
    assert out["all/gm"].item() == pytest.approx(math.exp((3 * math.log(1e-3) + math.log(0.5) + math.log(2)) / 5))
    assert out["all/gm_floored"].item() == 3
    exact = DIRMetrics(1, (0.0, 10.0), train_counts=counts, gm_floor=0.25)
    exact.update(target, target)
    assert exact.compute()["all/gm"].item() == pytest.approx(0.25, rel=1e-14)
    # an error equal to the floor is not floored; 0.375 (< 2 floors) is an ordinary error
    at = DIRMetrics(1, (0.0, 10.0), train_counts=counts, gm_floor=0.25)
    at.update(target[:4] + torch.tensor([0.0, 0.25, 0.375, 2.0], dtype=torch.float64), target[:4])
    res = at.compute()
    assert res["all/gm_floored"].item() == 1
    assert res["all/gm"].item() == pytest.approx(math.exp((2 * math.log(0.25) + math.log(0.375) + math.log(2)) / 4))


@pytest.mark.parametrize("bins, range_", [(100, (0.0, 10.0)), (1, (0.0, 10.0)), ([0.0, 4.0, 4.99, 5.0, 5.02, 10.0], None)])
def test_pearson_at_depth_scale_matches_fp64_two_pass(bins, range_):
    # p, g ~ 5 +- 0.01 (float32) over 2^21 pixels in 8 updates; raw sums would cancel ~5.4 digits
    gen = torch.Generator().manual_seed(4)
    metric = DIRMetrics(bins, range_, train_counts=torch.zeros(bin_edges(bins, range_).numel() - 1))
    ps, gs = [], []
    for _ in range(8):
        z1 = torch.randn(1, 1, 512, 512, generator=gen)
        z2 = torch.randn(1, 1, 512, 512, generator=gen)
        p = 5.0 + 0.01 * z1
        g = 5.0 + 0.01 * (0.8 * z1 + 0.6 * z2)
        metric.update(p, g)
        ps.append(p.double().numpy().ravel())
        gs.append(g.double().numpy().ravel())
    p, g = np.concatenate(ps), np.concatenate(gs)
    dp, dg = p - p.mean(), g - g.mean()
    want = float(np.dot(dp, dg) / np.sqrt(np.dot(dp, dp) * np.dot(dg, dg)))
    # ~1e-12: the rounding of index_add_'s sequential per-bin sums (raw sums of p, p^2: ~1e-7)
    assert abs(metric.compute()["all/pearson"].item() - want) < 5e-12


def test_pearson_degenerate_is_nan():
    metric = DIRMetrics(4, (0.0, 4.0), train_counts=torch.ones(4))
    metric.update(torch.tensor([1.0, 2.0, 3.0]), torch.full((3,), 2.5))
    assert math.isnan(metric.compute()["all/pearson"].item())


def test_unmasked_nan_makes_its_group_nan():
    counts = torch.tensor([500.0, 0.0])
    metric = DIRMetrics(2, (0.0, 2.0), train_counts=counts)
    metric.update(torch.tensor([0.5, math.nan, 1.2]), torch.tensor([0.4, 0.6, 1.5]))
    res = metric.compute()
    assert math.isnan(res["many/mae"].item()) and math.isnan(res["all/mae"].item())
    assert res["few/mae"].item() == pytest.approx(0.3, rel=1e-6) and res["all/count"].item() == 3


# --------------------------------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------------------------------


def _edge_probes(edges):
    e = torch.as_tensor(edges, dtype=torch.float64)
    up = torch.nextafter(e, torch.full_like(e, math.inf))
    down = torch.nextafter(e, torch.full_like(e, -math.inf))
    mids = (e[1:] + e[:-1]) / 2
    extra = torch.tensor([math.inf, -math.inf, math.nan, -1e300, 1e300, e[0] - 1, e[-1] + 1], dtype=torch.float64)
    return torch.cat([e, up, down, mids, extra, torch.rand(500, dtype=torch.float64) * (e[-1] - e[0]) + e[0]])


@pytest.mark.parametrize("bins, range_, uniform", [
    (100, (0.0, 10.0), True), (7, (-3.3, 1e4), True), (1, (2.0, 3.0), True), (1000, (-1e-3, 1e-3), True),
    (torch.arange(0, 101, dtype=torch.float64) * 0.1, None, True), (UNEQUAL_EDGES, None, False),
    ([0.0, 1.0, 10.0], None, False)])
def test_bins_are_lds_bin_index(bins, range_, uniform):
    metric = DIRMetrics(bins, range_, train_counts=torch.zeros(bin_edges(bins, range_).numel() - 1))
    assert (metric._uniform is not None) == uniform
    for dtype in (torch.float64, torch.float32):
        metric.reset()
        labels = _edge_probes(metric.edges).to(dtype)
        metric.update(labels, labels)
        want = torch.bincount(bin_index(labels, metric.edges), minlength=metric.num_bins).double()
        assert torch.equal(metric.count, want)


def test_train_counts_equal_train_labels():
    pred, target, train = regression_data(500)
    a = DIRMetrics(UNEQUAL_EDGES, train_labels=train, many=200, few=50)
    b = DIRMetrics(UNEQUAL_EDGES, train_counts=label_histogram(train, UNEQUAL_EDGES), many=200, few=50)
    c = DIRMetrics(UNEQUAL_EDGES, train_counts=label_histogram(train, UNEQUAL_EDGES).long(), many=200, few=50)
    for m in (a, b, c):
        m.update(pred, target)
    assert torch.equal(a.train_counts, b.train_counts) and a.train_counts.dtype == torch.float64
    assert_same(a.compute(), b.compute(), rel=0)
    assert_same(a.compute(), c.compute(), rel=0)


# --------------------------------------------------------------------------------------------------
# Streaming: splits, chunks, reset, merge, distributed sum, forward
# --------------------------------------------------------------------------------------------------


def _metric(train, depth=True, **kwargs):
    return DIRMetrics(UNEQUAL_EDGES, train_labels=train, many=600, few=200, depth=depth, **kwargs)


def _positive_data(n=3000, seed=5):
    pred, target, train = regression_data(n, seed=seed)
    return pred.abs() + 0.05, target.abs() + 0.05, train


def test_many_updates_equal_one_update():
    pred, target, train = _positive_data()
    mask = torch.rand(pred.shape) > 0.1
    one = _metric(train)
    one.update(pred, target, mask)
    split = _metric(train)
    bounds = [0, 1, 1, 17, 400, 401, 1999, 3000]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        split.update(pred[lo:hi], target[lo:hi], mask[lo:hi])
    assert split.update_count == len(bounds) - 1
    assert_same(one.compute(), split.compute(), rel=1e-12)


def test_slabs_of_update_do_not_change_the_result(monkeypatch):
    pred, target, train = _positive_data(2000)
    mask = torch.rand(pred.shape) > 0.2
    whole = _metric(train)
    whole.update(pred, target, mask)
    monkeypatch.setitem(M.CHUNK_ELEMENTS, "cpu", 7)
    slabs = _metric(train)
    slabs.update(pred, target, mask)
    assert_same(whole.compute(), slabs.compute(), rel=1e-12)
    edges = [float(e) for e in UNEQUAL_EDGES]
    ref = reference(pred, target, edges, ref_counts(train.tolist(), edges), many=600, few=200, mask=mask, depth=True)
    assert all(ref[f"{s}/count"] > 0 for s in SHOTS)
    assert_matches(slabs.compute(), ref)


def test_reset():
    pred, target, train = _positive_data(300)
    metric = _metric(train)
    metric.update(pred * 3, target)
    metric.reset()
    assert all(bool((getattr(metric, name) == 0).all()) for name in metric._state_names)
    metric.update(pred, target)
    fresh = _metric(train)
    fresh.update(pred, target)
    assert_same(metric.compute(), fresh.compute(), rel=0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric DIRMetrics was called before")
def test_merge_state_and_two_process_sum_equal_one_process():
    pred, target, train = _positive_data()
    whole = _metric(train)
    whole.update(pred, target)
    want = whole.compute()
    a, b = _metric(train), _metric(train)
    a.update(pred[:1234], target[:1234])
    b.update(pred[1234:], target[1234:])
    merged = _metric(train)
    merged.merge_state(a)
    merged.merge_state(b)
    assert_same(want, merged.compute(), rel=1e-12)

    # what torchmetrics does in compute() with two processes: gather each state from both ranks and reduce
    # it with its registered dist_reduce_fx (sum for every state), then restore the local states
    other = {}

    def all_gather(tensor, group=None):
        return [tensor, other[id(tensor)]]

    rank0 = _metric(train, dist_sync_fn=all_gather, distributed_available_fn=lambda: True)
    rank1 = _metric(train)
    rank0.update(pred[:1234], target[:1234])
    rank1.update(pred[1234:], target[1234:])
    other.update({id(getattr(rank0, name)): getattr(rank1, name) for name in rank0._state_names})
    local = {name: getattr(rank0, name).clone() for name in rank0._state_names}
    assert_same(want, rank0.compute(), rel=1e-12)
    assert all(torch.equal(getattr(rank0, name), local[name]) for name in rank0._state_names)


def test_forward_returns_the_batch_and_accumulates():
    pred, target, train = _positive_data(600)
    metric = _metric(train)
    first = metric(pred[:250], target[:250])
    alone = _metric(train)
    alone.update(pred[:250], target[:250])
    assert_same(first, alone.compute(), rel=0)
    metric(pred[250:], target[250:])
    whole = _metric(train)
    whole.update(pred, target)
    assert_same(whole.compute(), metric.compute(), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Device, dtype, state_dict
# --------------------------------------------------------------------------------------------------


def test_to_dtype_keeps_float64_states_and_values():
    pred, target, train = _positive_data(800)
    metric = _metric(train)
    metric.update(pred[:400], target[:400])
    before = {k: v.clone() for k, v in metric.compute().items()}
    for cast in (lambda m: m.to(torch.float64), lambda m: m.to(torch.float32), lambda m: m.set_dtype(torch.float16),
                 lambda m: m.half(), lambda m: m.to("cpu")):
        metric = cast(metric)
        assert metric.edges.dtype == metric.train_counts.dtype == metric._centres.dtype == torch.float64
        assert all(getattr(metric, name).dtype == torch.float64 for name in metric._state_names)
        metric._computed = None
        assert_same(before, metric.compute(), rel=0)
    metric.update(pred[400:], target[400:])
    whole = _metric(train)
    whole.update(pred, target)
    assert_same(whole.compute(), metric.compute(), rel=1e-12)


def test_device_move_and_wrong_device():
    pred, target, train = _positive_data(50)
    metric = _metric(train).to("meta")
    assert metric.edges.device.type == metric.count.device.type == metric._upper.device.type == "meta"
    with pytest.raises(ValueError, match="metric is on meta"):
        metric.update(pred, target)
    cpu = _metric(train)
    with pytest.raises(ValueError, match="mask"):
        cpu.update(pred, target, torch.ones(50, dtype=torch.bool, device="meta"))


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric DIRMetrics was called before")
def test_state_dict_round_trip():
    pred, target, train = _positive_data(900)
    metric = _metric(train)
    metric.update(pred[:500], target[:500])
    assert set(metric.state_dict()) == {"edges", "train_counts"}           # torchmetrics default
    metric.persistent(True)
    saved = metric.state_dict()
    assert {"edges", "train_counts", "count", "sum_pg", "n_delta3"} <= set(saved)
    # a metric built with other bins and counts of the same sizes takes over everything, derived tables included
    restored = DIRMetrics(len(UNEQUAL_EDGES) - 1, (50.0, 60.0), train_counts=torch.zeros(len(UNEQUAL_EDGES) - 1),
                          many=600, few=200, depth=True)
    assert restored._uniform is not None
    restored.load_state_dict(saved)
    assert restored._uniform is None and torch.equal(restored.edges, metric.edges)
    assert torch.equal(restored._centres, metric._centres)
    assert_same(metric.compute(), restored.compute(), rel=0)
    for m in (metric, restored):
        m.update(pred[500:], target[500:])
    assert_same(metric.compute(), restored.compute(), rel=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_synchronise_on_cuda():
    pred, target, train = _positive_data(5000)
    metric = _metric(train).to("cuda")
    pred, target = pred.cuda(), target.cuda()
    mask = torch.rand(pred.shape, device="cuda") > 0.1
    metric.update(pred, target, mask)
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(pred, target, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = _metric(train)
    cpu.update(pred.cpu(), target.cpu(), mask.cpu())
    cpu.update(pred.cpu(), target.cpu(), mask.cpu())
    assert_same(cpu.compute(), {k: v.cpu() for k, v in metric.compute().items()}, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Table and functional form
# --------------------------------------------------------------------------------------------------


def test_as_table():
    pred, target, train = _positive_data(1000)
    metric = _metric(train, depth=False)
    metric.update(pred, target)
    res = metric.compute()
    assert all(res[f"{s}/count"] > 0 for s in SHOTS)
    lines = metric.as_table(digits=4).splitlines()
    assert lines[0].split() == ["MSE", "MAE", "GM", "bMSE", "bMAE", "Count"]
    for line, (label, shot) in zip(lines[2:6], [("All", "all"), ("Many", "many"), ("Med.", "medium"), ("Few", "few")]):
        cells = line.split()
        assert cells[0] == label
        assert cells[1:6] == [f"{res[f'{shot}/{k}'].item():.4f}" for k in ("mse", "mae", "gm", "bmse", "bmae")]
        assert cells[6] == str(res[f"{shot}/count"].item())
    assert lines[6] == f"Pearson (all): {res['all/pearson'].item():.4f}"
    depth = _metric(train)
    depth.update(pred, target)
    head = depth.as_table().splitlines()[0].split()
    assert head == ["MSE", "MAE", "GM", "bMSE", "bMAE", "RMSE", "AbsRel", "log10", "δ1", "δ2", "δ3", "Count"]
    empty = DIRMetrics(UNEQUAL_EDGES, train_labels=train, many=10 ** 9, few=0)
    empty.update(pred, target)
    assert empty.as_table().splitlines()[3].split() == ["Many"] + ["-"] * 5 + ["0"]


def test_shot_metrics_is_one_update_of_dirmetrics():
    pred, target, train = _positive_data(700)
    mask = torch.rand(pred.shape) > 0.3
    metric = DIRMetrics(40, (0.0, 10.0), train_labels=train, many=150, few=30, depth=True, gm_floor=1e-4)
    metric.update(pred, target, mask)
    res = shot_metrics(pred, target, train, 40, (0.0, 10.0), many=150, few=30, mask=mask, depth=True,
                       gm_floor=1e-4)
    assert_same(metric.compute(), res, rel=0)
    assert list(res)[:9] == ["all/count", "all/mae", "all/mse", "all/rmse", "all/gm", "all/gm_floored",
                             "all/bmae", "all/bmse", "all/pearson"]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_construction():
    counts = torch.ones(4)
    with pytest.raises(ValueError, match="train_counts.*neither"):
        DIRMetrics(4, (0, 1))
    with pytest.raises(ValueError, match="train_counts.*both"):
        DIRMetrics(4, (0, 1), train_counts=counts, train_labels=torch.rand(5))
    for bad in (torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([1.0, math.nan, 0, 0]),
                torch.tensor([1.0, math.inf, 0, 0])):
        with pytest.raises(ValueError, match="train_counts must be finite and >= 0"):
            DIRMetrics(4, (0, 1), train_counts=bad)
    with pytest.raises(ValueError, match=r"train_counts must have shape \[K\] = \[4\]"):
        DIRMetrics(4, (0, 1), train_counts=torch.ones(5))
    with pytest.raises(TypeError, match="train_counts"):
        DIRMetrics(4, (0, 1), train_counts=[1, 2, 3, 4])
    with pytest.raises(TypeError, match="train_counts"):
        DIRMetrics(4, (0, 1), train_counts=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="train_labels"):
        DIRMetrics(4, (0, 1), train_labels=torch.tensor([0.5, math.nan]))
    with pytest.raises(TypeError, match="train_labels"):
        DIRMetrics(4, (0, 1), train_labels=torch.tensor([True]))
    for edges in ([0.0, 2.0, 1.0, 3.0], [0.0, 1.0, 1.0, 2.0], [0.0, math.inf], [0.0]):
        with pytest.raises(ValueError, match="bins"):
            DIRMetrics(edges, train_counts=torch.ones(max(1, len(edges) - 1)))
    with pytest.raises(ValueError, match="range"):
        DIRMetrics(4, train_counts=counts)
    with pytest.raises(ValueError, match="many must be >= few"):
        DIRMetrics(4, (0, 1), train_counts=counts, many=10, few=20)
    with pytest.raises(ValueError, match="few"):
        DIRMetrics(4, (0, 1), train_counts=counts, few=-1)
    with pytest.raises(TypeError, match="many"):
        DIRMetrics(4, (0, 1), train_counts=counts, many=100.0)
    with pytest.raises(TypeError, match="depth"):
        DIRMetrics(4, (0, 1), train_counts=counts, depth=1)
    for floor in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="gm_floor"):
            DIRMetrics(4, (0, 1), train_counts=counts, gm_floor=floor)
    ok = DIRMetrics(4, (0, 1), train_counts=counts, many=20, few=20)       # many == few: no medium bins
    with pytest.raises(ValueError, match="digits"):
        ok.as_table(digits=-1)


def test_bad_update():
    metric = DIRMetrics(4, (0, 1), train_counts=torch.ones(4))
    x = torch.rand(6)
    with pytest.raises(ValueError, match="pred and target must have the same shape"):
        metric.update(x, torch.rand(7))
    with pytest.raises(TypeError, match="pred must have a floating dtype"):
        metric.update(torch.ones(6, dtype=torch.int64), x)
    with pytest.raises(TypeError, match="target must have a floating dtype"):
        metric.update(x, torch.ones(6, dtype=torch.int64))
    with pytest.raises(TypeError, match="same dtype"):
        metric.update(x, x.double())
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        metric.update(x.tolist(), x)
    for shape in [(3, 2), (1, 2, 3, 1), (2, 3, 1, 1, 1)]:
        with pytest.raises(ValueError, match=r"\[N\], \[N, 1\], \[B, H, W\] or dense \[B, 1, H, W\]"):
            metric.update(torch.rand(shape), torch.rand(shape))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        metric.update(x, x, torch.ones(6))
    with pytest.raises(ValueError, match="mask must have shape"):
        metric.update(x, x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        metric.update(x.reshape(6, 1), x.reshape(6, 1), torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="pred"):
        shot_metrics([1.0], x, x, 4, (0, 1))
    assert all(bool((getattr(metric, n) == 0).all()) for n in metric._state_names)     # nothing half-added


def test_per_bin_matches_a_plain_loop():
    """per_bin(): count, MAE, MSE, RMSE of each bin over several updates with a mask; NaN for an empty bin."""
    gen = torch.Generator().manual_seed(3)
    edges = [0.0, 1.0, 2.5, 4.0, 5.0]
    metric = DIRMetrics(torch.tensor(edges, dtype=torch.float64), train_counts=torch.tensor([5.0, 50, 500, 0]))
    sums = defaultdict(lambda: [0, 0.0, 0.0])
    for _ in range(3):
        target = torch.rand(40, generator=gen, dtype=torch.float64) * 3.9
        pred = target + torch.randn(40, generator=gen, dtype=torch.float64)
        mask = torch.rand(40, generator=gen) > 0.3
        metric.update(pred, target, mask)
        for p, t, m in zip(pred.tolist(), target.tolist(), mask.tolist()):
            if m:
                b = max(i for i in range(4) if t >= edges[i])
                sums[b][0] += 1
                sums[b][1] += abs(p - t)
                sums[b][2] += (p - t) ** 2
    out = metric.per_bin()
    assert set(out) == {"count", "mae", "mse", "rmse"}
    for b in range(4):
        n, a, q = sums[b]
        assert out["count"][b].item() == n
        if n == 0:
            assert all(math.isnan(out[k][b].item()) for k in ("mae", "mse", "rmse"))
        else:
            assert out["mae"][b].item() == pytest.approx(a / n, rel=1e-12)
            assert out["mse"][b].item() == pytest.approx(q / n, rel=1e-12)
            assert out["rmse"][b].item() == pytest.approx(math.sqrt(q / n), rel=1e-12)
    assert sums[3][0] == 0 and sums[0][0] > 0
