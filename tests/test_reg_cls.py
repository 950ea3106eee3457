"""imbreg_fast.reg_cls (docs/methods.md §4): ClassBins, balanced_class_mask, RegClsLoss.

Every value is checked against plain-loop references written here from the paper's rule (and the published
code SilviaLauraPintea/reg-cls, read, not imported): fine histogram, histogram equalisation, keep
probabilities, class assignment, cross-entropy over kept labels and the λ weighting.
"""
import copy
import io
import math

import pytest
import torch

import imbreg_fast._validation as V
from imbreg_fast.functional import weighted_mse_loss
from imbreg_fast.lds import bin_edges, label_histogram
from imbreg_fast.nn import BMCLoss
from imbreg_fast.reg_cls import ClassBins, RegClsLoss, balanced_class_mask, equalize_histogram

# --------------------------------------------------------------------------------------------------
# Plain-loop references
# --------------------------------------------------------------------------------------------------


def ref_fine_edges(num_bins, lo, hi):
    return [lo + (hi - lo) * i / num_bins for i in range(num_bins + 1)]


def ref_bin(v, edges):
    """Bin of one value: [e_b, e_b+1), out-of-range clamped to the end bins."""
    k = len(edges) - 1
    for b in range(k):
        if v < edges[b + 1]:
            return b
    return k - 1


def ref_histogram(values, edges):
    h = [0.0] * (len(edges) - 1)
    for v in values:
        h[ref_bin(v, edges)] += 1.0
    return h


def ref_equalize(hist, edges, num_classes):
    """The paper's rule, one fine bin at a time: (class edges, class counts)."""
    first = 0
    while hist[first] == 0:
        first += 1
    h = hist[first:]
    total = sum(h)
    slots = min(num_classes, len(h))
    q, cum = [], 0.0
    for x in h:
        cum += x
        q.append(max(round((slots / total) * cum) - 1, 0))     # Python round: half to even
    class_edges, class_counts = [edges[0]], []
    for j, x in enumerate(h):
        if j > 0 and q[j] != q[j - 1]:
            class_edges.append(edges[first + j])
            class_counts.append(0.0)
        if j == 0:
            class_counts.append(0.0)
        class_counts[-1] += x
    class_edges.append(edges[-1])
    return class_edges, class_counts


def ref_keep_prob(counts):
    smallest = min(c for c in counts if c > 0)
    return [smallest / c if c > 0 else 1.0 for c in counts]


def ref_ce(logits_rows, labels):
    """Mean over (row, label) pairs of -log softmax(row)[label]; 0 when there is none."""
    terms = []
    for row, c in zip(logits_rows, labels):
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        terms.append(lse - row[c])
    return sum(terms) / len(terms) if terms else 0.0


def ref_total(reg, ce, lam):
    return lam * reg + ce if lam > 1 else reg + ce / lam


def tol_close(a, b, rtol=1e-10, atol=1e-12):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# ClassBins.fit: binning and equalisation
# --------------------------------------------------------------------------------------------------


def _datasets():
    g = torch.Generator().manual_seed(1)
    return {
        "exp_float": torch.distributions.Exponential(0.3).sample((500,)).double() + 1.0,
        "normal_float32": (torch.randn(777, generator=g) * 3 + 1).float(),
        "ages_int": torch.randint(0, 100, (400,), generator=g) // (1 + torch.randint(0, 4, (400,), generator=g)),
        "skewed_int": torch.cat([torch.zeros(300, dtype=torch.int64), torch.arange(50), torch.full((5,), 90)]),
    }


@pytest.mark.parametrize("name", list(_datasets()))
@pytest.mark.parametrize("num_classes,num_bins", [(2, None), (5, None), (10, None), (4, 12), (10, 100)])
@pytest.mark.parametrize("range_", [None, "wide"])
def test_fit_matches_loop_reference(name, num_classes, num_bins, range_):
    y = _datasets()[name]
    lo, hi = float(y.min()), float(y.max())
    rng = None if range_ is None else (lo - 0.37 * (hi - lo), hi + 0.21 * (hi - lo))   # leading + trailing empties
    k = num_bins or num_classes
    edges = bin_edges(k, rng or (lo, hi)).tolist()     # the same float64 edges (torch.linspace)
    hist = ref_histogram(y.double().tolist(), edges)
    exp_edges, exp_counts = ref_equalize(hist, edges, num_classes)
    try:
        bins = ClassBins.fit(y, num_classes, rng, num_bins=num_bins)
    except ValueError as exc:
        assert len(exp_counts) < 2, exc
        assert "one class" in str(exc)
        return
    assert len(exp_counts) >= 2
    assert bins.num_classes == len(exp_counts) <= num_classes
    assert bins.num_classes <= sum(1 for x in hist if x > 0)
    assert bins.edges.dtype == bins.counts.dtype == torch.float64
    tol_close(bins.edges, exp_edges, rtol=0, atol=0)
    tol_close(bins.counts, exp_counts, rtol=0, atol=0)
    tol_close(bins.keep_prob, ref_keep_prob(exp_counts))
    assert float(bins.counts.sum()) == y.numel()


