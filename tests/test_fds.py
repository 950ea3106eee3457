"""FDS: the two kernels (fds_accumulate, fds_recolor) on every CPU backend against the naive loop oracle
and the torch backend, and the FDS module against the naive state machine (tests/fds_reference.py).

Run: ``.venv/bin/python -m pytest tests/test_fds.py -q``
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import imbreg_fast
from imbreg_fast import FDS
from imbreg_fast._dispatch import resolve
from imbreg_fast.lds import kernel_window
from imbreg_fast.ops import fds as ops

from conftest import CPP_OK
from fds_reference import NaiveFDS, naive_accumulate, naive_recolor, naive_smooth
from imbreg_fast.experiments.published import published_smooth

CPU_BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.requires_cpp)]
# (dtype, atol, rtol) of a backend against the float64 naive oracle on the same input values
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


def _impl(op, backend, x):
    return resolve(op, x, backend)[1]


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Inputs: features in several layouts, viewed as [B, C, P]
# ----------------------------------------------------------------------------------------------------

LAYOUTS = ["dense", "channels_last", "dense_strided", "rows", "rows_strided"]


def make_features(layout, b=2, c=5, h=3, w=7, dtype=torch.float32, scale=3.0, offset=1.0):
    """(features in the public layout, the same as [B, C, P] through ops.as_pixels)."""
    if layout == "dense":
        x = torch.randn(b, c, h, w) * scale + offset
    elif layout == "channels_last":                       # stride_c = 1: pixels' channels contiguous
        x = (torch.randn(b, c, h, w) * scale + offset).contiguous(memory_format=torch.channels_last)
    elif layout == "dense_strided":                       # every other channel and column of a bigger map
        x = (torch.randn(b, 2 * c, h, 2 * w) * scale + offset)[:, ::2, :, ::2]
    elif layout == "rows":
        x = torch.randn(b * h * w, c) * scale + offset
    elif layout == "rows_strided":                        # [N, C] with strides (2C, 2)
        x = (torch.randn(b * h * w, 2 * c) * scale + offset)[:, ::2]
    else:
        raise ValueError(layout)
    x = x.to(dtype)
    return x, ops.as_pixels(x)


def make_bins(f3, num_bins, skip=0.2, empty=(1,)):
    """Random bins [B, P] with a fraction ``skip`` of -1 (masked) and the bins in ``empty`` never used."""
    b, _, p = f3.shape
    allowed = torch.tensor([k for k in range(num_bins) if k not in empty])
    bins = allowed[torch.randint(0, allowed.numel(), (b, p))]
    return torch.where(torch.rand(b, p) < skip, torch.full_like(bins, -1), bins)


def make_tables(num_bins, c, dtype, full):
    if full:
        transform = torch.randn(num_bins, c, c, dtype=torch.float64) / math.sqrt(c) + torch.eye(c, dtype=torch.float64)
    else:
        transform = torch.rand(num_bins, c, dtype=torch.float64) + 0.5
    shift = torch.randn(num_bins, c, dtype=torch.float64)
    return transform.to(dtype), shift.to(dtype)


# ----------------------------------------------------------------------------------------------------
# fds_accumulate
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_accumulate_matches_naive(backend, layout, full, dtype):
    x, f3 = make_features(layout, dtype=dtype)
    bins = make_bins(f3, 6, empty=(1, 4))
    count, mean, m2 = _impl("fds_accumulate", backend, f3)(f3, bins, 6, full)
    ref = naive_accumulate(f3, bins, 6, full)
    atol, rtol = TOL[torch.float32 if dtype == torch.bfloat16 else dtype]
    for got, want, name in zip((count, mean, m2), ref, ("count", "mean", "m2")):
        assert got.dtype == torch.float64 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=atol * (1 + want.abs().max().item()), rtol=rtol, msg=name)
    assert torch.equal(count, ref[0])
    for k in (1, 4):                                       # empty bins: exact zeros
        assert count[k] == 0 and not mean[k].any() and not m2[k].any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_accumulate_large_offset_is_centred(backend):
    """Features with mean 1e4 and spread 1: a raw sum-of-squares formulation loses every digit in fp32."""
    x, f3 = make_features("dense", b=2, c=4, h=16, w=16, scale=1.0, offset=1e4)
    bins = torch.randint(0, 3, (2, 256))
    _, _, m2 = _impl("fds_accumulate", backend, f3)(f3, bins, 3, True)
    _, _, want = naive_accumulate(f3, bins, 3, True)
    torch.testing.assert_close(m2, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_accumulate_all_skipped_and_empty(backend):
    x, f3 = make_features("dense")
    bins = torch.full((f3.shape[0], f3.shape[2]), -1)
    for full in (True, False):
        count, mean, m2 = _impl("fds_accumulate", backend, f3)(f3, bins, 4, full)
        assert not count.any() and not mean.any() and not m2.any()
    empty = torch.empty(0, 5, 3, 4)
    count, mean, m2 = _impl("fds_accumulate", backend, empty)(ops.as_pixels(empty), torch.empty(0, 12, dtype=torch.long),
                                                                 4, True)
    assert count.shape == (4,) and mean.shape == (4, 5) and m2.shape == (4, 5, 5) and not m2.any()


@pytest.mark.requires_cpp
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("c", [7, 24, 130])
def test_accumulate_cpp_matches_torch_backend_many_bins(full, c):
    """Several sort blocks, several chunks and segments per bin (the parallel path; C below one vector,
    between vector widths, and above 128 with partial tiles), one dominant bin (as in depth maps)."""
    x, f3 = make_features("dense", b=2, c=c, h=60, w=80)
    bins = torch.randint(0, 40, (2, 4800))
    bins[:, ::3] = 7
    got = torch.ops.imbreg_fast.fds_accumulate(f3, bins, 40, full)
    want = ops.accumulate_torch(f3, bins, 40, full)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5 * w.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# fds_recolor
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_recolor_forward_backward_match_naive(backend, layout, full, dtype):
    x, _ = make_features(layout, dtype=dtype)
    x.requires_grad_(True)
    f3 = ops.as_pixels(x)
    bins = make_bins(f3, 6)
    transform, shift = make_tables(6, f3.shape[1], _compute(dtype), full)
    out = _impl("fds_recolor", backend, f3)(f3, bins, transform, shift)
    assert out.shape == f3.shape and out.dtype == dtype and out.is_contiguous()
    atol, rtol = TOL[dtype]
    want = naive_recolor(f3, bins, transform, shift)
    torch.testing.assert_close(out.double(), want, atol=atol * (1 + want.abs().max().item()), rtol=rtol)
    # d features = A^T g (g where bins = -1), with grad_output != 1
    g = torch.randn(out.shape).to(dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    transposed = transform.mT if full else transform
    want_grad = naive_recolor(g, bins, transposed, torch.zeros_like(shift))
    torch.testing.assert_close(ops.as_pixels(grad).double(), want_grad,
                               atol=atol * (1 + want_grad.abs().max().item()), rtol=rtol)
    assert grad.shape == x.shape and grad.dtype == dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_recolor_gradcheck_fp64(backend, full):
    x = torch.randn(2, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    bins = make_bins(ops.as_pixels(x), 4, empty=())
    transform, shift = make_tables(4, 3, torch.float64, full)
    impl = _impl("fds_recolor", backend, x)

    def f(inp):
        return impl(ops.as_pixels(inp), bins, transform, shift)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recolor_does_not_touch_inputs(backend):
    x, f3 = make_features("dense")
    before = x.clone()
    bins = make_bins(f3, 4, empty=())
    transform, shift = make_tables(4, 5, torch.float32, True)
    out = _impl("fds_recolor", backend, f3)(f3, bins, transform, shift)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()
    out_all_skipped = _impl("fds_recolor", backend, f3)(f3, torch.full_like(bins, -1), transform, shift)
    assert torch.equal(out_all_skipped, f3) and out_all_skipped.data_ptr() != x.data_ptr()


@pytest.mark.requires_cpp
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("c", [5, 32, 130])
def test_recolor_cpp_matches_torch_backend_large(full, c):
    """The parallel path; C below one vector, a multiple of every width, above 128 with partial tiles."""
    x, f3 = make_features("dense", b=2, c=c, h=30, w=50)
    bins = make_bins(f3, 50, empty=(3,))
    transform, shift = make_tables(50, c, torch.float32, full)
    got = torch.ops.imbreg_fast.fds_recolor(f3, bins, transform, shift)
    want = ops.recolor_torch(f3, bins, transform, shift)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.requires_cpp
def test_cpp_workspace_reuse_across_calls():
    """The kernels keep one freed workspace (>= 2 MB) per thread for the next call: calls with larger,
    smaller and other-dtype workspaces, with results held or dropped, stay correct."""
    held = []
    for c, h, dtype in [(64, 80, torch.float32), (96, 100, torch.float32), (40, 60, torch.float64),
                        (96, 100, torch.float32), (130, 70, torch.float64)]:
        x, f3 = make_features("dense", b=2, c=c, h=h, w=64, dtype=dtype)
        bins = make_bins(f3, 9)
        transform, shift = make_tables(9, c, dtype, True)
        got = torch.ops.imbreg_fast.fds_recolor(f3, bins, transform, shift)
        torch.testing.assert_close(got, ops.recolor_torch(f3, bins, transform, shift), rtol=1e-5, atol=1e-5)
        got_stats = torch.ops.imbreg_fast.fds_accumulate(f3, bins, 9, True)
        for g, w in zip(got_stats, ops.accumulate_torch(f3, bins, 9, True)):
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5 * w.abs().max().item())
        held.append(got)


# ----------------------------------------------------------------------------------------------------
# C++ op registration: opcheck, determinism across thread counts, argument checks
# ----------------------------------------------------------------------------------------------------


@pytest.mark.requires_cpp
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_cpp(full, dtype):
    x, f3 = make_features("dense", b=2, c=4, h=3, w=5, dtype=dtype)
    xs, f3s = make_features("rows_strided", b=1, c=4, h=3, w=5, dtype=dtype)
    for feats in (f3, f3s):
        bins = make_bins(feats, 5)
        transform, shift = make_tables(5, 4, dtype, full)
        torch.library.opcheck(torch.ops.imbreg_fast.fds_accumulate.default, (feats, bins, 5, full))
        torch.library.opcheck(torch.ops.imbreg_fast.fds_recolor.default,
                              (feats.detach().requires_grad_(True), bins, transform, shift))


@pytest.mark.requires_cpp
@pytest.mark.parametrize("layout", ["dense", "rows"])
def test_cpp_bit_identical_across_thread_counts(layout):
    x, f3 = make_features(layout, b=3, c=16, h=50, w=64)   # 9600 pixels: 2 sort blocks, many GEMM tasks
    bins = make_bins(f3, 12)
    bins[:, ::2] = 5                                       # one bin spread over many chunks
    transform, shift = make_tables(12, 16, torch.float32, True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((torch.ops.imbreg_fast.fds_accumulate(f3, bins, 12, True),
                            torch.ops.imbreg_fast.fds_accumulate(f3, bins, 12, False),
                            torch.ops.imbreg_fast.fds_recolor(f3, bins, transform, shift),
                            torch.ops.imbreg_fast.fds_recolor(f3, bins, transform[:, 0].contiguous(), shift)))
    finally:
        torch.set_num_threads(threads)
    (acc_full1, acc_diag1, rec1, recd1), (acc_full2, acc_diag2, rec2, recd2) = results
    for a, b in zip(acc_full1 + acc_diag1, acc_full2 + acc_diag2):
        assert torch.equal(a, b)
    assert torch.equal(rec1, rec2) and torch.equal(recd1, recd2)


@pytest.mark.requires_cpp
def test_cpp_rejects_bad_arguments():
    x, f3 = make_features("dense")
    bins = make_bins(f3, 4)
    transform, shift = make_tables(4, 5, torch.float32, True)
    rec, acc = torch.ops.imbreg_fast.fds_recolor, torch.ops.imbreg_fast.fds_accumulate
    with pytest.raises(RuntimeError, match="bin id"):
        rec(f3, torch.full_like(bins, 4), transform, shift)
    with pytest.raises(RuntimeError, match="bin id"):
        acc(f3, torch.full_like(bins, -2), 4, True)
    with pytest.raises(RuntimeError, match="bins must be"):
        rec(f3, bins[:, :-1], transform, shift)
    with pytest.raises(RuntimeError, match="transform"):
        rec(f3, bins, transform[:, :3, :3], shift)
    with pytest.raises(RuntimeError, match="compute dtype"):
        rec(f3, bins, transform.double(), shift.double())
    with pytest.raises(RuntimeError, match="int64"):
        acc(f3, bins.int(), 4, True)


# ----------------------------------------------------------------------------------------------------
# FDS module
# ----------------------------------------------------------------------------------------------------

WINDOW = kernel_window("gaussian", 5, 2.0, normalize="sum")


def _naive_for(module: FDS) -> NaiveFDS:
    return NaiveFDS(module.feature_dim, module.edges.tolist(), full=module.full, window=module._window.tolist(),
                    momentum=module.momentum, eps=module.eps, clip=module.clip, start_update=module.start_update,
                    start_smooth=module.start_smooth)


def _batch(layout, c, num_bins_used, dtype=torch.float64, mask_frac=0.2):
    if layout == "dense":
        x = torch.randn(2, c, 3, 5, dtype=dtype) * 2 + 1
        y = torch.rand(2, 1, 3, 5, dtype=torch.float64) * num_bins_used
        mask = torch.rand(2, 1, 3, 5) > mask_frac
    else:
        x = torch.randn(23, c, dtype=dtype) * 2 + 1
        y = torch.rand(23, dtype=torch.float64) * num_bins_used
        mask = torch.rand(23) > mask_frac
    return x, y, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("layout", ["dense", "rows"])
@pytest.mark.parametrize("schedule", [dict(), dict(start_update=1, start_smooth=2, momentum=None)],
                         ids=["default", "late-cumulative"])
def test_module_matches_naive_state_machine(backend, covariance, layout, schedule):
    c = 4
    fds = FDS(c, 7, (0.0, 7.0), covariance=covariance, backend=backend, **schedule)
    naive = _naive_for(fds)
    for epoch in range(4):
        for _ in range(3):
            x, y, mask = _batch(layout, c, 5.5 if epoch < 2 else 7.0)   # bins 6 (and half of 5) unseen at first
            x.requires_grad_(True)
            fds.accumulate(x, y, mask)
            naive.accumulate(ops.as_pixels(x), y, mask)
            out = fds(x, y, mask)
            want = naive.forward(ops.as_pixels(x), y, mask)
            torch.testing.assert_close(ops.as_pixels(out).double(), want, atol=1e-9, rtol=1e-9)
            assert (out is x) == (epoch < fds.start_smooth)
        fds.update()
        naive.update()
        assert int(fds.epoch) == naive.epoch
        torch.testing.assert_close(fds.num_samples_tracked, torch.tensor(naive.tracked, dtype=torch.float64))
        torch.testing.assert_close(fds.running_mean, torch.tensor(np.stack(naive.mean)), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(fds.running_cov, torch.tensor(np.stack(naive.cov)), atol=1e-12, rtol=1e-12)
        seen = fds.num_samples_tracked > 0
        if seen.any():
            torch.testing.assert_close(fds.smoothed_mean[seen], torch.tensor(naive.smoothed_mean)[seen],
                                       atol=1e-12, rtol=1e-12)


def test_module_eval_and_early_epochs_are_identity():
    fds = FDS(3, 4, (0.0, 4.0), start_smooth=1)
    x, y = torch.randn(10, 3), torch.rand(10) * 4
    assert fds(x, y) is x                                   # epoch 0 < start_smooth
    fds.accumulate(x, y)
    fds.update()
    out = fds(x, y)
    assert out is not x and not torch.equal(out, x)
    fds.eval()
    assert fds(x, y) is x


def test_smoothing_equals_published_conv1d_when_all_bins_seen():
    fds = FDS(3, 9, (0.0, 9.0))
    stats = torch.randn(9, 3, 3, dtype=torch.float64)
    got = fds._smooth(stats, torch.ones(9, dtype=torch.bool))
    torch.testing.assert_close(got, published_smooth(stats, fds._window), atol=1e-15, rtol=1e-14)
    for kernel, ks, sigma in (("triang", 3, 1.0), ("laplace", 7, 1.5), ("sampled_gaussian", 5, 1.0)):
        fds = FDS(2, 9, (0.0, 9.0), kernel=kernel, ks=ks, sigma=sigma)
        stats = torch.randn(9, 2, dtype=torch.float64)
        torch.testing.assert_close(fds._smooth(stats, torch.ones(9, dtype=torch.bool)),
                                   published_smooth(stats, fds._window), atol=1e-15, rtol=1e-14)


def test_unseen_bins_do_not_leak_initial_values():
    fds = FDS(2, 6, (0.0, 6.0), covariance="diag")
    stats = torch.randn(6, 2, dtype=torch.float64)
    seen = torch.tensor([True, True, False, True, False, True])
    poisoned = stats.clone()
    poisoned[~seen] = 1e6
    got = fds._smooth(poisoned, seen)
    torch.testing.assert_close(got, naive_smooth(stats, seen.tolist(), fds._window), atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ill_conditioned_and_rank_deficient_covariances(backend):
    """Bins with condition numbers up to 1e6 and bins with fewer samples than C: the transform maps the
    regularised raw covariance to the regularised smoothed one, and agrees with scipy's sqrtm."""
    c, nb = 8, 5
    fds = FDS(c, nb, (0.0, nb), eps=1e-5, backend=backend)
    naive = _naive_for(fds)
    scales = torch.logspace(0, -3, c, dtype=torch.float64)  # variances 1 .. 1e-6: condition number 1e6
    rot = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    counts = [200, 3, 150, 5, 2]                            # bins 1, 3, 4: fewer samples than C
    for _ in range(2):
        feats, labels = [], []
        for k, n in enumerate(counts):
            feats.append(torch.randn(n, c, dtype=torch.float64) * scales @ rot.T + k)
            labels.append(torch.full((n,), k + 0.5, dtype=torch.float64))
        x, y = torch.cat(feats), torch.cat(labels)
        fds.accumulate(x, y)
        naive.accumulate(ops.as_pixels(x), y)
        fds.update()
        naive.update()
    eye = torch.eye(c, dtype=torch.float64)
    for k in range(nb):
        a = fds.transform[k]
        raw, smooth = fds.running_cov[k] + 1e-5 * eye, fds.smoothed_cov[k] + 1e-5 * eye
        torch.testing.assert_close(a @ raw @ a.T, smooth, atol=1e-9 * smooth.abs().max().item(), rtol=1e-7)
        want = torch.tensor(naive.transform[k][0])
        torch.testing.assert_close(a, want, atol=1e-6 * want.abs().max().item(), rtol=1e-6)
    assert torch.isfinite(fds._transform_f32).all()