def test_fine_edges_are_uniform_over_the_data_range():
    y = torch.tensor([2.0, 3.0, 5.0, 9.5, 10.0])
    bins = ClassBins.fit(y, 4, equalize=False)
    tol_close(bins.edges, ref_fine_edges(4, 2.0, 10.0), rtol=0, atol=1e-15)
    tol_close(bins.counts, [2.0, 1.0, 0.0, 2.0], rtol=0, atol=0)       # 10.0 == hi: last bin


def test_equalize_rounds_half_to_even():
    # fine counts [3, 2, 1] over (0, 3), T = 3, N = 6: (T/N)·S = [1.5, 2.5, 3] -> round half-even [2, 2, 3]
    # -> q = [1, 1, 2]: classes {bins 0, 1}, {bin 2}. (Rounding half up would give q = [1, 2, 2].)
    y = torch.tensor([0.5] * 3 + [1.5] * 2 + [2.5])
    bins = ClassBins.fit(y, 3, range=(0.0, 3.0))
    tol_close(bins.edges, [0.0, 2.0, 3.0], rtol=0, atol=0)
    tol_close(bins.counts, [5.0, 1.0], rtol=0, atol=0)
    tol_close(bins.keep_prob, [0.2, 1.0])
    first, starts = equalize_histogram(torch.tensor([3.0, 2.0, 1.0]), 3)
    assert int(first) == 0 and starts.tolist() == [0, 2]


def test_equalize_targets_on_fine_edges_go_up():
    # range (0, 8), 8 bins: integer edges, exact in float64; a target equal to an edge is in the bin above
    y = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.int64)
    bins = ClassBins.fit(y, 8, range=(0, 8), equalize=False)
    tol_close(bins.counts, [1, 2, 1, 1, 1, 1, 1, 2], rtol=0, atol=0)   # 8 == hi joins the last bin
    assert bins.assign(torch.tensor([1.0, 7.999, 8.0, 2.0])).tolist() == [1, 7, 7, 2]


def test_leading_empty_bins_are_dropped_and_classes_tile_the_range():
    # targets in [6, 10) of range (0, 10): the first 6 fine bins are empty; T = 4 remaining bins
    y = torch.tensor([6.5] * 4 + [7.5] * 4 + [8.5] * 4 + [9.5] * 4)
    bins = ClassBins.fit(y, 10, range=(0.0, 10.0))
    # N = 16, T = 4: (4/16)·[4, 8, 12, 16] = [1, 2, 3, 4] -> q = [0, 1, 2, 3]: 4 classes of 4
    tol_close(bins.edges, [0.0, 7.0, 8.0, 9.0, 10.0], rtol=0, atol=1e-15)
    tol_close(bins.counts, [4.0] * 4, rtol=0, atol=0)
    tol_close(bins.keep_prob, [1.0] * 4)
    # without dropping, T would be 10 and the classes different: the rule uses the bins left after the drop
    first, starts = equalize_histogram(torch.tensor([0.0] * 6 + [4.0] * 4), 10)
    assert int(first) == 6 and starts.tolist() == [6, 7, 8, 9]


def test_trailing_and_inner_empty_bins_join_the_class_before():
    y = torch.tensor([0.5] * 5 + [2.5] * 5)           # bins of (0, 5): [5, 0, 5, 0, 0]
    bins = ClassBins.fit(y, 5, range=(0.0, 5.0))
    # T = 5, N = 10: 0.5·[5, 5, 10, 10, 10] = [2.5, 2.5, 5, 5, 5] -> round [2, 2, 5, 5, 5] -> q [1, 1, 4, 4, 4]
    tol_close(bins.edges, [0.0, 2.0, 5.0], rtol=0, atol=0)
    tol_close(bins.counts, [5.0, 5.0], rtol=0, atol=0)