def test_singular_covariance_is_regularised():
    fds = FDS(4, 2, (0.0, 2.0))
    x = torch.ones(10, 4)                                   # every feature identical: Sigma = 0
    y = torch.full((10,), 0.5)
    fds.accumulate(x, y)
    fds.update()
    assert torch.isfinite(fds.transform).all() and torch.isfinite(fds.shift).all()
    out = fds(x, y)
    torch.testing.assert_close(out, x)                     # only bin seen: its own statistics, z~ = z


def test_bins_with_fewer_than_two_samples_keep_previous_statistics():
    fds = FDS(2, 3, (0.0, 3.0), covariance="diag")
    fds.accumulate(torch.randn(6, 2), torch.tensor([0.5, 0.5, 0.5, 1.5, 1.5, 2.5]))
    fds.update()
    assert fds.num_samples_tracked.tolist() == [3.0, 2.0, 0.0]   # bin 2 had one sample: not folded
    before = copy.deepcopy(fds.state_dict())
    fds.accumulate(torch.randn(2, 2), torch.tensor([0.5, 1.5]))
    fds.update()
    for name in ("running_mean", "running_cov", "num_samples_tracked"):
        assert torch.equal(fds.state_dict()[name], before[name]), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_round_trip_and_bit_identical_resume(backend):
    torch.manual_seed(1)
    batches = [_batch("dense", 4, 6.0, dtype=torch.float32) for _ in range(9)]
    a = FDS(4, 6, (0.0, 6.0), backend=backend)
    outputs_a = []
    for i, (x, y, mask) in enumerate(batches):
        if i == 4:                                          # checkpoint mid-epoch, accumulators non-empty
            state = copy.deepcopy(a.state_dict())
        a.accumulate(x, y, mask)
        outputs_a.append(a(x, y, mask))
        if i % 3 == 2:
            a.update()
    b = FDS(4, 6, (0.0, 6.0), backend=backend)
    b.load_state_dict(state)
    assert int(b.epoch) == 1 and b._calibrating
    for i, (x, y, mask) in enumerate(batches[4:], start=4):
        b.accumulate(x, y, mask)
        assert torch.equal(b(x, y, mask), outputs_a[i])
        if i % 3 == 2:
            b.update()
    for (name, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), name
    assert set(a.state_dict()) >= {"epoch", "running_mean", "running_cov", "smoothed_mean", "smoothed_cov",
                                   "transform", "shift", "accum_count", "accum_mean", "accum_m2"}