def test_more_classes_than_nonempty_bins_gives_fewer_classes():
    y = torch.tensor([1.0] * 10 + [2.0] * 10 + [3.0] * 10)
    bins = ClassBins.fit(y, 10)                       # 10 fine bins, 3 non-empty
    assert bins.num_classes == 3
    tol_close(bins.counts, [10.0, 10.0, 10.0], rtol=0, atol=0)
    assert bins.assign(y).tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_all_targets_in_one_class_is_an_error():
    y = torch.cat([torch.zeros(99), torch.ones(1)])
    with pytest.raises(ValueError, match="one class"):
        ClassBins.fit(y, 2)
    bins = ClassBins.fit(y, 2, equalize=False)        # the unequalised bins are still available
    tol_close(bins.counts, [99.0, 1.0], rtol=0, atol=0)
    tol_close(bins.keep_prob, [1 / 99, 1.0])


def test_unequalised_empty_class_keeps_probability_one():
    bins = ClassBins.fit(torch.tensor([0.1, 0.2, 0.3, 3.9]), 4, range=(0.0, 4.0), equalize=False)
    tol_close(bins.counts, [3.0, 0.0, 0.0, 1.0], rtol=0, atol=0)
    tol_close(bins.keep_prob, [1 / 3, 1.0, 1.0, 1.0])


def test_fit_with_mask_equals_fit_on_kept_values():
    g = torch.Generator().manual_seed(3)
    depth = torch.rand(2, 1, 7, 9, generator=g) * 10
    valid = torch.rand(2, 1, 7, 9, generator=g) < 0.7
    depth[~valid] = float("nan")                      # holes: never read
    a = ClassBins.fit(depth, 6, mask=valid, num_bins=30)
    b = ClassBins.fit(depth[valid], 6, num_bins=30)
    tol_close(a.edges, b.edges, rtol=0, atol=0)
    tol_close(a.counts, b.counts, rtol=0, atol=0)


def test_from_histogram_equals_fit_and_sums_over_batches():
    g = torch.Generator().manual_seed(4)
    y = torch.distributions.Gamma(2.0, 0.5).sample((600,)).clamp(max=19.9)
    edges = bin_edges(40, (0.0, 20.0))
    counts = sum(label_histogram(part, edges) for part in y.split(97))
    a = ClassBins.from_histogram(counts, edges, 8)
    b = ClassBins.fit(y, 8, range=(0.0, 20.0), num_bins=40)
    tol_close(a.edges, b.edges, rtol=0, atol=0)
    tol_close(a.counts, b.counts, rtol=0, atol=0)
    # non-uniform fine edges are allowed
    c = ClassBins.from_histogram(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 1.0, 5.0, 6.0]), 3)
    tol_close(c.edges, [0.0, 1.0, 5.0, 6.0], rtol=0, atol=0)


def test_reference_first_class_starts_at_range_low():
    # the published code keeps ranges[0] as the first class's lower edge after dropping leading empty bins;
    # so do we (classes tile the range), which only matters for class_centers
    bins = ClassBins.fit(torch.tensor([8.5, 8.6, 9.5, 9.6]), 10, range=(0.0, 10.0))
    assert float(bins.edges[0]) == 0.0
    tol_close(bins.class_centers, [4.5, 9.5], rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# assign
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32])
def test_assign_dense_map_matches_loop(dtype):
    g = torch.Generator().manual_seed(5)
    train = torch.distributions.Exponential(0.4).sample((2000,)) * 3
    bins = ClassBins.fit(train, 12, num_bins=60)
    edges = bins.edges.tolist()
    y = (torch.rand(3, 1, 5, 6, generator=g) * 40 - 5)      # includes out-of-range on both sides
    y = y.to(dtype)
    got = bins.assign(y)
    assert got.dtype == torch.int64 and got.shape == y.shape
    expected = [ref_bin(v, edges) for v in y.double().reshape(-1).tolist()]
    assert got.reshape(-1).tolist() == expected


def test_assign_out_of_range_and_nan():
    bins = ClassBins.fit(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2)          # edges [0, 1.5, 3]
    got = bins.assign(torch.tensor([-1e30, -0.0, 1.4999, 1.5, 3.0, 1e30, float("inf"), -float("inf"),
                                    float("nan")]))
    assert got.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 1]
    assert bins(torch.tensor([[0.2]])).tolist() == [[0]]                 # forward is assign


def test_assign_requires_the_tables_device():
    bins = ClassBins.fit(torch.arange(10.0), 3).to("meta")
    assert bins.edges.device.type == "meta" and bins.edges.dtype == torch.float64
    with pytest.raises(ValueError, match="move the module"):
        bins.assign(torch.ones(3))


# --------------------------------------------------------------------------------------------------
# nn.Module behaviour: state_dict, dtype
# --------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_into_fresh_module():
    bins = ClassBins.fit(torch.distributions.Exponential(1.0).sample((300,)), 7, num_bins=35)
    buf = io.BytesIO()
    torch.save(bins.state_dict(), buf)
    buf.seek(0)
    fresh = ClassBins()
    assert not fresh.fitted and "empty" in repr(fresh)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.fitted and fresh.num_classes == bins.num_classes
    tol_close(fresh.edges, bins.edges, rtol=0, atol=0)
    tol_close(fresh.counts, bins.counts, rtol=0, atol=0)
    tol_close(fresh.keep_prob, bins.keep_prob, rtol=0, atol=0)
    y = torch.randn(50).abs() * 3
    assert torch.equal(fresh.assign(y), bins.assign(y))
    # and into a module holding another fit (different sizes)
    other = ClassBins.fit(torch.arange(100.0), 3)
    other.load_state_dict(bins.state_dict())
    assert torch.equal(other.edges, bins.edges)


def test_state_dict_of_the_loss_restores_bins_and_regression_module():
    bins = ClassBins.fit(torch.arange(40.0), 4)
    criterion = RegClsLoss(BMCLoss(0.7), bins, lam=3.0)
    with torch.no_grad():
        criterion.regression_loss.noise_sigma.fill_(1.3)
    sd = criterion.state_dict()
    assert set(sd) == {"regression_loss.noise_sigma", "class_bins.edges", "class_bins.counts"}
    restored = RegClsLoss(BMCLoss(0.7), ClassBins(), lam=3.0)
    restored.load_state_dict(sd)
    assert torch.equal(restored.class_bins.edges, bins.edges)
    assert float(restored.regression_loss.noise_sigma.detach()) == pytest.approx(1.3)
    assert [n for n, _ in criterion.named_parameters()] == ["regression_loss.noise_sigma"]


def test_inconsistent_state_dict_is_refused():
    with pytest.raises(RuntimeError, match="inconsistent tables"):
        ClassBins().load_state_dict({"edges": torch.zeros(3, dtype=torch.float64),
                                     "counts": torch.ones(3, dtype=torch.float64)})


def test_dtype_casts_keep_float64_tables():
    bins = ClassBins.fit(torch.tensor([7.2, 7.25, 7.3, 7.31, 7.4]), 3)
    edges = bins.edges.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(bins)
        assert bins.edges.dtype == torch.float64 and torch.equal(bins.edges, edges)
    criterion = RegClsLoss(weighted_mse_loss, bins).half()
    assert criterion.class_bins.edges.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# balanced_class_mask
# --------------------------------------------------------------------------------------------------