def test_dtype_casts_keep_statistics_in_float64_and_half_features_work():
    fds = FDS(3, 4, (0.0, 4.0)).half()
    assert all(v.dtype in (torch.float64, torch.int64) for v in fds.state_dict().values())
    x, y = torch.randn(12, 3), torch.rand(12) * 4
    fds.accumulate(x.half(), y)
    fds.update()
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = fds(x.to(dtype), y)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), fds(x.double(), y), atol=2e-2, rtol=2e-2)


def test_gradient_flows_only_into_features():
    fds = FDS(3, 4, (0.0, 4.0))
    x, y = torch.randn(16, 3), torch.rand(16) * 4
    fds.accumulate(x, y)
    fds.update()
    x.requires_grad_(True)
    g = torch.randn(16, 3)
    fds(x, y).backward(g)
    bins = ops.bin_index(y, fds.edges)
    want = torch.einsum("nji,nj->ni", fds._transform_f32[bins], g)
    torch.testing.assert_close(x.grad, want)
    assert all(not v.requires_grad for v in fds.state_dict().values())


@pytest.mark.parametrize("backend,compiler", [("torch", "aot_eager"),
                                              pytest.param("cpp", "aot_eager", marks=pytest.mark.requires_cpp),
                                              pytest.param("cpp", "inductor", marks=pytest.mark.requires_cpp)])
def test_torch_compile_fullgraph_training_step(backend, compiler):
    """torch.compile(fullgraph=True) of encoder -> FDS -> head -> masked loss; backward of the compiled
    loss gives the eager gradients (fake kernels + registered autograd of the recolouring op)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    head = torch.nn.Conv2d(4, 1, 1)
    fds = FDS(4, 5, (0.0, 5.0), backend=backend)
    img, depth = torch.randn(2, 2, 6, 7), torch.rand(2, 1, 6, 7) * 5
    mask = depth > 0.3
    with torch.no_grad():
        fds.accumulate(conv(img), depth, mask)
    fds.update()

    def step(img, depth, mask):
        feats = fds(conv(img), depth, mask)
        return (((head(feats) - depth) ** 2) * mask).sum()

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compiler)):
        for p in list(conv.parameters()) + list(head.parameters()):
            p.grad = None
        loss = fn(img, depth, mask)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in conv.parameters()]))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_module_docstring_example_runs():
    """The dense training loop of imbreg_fast.fds' docstring (copied to the README), executed as written."""
    import textwrap

    import imbreg_fast.fds as module

    doc = module.__doc__
    start = doc.index("::\n") + 3
    code = textwrap.dedent(doc[start:doc.index("\n\n", doc.index("fds.update()"))])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Conv2d(3, 256, 3, stride=2, padding=1)
            self.decoder = torch.nn.Sequential(torch.nn.Conv2d(256, 1, 1), torch.nn.Upsample(scale_factor=2))

    model = Model()
    loader = [(torch.randn(2, 3, 8, 10), 10 * torch.rand(2, 1, 8, 10), torch.rand(2, 1, 8, 10) > 0.1)
              for _ in range(2)]

    def criterion(pred, depth, valid):
        return ((pred - depth) ** 2)[valid].mean()

    env = dict(imbreg_fast=imbreg_fast, torch=torch, F=torch.nn.functional, device="cpu", epochs=2, model=model,
               loader=loader, criterion=criterion, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3))
    exec(code, env)
    assert int(env["fds"].epoch) == 2 and (env["fds"].num_samples_tracked > 0).any()


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_rejected_with_clear_errors():
    fds = FDS(4, 5, (0.0, 5.0))
    x, y = torch.randn(2, 4, 3, 3), torch.rand(2, 1, 3, 3) * 5
    with pytest.raises(ValueError, match="feature_dim = 4"):
        fds(torch.randn(2, 3, 3, 3), y)
    with pytest.raises(ValueError, match="labels must have shape"):
        fds(x, torch.rand(2, 1, 4, 3))
    with pytest.raises(ValueError, match="labels must have shape"):
        fds.accumulate(torch.randn(7, 4), torch.rand(6))
    with pytest.raises(ValueError, match=r"\[N, C\] or dense"):
        fds(torch.randn(2, 4, 3), y)
    with pytest.raises(TypeError, match="features must have a floating dtype"):
        fds(torch.ones(2, 4, 3, 3, dtype=torch.long), y)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        fds(x, [1.0])
    with pytest.raises(TypeError, match="mask must be a bool"):
        fds(x, y, torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="mask must have shape .* for labels of shape"):
        fds(x, y, torch.ones(2, 3, 3, dtype=torch.bool))
    bad = y.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="labels contain NaN"):
        fds.accumulate(x, bad)
    fds.accumulate(x, bad, ~torch.isnan(bad))               # masked out: fine


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_features_rejected_without_corrupting_statistics(backend):
    fds = FDS(4, 5, (0.0, 5.0), backend=backend)
    x, y = torch.randn(2, 4, 3, 3), torch.rand(2, 1, 3, 3) * 5
    fds.accumulate(x, y)
    before = copy.deepcopy(fds.state_dict())
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[1, 2, 0, 1] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            fds.accumulate(bad, y)
    huge = x.double()
    huge[0, 1, 2, 2] = 1e200                                # finite, but its square overflows float64
    with pytest.raises(ValueError, match="overflow"):
        fds.accumulate(huge, y)
    for name, v in fds.state_dict().items():
        assert torch.equal(v, before[name]), name
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    mask[1, 0, 0, 1] = False
    bad = x.clone()
    bad[1, :, 0, 1] = float("nan")
    fds.accumulate(bad, y, mask)                           # the NaN pixel is masked out
    assert torch.isfinite(fds.accum_m2).all()