def test_mask_reproducible_with_generator():
    classes = torch.randint(0, 4, (3, 5, 7))
    p = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    a = balanced_class_mask(classes, p, torch.Generator().manual_seed(11))
    b = balanced_class_mask(classes, p, torch.Generator().manual_seed(11))
    c = balanced_class_mask(classes, p, torch.Generator().manual_seed(12))
    assert a.dtype == torch.bool and a.shape == classes.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the documented draw: keep iff u < p[class], u = torch.rand(shape) of keep_prob's dtype
    u = torch.rand(classes.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = [u.reshape(-1)[i].item() < p[c].item() for i, c in enumerate(classes.reshape(-1).tolist())]
    assert a.reshape(-1).tolist() == expected
    # a fresh draw each call from the same generator
    g = torch.Generator().manual_seed(11)
    assert not torch.equal(balanced_class_mask(classes, p, g), balanced_class_mask(classes, p, g))


def test_mask_empirical_keep_rate_per_class():
    p = torch.tensor([0.02, 0.25, 0.5, 0.8, 1.0], dtype=torch.float64)
    classes = torch.randint(0, 5, (400_000,), generator=torch.Generator().manual_seed(0))
    keep = balanced_class_mask(classes, p, torch.Generator().manual_seed(21))
    for c in range(5):
        sel = classes == c
        n = int(sel.sum())
        rate = float(keep[sel].double().mean())
        sd = math.sqrt(p[c] * (1 - p[c]) / n)
        assert abs(rate - float(p[c])) <= 6 * sd + 1e-12, (c, rate)
    assert bool(keep[classes == 4].all())


def test_mask_extremes_and_negative_classes():
    classes = torch.tensor([[0, 1, -1, -100], [1, 0, 1, 0]])
    keep = balanced_class_mask(classes, torch.tensor([1.0, 0.0]))
    assert keep.tolist() == [[True, False, False, False], [False, True, False, True]]
    assert balanced_class_mask(torch.zeros(0, dtype=torch.int64), torch.tensor([0.5])).shape == (0,)


def test_mask_bad_input():
    p = torch.tensor([0.5, 1.0])
    with pytest.raises(TypeError, match="classes"):
        balanced_class_mask(torch.zeros(3), p)
    with pytest.raises(TypeError, match="classes"):
        balanced_class_mask(torch.zeros(3, dtype=torch.bool), p)
    with pytest.raises(TypeError, match="keep_prob"):
        balanced_class_mask(torch.zeros(3, dtype=torch.int64), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="keep_prob"):
        balanced_class_mask(torch.zeros(3, dtype=torch.int64), torch.ones(2, 2))
    with pytest.raises(TypeError, match="generator"):
        balanced_class_mask(torch.zeros(3, dtype=torch.int64), p, generator=0)
    with pytest.raises(ValueError, match="keep_prob is on"):
        balanced_class_mask(torch.zeros(3, dtype=torch.int64), p.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a device generator")
def test_mask_cuda_generator():
    classes = torch.randint(0, 2, (1000,), device="cuda")
    p = torch.tensor([0.3, 1.0], device="cuda")
    a = balanced_class_mask(classes, p, torch.Generator(device="cuda").manual_seed(1))
    b = balanced_class_mask(classes, p, torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generator is on"):
        balanced_class_mask(classes, p, torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------
# RegClsLoss
# --------------------------------------------------------------------------------------------------


def _bins():
    # classes over 0..9 with counts [6, 2, 2] -> rho = [1/3, 1, 1]
    y = torch.tensor([0.5] * 6 + [4.5] * 2 + [8.5] * 2)
    bins = ClassBins.fit(y, 3, range=(0.0, 10.0), equalize=False)
    bins.edges.copy_(torch.tensor([0.0, 3.0, 6.0, 10.0], dtype=torch.float64))
    return bins


@pytest.mark.parametrize("lam", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_value_rows_vs_formula(lam, balance, masked):
    bins = _bins()
    edges = bins.edges.tolist()
    g = torch.Generator().manual_seed(7)
    n = 12
    pred = torch.randn(n, generator=g, dtype=torch.float64)
    target = torch.rand(n, generator=g, dtype=torch.float64) * 10
    logits = torch.randn(n, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) < 0.7 if masked else None
    criterion = RegClsLoss(weighted_mse_loss, bins, lam=lam, balance=balance)
    out = criterion(pred, logits, target, mask=mask, generator=torch.Generator().manual_seed(9), return_parts=True)

    rows = [i for i in range(n) if mask is None or bool(mask[i])]
    reg = sum((pred[i].item() - target[i].item()) ** 2 for i in rows) / len(rows)
    classes = [ref_bin(v, edges) for v in target.tolist()]
    rho = ref_keep_prob(bins.counts.tolist())
    u = torch.rand(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64).tolist()
    kept = [i for i in rows if not balance or u[i] < rho[classes[i]]]
    ce = ref_ce([logits[i].tolist() for i in kept], [classes[i] for i in kept])
    tol_close(out.regression, reg)
    tol_close(out.classification, ce)
    assert int(out.kept) == len(kept)
    tol_close(out.loss, ref_total(reg, ce, lam))
    tol_close(criterion(pred, logits, target, mask=mask, generator=torch.Generator().manual_seed(9)), out.loss)
    w_reg, w_ce = criterion.weights
    assert (w_reg, w_ce) == ((lam, 1.0) if lam > 1 else (1.0, 1.0 / lam))


@pytest.mark.parametrize("mask_shape", ["channel", "plain", None])
@pytest.mark.parametrize("target_shape", ["channel", "plain"])
def test_loss_dense_logits_with_mask(mask_shape, target_shape):
    bins = _bins()
    edges = bins.edges.tolist()
    g = torch.Generator().manual_seed(8)
    b, c, h, w = 2, 3, 4, 5
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    depth = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) * 12 - 1       # some out of range
    pred = torch.randn(b, 1, h, w, generator=g, dtype=torch.float64)
    valid = torch.rand(b, 1, h, w, generator=g) < 0.6
    target = depth if target_shape == "channel" else depth[:, 0]
    pred_in = pred if target_shape == "channel" else pred[:, 0]
    mask = None if mask_shape is None else (valid if mask_shape == "channel" else valid[:, 0])
    lam = 2.0
    def reg_loss(p, t, mask=None):     # the mask reaches the regression loss as given: fit it to the target
        return weighted_mse_loss(p, t, mask=None if mask is None else mask.reshape(t.shape))

    criterion = RegClsLoss(reg_loss, bins, lam=lam, balance=True)
    out = criterion(pred_in, logits, target, mask=mask, generator=torch.Generator().manual_seed(3), return_parts=True)

    u = torch.rand(b, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rho = ref_keep_prob(bins.counts.tolist())
    reg_terms, rows, labels = [], [], []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                ok = mask is None or bool(valid[i, 0, y, x])
                if not ok:
                    continue
                reg_terms.append((pred[i, 0, y, x].item() - depth[i, 0, y, x].item()) ** 2)
                k = ref_bin(depth[i, 0, y, x].item(), edges)
                if u[i, y, x].item() < rho[k]:
                    rows.append(logits[i, :, y, x].tolist())
                    labels.append(k)
    reg = sum(reg_terms) / len(reg_terms)
    ce = ref_ce(rows, labels)
    tol_close(out.regression, reg)
    tol_close(out.classification, ce)
    assert int(out.kept) == len(labels)
    tol_close(out.loss, ref_total(reg, ce, lam))


def test_no_kept_label_gives_zero_ce_and_finite_gradients():
    bins = _bins()
    pred = torch.randn(6, requires_grad=True)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.rand(6) * 10
    # every label masked out for the CE (the reference's CrossEntropyLoss would return NaN here)
    crit = RegClsLoss(lambda p, t, mask=None: ((p - t) ** 2).mean(), bins, lam=0.5, balance=True)
    out = crit(pred, logits, target, mask=torch.zeros(6, dtype=torch.bool), return_parts=True)
    assert float(out.classification) == 0.0 and int(out.kept) == 0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # every label drawn out by the balancing: a class with keep probability ~0 (counts [1e9, 1, 1])
    heavy = ClassBins.from_histogram(torch.tensor([1e9, 1.0, 1.0]), torch.tensor([0.0, 3.0, 6.0, 10.0]), 3,
                                     equalize=False)
    crit = RegClsLoss(lambda p, t: ((p - t) ** 2).mean(), heavy)
    out = crit(torch.zeros(50), torch.randn(50, 3), torch.full((50,), 1.0), return_parts=True,
               generator=torch.Generator().manual_seed(0))
    assert float(out.classification) == 0.0 and int(out.kept) == 0 and torch.isfinite(out.loss)


def test_no_kept_label_with_empty_batch():
    bins = _bins()
    criterion = RegClsLoss(lambda p, t: (p - t).abs().sum(), bins)
    out = criterion(torch.zeros(0), torch.zeros(0, 3), torch.zeros(0), return_parts=True)
    assert float(out.classification) == 0.0 and float(out.loss) == 0.0


def test_gradients_flow_to_logits_and_pred_and_match_reference():
    bins = _bins()
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(10, 1, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(10, 1, generator=g, dtype=torch.float64) * 10
    mask = torch.tensor([True] * 8 + [False] * 2).reshape(10, 1)
    lam = 0.5
    criterion = RegClsLoss(weighted_mse_loss, bins, lam=lam, balance=False)
    criterion(pred, logits, target, mask=mask).backward()
    # autograd through an independent formula
    p2, l2 = pred.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    classes = torch.tensor([ref_bin(v, bins.edges.tolist()) for v in target.reshape(-1).tolist()])
    rows = mask.reshape(-1)
    reg = ((p2 - target)[mask] ** 2).mean()
    ce = -torch.log_softmax(l2[rows], 1).gather(1, classes[rows, None]).mean()
    (reg + ce / lam).backward()
    assert pred.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
    tol_close(pred.grad, p2.grad)
    tol_close(logits.grad, l2.grad)
    assert torch.equal(logits.grad[~rows], torch.zeros(2, 3, dtype=torch.float64))


def test_bmc_regression_module_and_regression_kwargs():
    bins = _bins()
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(9, 1, generator=g)
    target = torch.rand(9, 1, generator=g) * 10
    logits = torch.randn(9, 3, generator=g)
    mask = torch.rand(9, generator=g) < 0.8           # BMCLoss on [N, 1] rows takes a row mask [N]
    bmc = BMCLoss(1.0)
    crit = RegClsLoss(bmc, bins, lam=2.0, balance=False)
    out = crit(pred, logits, target, mask=mask, return_parts=True)
    tol_close(out.regression, bmc(pred, target, mask=mask), rtol=1e-6, atol=1e-7)
    # extra keywords reach the regression loss (LDS weights)
    w = torch.rand(9, 1, generator=g)
    crit_w = RegClsLoss(weighted_mse_loss, bins, balance=False)
    out_w = crit_w(pred, logits, target, weight=w, return_parts=True)
    tol_close(out_w.regression, (w * (pred - target) ** 2).mean(), rtol=1e-6, atol=1e-7)
    # an unmasked call passes no mask keyword: torch's own losses work
    crit_t = RegClsLoss(torch.nn.functional.mse_loss, bins, balance=False)
    tol_close(crit_t(pred, logits, target, return_parts=True).regression,
              torch.nn.functional.mse_loss(pred, target), rtol=1e-6, atol=1e-7)


def test_nan_target_outside_mask_is_fine_inside_is_an_error():
    bins = _bins()
    target = torch.tensor([1.0, float("nan"), 5.0, 9.0])
    pred, logits = torch.zeros(4), torch.zeros(4, 3)
    mask = torch.tensor([True, False, True, True])
    crit = RegClsLoss(weighted_mse_loss, bins, balance=False)
    out = crit(pred, logits, target, mask=mask, return_parts=True)
    assert torch.isfinite(out.loss) and int(out.kept) == 3
    with pytest.raises(ValueError, match="target contain NaN"):
        crit(pred, logits, target)


def test_no_value_read_without_check_finite(monkeypatch):
    """With check_finite=False (and a regression loss that reads no value) the step reads no tensor value:
    no host synchronisation. any_true is the one host read of every value check."""
    bins = _bins()

    def forbidden(_):
        raise AssertionError("host read")

    monkeypatch.setattr(V, "any_true", forbidden)
    crit = RegClsLoss(lambda p, t, mask=None: ((p - t) ** 2).mean(), bins, check_finite=False)
    target = torch.rand(2, 1, 3, 3) * 10
    out = crit(torch.zeros(2, 1, 3, 3), torch.randn(2, 3, 3, 3), target, mask=torch.ones(2, 3, 3, dtype=torch.bool))
    assert torch.isfinite(out)
    balanced_class_mask(bins.assign(target), bins.keep_prob)
    with pytest.raises(AssertionError, match="host read"):          # the default does read (one check)
        RegClsLoss(weighted_mse_loss, bins)(torch.zeros(4), torch.zeros(4, 3), torch.ones(4))


def test_compile_fullgraph():
    bins = _bins()
    g = torch.Generator().manual_seed(6)
    model = torch.nn.Conv2d(2, 4, 1, dtype=torch.float64)
    x = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)
    target = torch.rand(2, 1, 3, 4, generator=g, dtype=torch.float64) * 10
    mask = torch.rand(2, 1, 3, 4, generator=g) < 0.8

    def step(model, criterion, x, target, mask):
        out = model(x)
        return criterion(out[:, :1], out[:, 1:], target, mask=mask)

    results = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        crit = RegClsLoss(weighted_mse_loss, copy.deepcopy(bins), lam=3.0, balance=False)
        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        loss = fn(m, crit, x, target, mask)
        loss.backward()
        results.append((loss.detach(), m.weight.grad.clone()))
    tol_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-12)
    tol_close(results[1][1], results[0][1], rtol=1e-9, atol=1e-12)
    # balanced (random draw inside the graph, without an explicit generator, which dynamo cannot trace)
    torch._dynamo.reset()
    crit = RegClsLoss(weighted_mse_loss, bins, lam=3.0, balance=True)
    loss = torch.compile(step, fullgraph=True, backend="inductor")(copy.deepcopy(model), crit, x, target, mask)
    assert torch.isfinite(loss)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_classes=1), ValueError, "num_classes"),
    (dict(num_classes=2.0), TypeError, "num_classes"),
    (dict(num_classes=True), TypeError, "num_classes"),
    (dict(num_classes=4, num_bins=3), ValueError, "num_bins"),
    (dict(num_classes=4, num_bins=8, equalize=False), ValueError, "num_bins"),
    (dict(num_classes=4, equalize=1), TypeError, "equalize"),
    (dict(num_classes=4, range=(3.0, 1.0)), ValueError, "range"),
    (dict(num_classes=4, range="ab"), TypeError, "range"),
])
def test_fit_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClassBins.fit(torch.arange(10.0), **kwargs)