def test_constructor_validation():
    with pytest.raises(ValueError, match="covariance"):
        FDS(4, 5, (0.0, 1.0), covariance="low-rank")
    with pytest.raises(ValueError, match="eps must be > 0"):
        FDS(4, 5, (0.0, 1.0), eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        FDS(4, 5, (0.0, 1.0), momentum=1.5)
    with pytest.raises(ValueError, match="clip"):
        FDS(4, 5, (0.0, 1.0), clip=(2.0, 1.0))
    with pytest.raises(TypeError, match="feature_dim"):
        FDS(4.0, 5, (0.0, 1.0))
    with pytest.raises(ValueError, match="range"):
        FDS(4, 5)
    with pytest.raises(ValueError, match="ks"):
        FDS(4, 5, (0.0, 1.0), ks=4)
    with pytest.raises(ValueError, match="start_smooth"):
        FDS(4, 5, (0.0, 1.0), start_smooth=-1)
    edges = FDS(2, [0.0, 1.0, 3.0, 4.0]).edges
    assert edges.tolist() == [0.0, 1.0, 3.0, 4.0]


def test_explicit_backend_that_cannot_run_raises():
    fds = FDS(2, 3, (0.0, 3.0), backend="triton")
    x, y = torch.randn(5, 2), torch.rand(5) * 3
    if imbreg_fast._dispatch._triton_reason(x.device) is not None:
        with pytest.raises(RuntimeError, match="triton"):
            fds.accumulate(x, y)
    if not CPP_OK:
        with pytest.raises(RuntimeError, match="cpp"):
            FDS(2, 3, (0.0, 3.0), backend="cpp").accumulate(x, y)