def test_fit_bad_targets():
    with pytest.raises(ValueError, match="train_targets contain NaN"):
        ClassBins.fit(torch.tensor([1.0, float("nan"), 2.0]), 2)
    with pytest.raises(ValueError, match="train_targets contain NaN"):
        ClassBins.fit(torch.tensor([1.0, float("inf"), 2.0]), 2)
    with pytest.raises(TypeError, match="train_targets"):
        ClassBins.fit(torch.tensor([True, False]), 2)
    with pytest.raises(TypeError, match="train_targets"):
        ClassBins.fit(torch.tensor([1 + 1j, 2j]), 2)
    with pytest.raises(TypeError, match="train_targets"):
        ClassBins.fit([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="no \\(kept\\) element"):
        ClassBins.fit(torch.zeros(0), 2)
    with pytest.raises(ValueError, match="no \\(kept\\) element"):
        ClassBins.fit(torch.arange(4.0), 2, mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="all equal"):
        ClassBins.fit(torch.full((5,), 3.0), 2)
    with pytest.raises(ValueError, match="mask must have shape"):
        ClassBins.fit(torch.arange(4.0), 2, mask=torch.ones(3, dtype=torch.bool))


def test_from_histogram_bad_input():
    edges = bin_edges(3, (0.0, 3.0))
    with pytest.raises(ValueError, match="counts must have shape"):
        ClassBins.from_histogram(torch.ones(4), edges, 2)
    with pytest.raises(ValueError, match="counts must be finite"):
        ClassBins.from_histogram(torch.tensor([1.0, -1.0, 2.0]), edges, 2)
    with pytest.raises(ValueError, match="all zero"):
        ClassBins.from_histogram(torch.zeros(3), edges, 2)
    with pytest.raises(ValueError, match="increasing"):
        ClassBins.from_histogram(torch.ones(3), torch.tensor([0.0, 2.0, 1.0, 3.0]), 2)
    with pytest.raises(ValueError, match="num_bins"):
        ClassBins.from_histogram(torch.ones(3), edges, 4)
    with pytest.raises(ValueError, match="counts must be finite"):
        equalize_histogram(torch.zeros(3), 2)


def test_loss_bad_arguments():
    bins = _bins()
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            RegClsLoss(weighted_mse_loss, bins, lam=lam)
    with pytest.raises(TypeError, match="lam"):
        RegClsLoss(weighted_mse_loss, bins, lam="1")
    with pytest.raises(TypeError, match="regression_loss"):
        RegClsLoss(3, bins)
    with pytest.raises(TypeError, match="class_bins"):
        RegClsLoss(weighted_mse_loss, bins.edges)
    with pytest.raises(TypeError, match="balance"):
        RegClsLoss(weighted_mse_loss, bins, balance=1)
    with pytest.raises(RuntimeError, match="ClassBins is empty"):
        RegClsLoss(weighted_mse_loss, ClassBins())(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(RuntimeError, match="ClassBins is empty"):
        ClassBins().assign(torch.zeros(2))


@pytest.mark.parametrize("case,exc,match", [
    ("int_target", TypeError, "target must have a floating dtype"),
    ("int_logits", TypeError, "logits must have a floating dtype"),
    ("logits_1d", ValueError, "logits must be"),
    ("wrong_C", ValueError, "class_bins has 3"),
    ("target_shape", ValueError, "target must have shape"),
    ("target_numel_same_but_2d", ValueError, "target must have shape"),
    ("mask_shape", ValueError, "mask must have shape"),
    ("mask_dtype", TypeError, "mask must be a bool"),
    ("mask_type", TypeError, "mask must be a torch.Tensor"),
    ("dense_target", ValueError, "target must have shape"),
])
def test_loss_bad_input(case, exc, match):
    bins = _bins()
    crit = RegClsLoss(weighted_mse_loss, bins)
    pred, logits, target, mask = torch.zeros(4), torch.zeros(4, 3), torch.ones(4), None
    if case == "int_target":
        target = torch.ones(4, dtype=torch.int64)
    elif case == "int_logits":
        logits = torch.zeros(4, 3, dtype=torch.int64)
    elif case == "logits_1d":
        logits = torch.zeros(4)
    elif case == "wrong_C":
        logits = torch.zeros(4, 5)
    elif case == "target_shape":
        target = torch.ones(5)
    elif case == "target_numel_same_but_2d":
        target = torch.ones(2, 2)
    elif case == "mask_shape":
        mask = torch.ones(3, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(4)
    elif case == "mask_type":
        mask = [True] * 4
    elif case == "dense_target":
        logits, target = torch.zeros(2, 3, 4, 5), torch.ones(2, 1, 4, 4)
    with pytest.raises(exc, match=match):
        crit(pred, logits, target, mask=mask)
