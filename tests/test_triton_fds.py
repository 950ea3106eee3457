"""Triton backend of the FDS ops (``imbreg_fast::triton_fds_accumulate`` / ``triton_fds_recolor``).

Every result is compared with the torch backend of the same public op AND with plain-loop references
written here (per pixel, per bin, Python floats), never with imbreg_fast code. Under TRITON_INTERPRET=1
the problems are tiny (a few hundred pixels, C <= 136); the small block configuration exercises the
multi-block counting sort, several chunks per bin, several pixel sub-blocks per chunk and several channel
tiles, the default configuration is the one the ops use.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_fds.py -q``
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch


from imbreg_fast import _dispatch

pytestmark = pytest.mark.requires_triton

OPS = torch.ops.imbreg_fast


def _kernels():
    from imbreg_fast.triton_kernels import fds
    return fds


def _small_config():
    return _kernels().FDSConfig(sort_block=64, recolor_tile=16, recolor_block_co=16, recolor_block_ci=16,
                                diag_block_p=32, diag_block_c=8, stats_chunk=32, stats_block_p=16,
                                stats_block_c=16)


# --------------------------------------------------------------------------------------------------
# Plain-loop references
# --------------------------------------------------------------------------------------------------


def ref_accumulate(features3, bins, num_bins, full):
    """Per bin: the list of its pixels' vectors; two-pass mean and centred second moments (Python floats).
    Pixels whose bin is outside [0, num_bins) are skipped."""
    z = features3.detach().double().tolist()                                     # [B][C][P]
    kb = bins.tolist()
    n_b, c, n_p = features3.shape
    members = [[] for _ in range(num_bins)]
    for b in range(n_b):
        for p in range(n_p):
            k = kb[b][p]
            if 0 <= k < num_bins:
                members[k].append([z[b][ch][p] for ch in range(c)])
    count, mean, m2 = [], [], []
    for vecs in members:
        n = len(vecs)
        mu = [sum(v[i] for v in vecs) / n if n else 0.0 for i in range(c)]
        d = [[v[i] - mu[i] for i in range(c)] for v in vecs]
        if full:
            m = [[sum(r[i] * r[j] for r in d) for j in range(c)] for i in range(c)]
        else:
            m = [sum(r[i] * r[i] for r in d) for i in range(c)]
        count.append(float(n))
        mean.append(mu)
        m2.append(m)
    f64 = torch.float64
    return torch.tensor(count, dtype=f64), torch.tensor(mean, dtype=f64).reshape(num_bins, c), \
        torch.tensor(m2, dtype=f64).reshape((num_bins, c, c) if full else (num_bins, c))


def ref_recolor(features3, bins, transform, shift):
    """Per pixel: A_k z + s_k (diag: a_k * z + s_k), z where k is outside [0, nb). Python floats, [B, C, P]."""
    z = features3.detach().double().tolist()
    kb = bins.tolist()
    a = transform.detach().double().tolist()
    s = shift.detach().double().tolist()
    nb = len(a)
    full = transform.dim() == 3
    n_b, c, n_p = features3.shape
    out = [[[0.0] * n_p for _ in range(c)] for _ in range(n_b)]
    for b in range(n_b):
        for p in range(n_p):
            k = kb[b][p]
            v = [z[b][j][p] for j in range(c)]
            for i in range(c):
                if not 0 <= k < nb:
                    out[b][i][p] = v[i]
                elif full:
                    out[b][i][p] = sum(a[k][i][j] * v[j] for j in range(c)) + s[k][i]
                else:
                    out[b][i][p] = a[k][i] * v[i] + s[k][i]
    return torch.tensor(out, dtype=torch.float64)


def ref_recolor_grad(grad_out, bins, transform):
    """d z = A_k^T g per pixel (diag: a_k * g), g where the pixel is skipped."""
    g = grad_out.detach().double().tolist()
    kb = bins.tolist()
    a = transform.detach().double().tolist()
    nb = len(a)
    full = transform.dim() == 3
    n_b, c, n_p = grad_out.shape
    out = [[[0.0] * n_p for _ in range(c)] for _ in range(n_b)]
    for b in range(n_b):
        for p in range(n_p):
            k = kb[b][p]
            for j in range(c):
                if not 0 <= k < nb:
                    out[b][j][p] = g[b][j][p]
                elif full:
                    out[b][j][p] = sum(a[k][i][j] * g[b][i][p] for i in range(c))
                else:
                    out[b][j][p] = a[k][j] * g[b][j][p]
    return torch.tensor(out, dtype=torch.float64)


def ref_group(bins, num_bins):
    """Pixel ids b * P + p grouped by bin (pixel order within a bin); out-of-range bins last."""
    groups = [[] for _ in range(num_bins + 1)]
    for i, k in enumerate(bins.reshape(-1).tolist()):
        groups[k if 0 <= k < num_bins else num_bins].append(i)
    return [i for grp in groups for i in grp], [len(grp) for grp in groups]


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def make_bins(b, p, num_bins, skip=0.2):
    """Skewed bins (bin 0 holds ~40% of the kept pixels, so it spans several chunks in the small
    config), bins 1 and num_bins - 2 empty, a fraction ``skip`` of pixels -1."""
    weights = torch.ones(num_bins)
    weights[0] = num_bins * 0.6
    weights[1] = 0.0
    weights[num_bins - 2] = 0.0
    k = torch.multinomial(weights, b * p, replacement=True).reshape(b, p)
    return torch.where(torch.rand(b, p) < skip, torch.full_like(k, -1), k)


def make_features(layout, b, c, h, w, dtype=torch.float32):
    """[B, C, P] features in one of the layouts the FDS module passes (checked by their strides)."""
    p = h * w
    if layout == "dense":
        z = (torch.randn(b, c, h, w, dtype=dtype) * 2 + 0.5).flatten(2)
        assert z.is_contiguous()
    elif layout == "channels_last":
        x = (torch.randn(b, c, h, w, dtype=dtype) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
        z = x.flatten(2)
        assert z.stride() == (p * c, 1, c)                                      # a view, no copy
    elif layout == "rows":                                                      # [N, C] rows -> [1, C, N]
        z = (torch.randn(b * p, c, dtype=dtype) + 0.5).t().unsqueeze(0)
        assert z.stride()[1:] == (1, c)
    elif layout == "rows_transposed":                                           # rows = a [C, N] tensor's .t()
        rows = (torch.randn(c, b * p, dtype=dtype) + 0.5).t()
        z = rows.t().unsqueeze(0)
        assert z.is_contiguous()
    elif layout == "strided_p":                                                 # every other pixel
        z = (torch.randn(b, c, 2 * p, dtype=dtype) + 0.5)[:, :, ::2]
        assert z.stride()[2] == 2
    else:
        raise AssertionError(layout)
    return z


def make_transform(num_bins, c, full, dtype=torch.float32):
    if full:
        t = torch.randn(num_bins, c, c, dtype=dtype) / c ** 0.5 + torch.eye(c, dtype=dtype)
    else:
        t = torch.rand(num_bins, c, dtype=dtype) + 0.5
    return t, torch.randn(num_bins, c, dtype=dtype)


def torch_impl(op, tensor):
    return _dispatch.resolve(op, tensor, "torch")[1]


def triton_impl(op, tensor):
    name, fn = _dispatch.resolve(op, tensor, "triton")
    assert name == "triton"
    return fn


def assert_close(name, actual, expected, rtol=1e-5):
    """Normwise relative check: |a - e| <= rtol * (|e| + max |e|)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{name}: {m}")


def check_stats(name, got, expected, rtol=1e-5):
    for part, a, e in zip(("count", "mean", "m2"), got, expected):
        assert a.dtype == torch.float64, f"{name} {part}: dtype {a.dtype}"
        assert_close(f"{name} {part}", a, e, rtol)


# --------------------------------------------------------------------------------------------------
# Grouping by bin (counting sort)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [64, 256])
def test_group_by_bin_is_a_stable_counting_sort(block):
    bins = make_bins(3, 70, 9)
    bins[0, :5] = torch.tensor([9, 12, -3, 0, 8])                              # out of range -> skipped group
    perm, start, count = _kernels().group_by_bin(bins, 9, block)
    order, sizes = ref_group(bins, 9)
    assert perm.dtype == torch.int32
    assert perm.tolist() == order
    assert count.tolist() == sizes
    assert start.tolist() == [sum(sizes[:k]) for k in range(10)]


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------

LAYOUT_CASES = [  # (layout, B, C, H, W, num_bins)
    ("dense", 2, 20, 7, 11, 9),
    ("channels_last", 2, 13, 6, 9, 7),
    ("rows", 1, 40, 10, 13, 12),
    ("rows_transposed", 1, 8, 9, 15, 5),
    ("strided_p", 2, 24, 5, 13, 8),
]


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("layout,b,c,h,w,nb", LAYOUT_CASES, ids=[case[0] for case in LAYOUT_CASES])
def test_accumulate_matches_references(layout, b, c, h, w, nb, full):
    z = make_features(layout, b, c, h, w)
    bins = make_bins(b, h * w, nb)
    expected = ref_accumulate(z, bins, nb, full)
    assert float(expected[0][1]) == 0.0 and float(expected[0][nb - 2]) == 0.0    # empty bins present
    got = triton_impl("fds_accumulate", z)(z, bins, nb, full)
    check_stats("triton vs loops", got, expected)
    check_stats("triton vs torch", got, torch_impl("fds_accumulate", z)(z, bins, nb, full))


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("layout", ["dense", "channels_last"])
def test_accumulate_small_blocks(layout, full):
    """Several sort blocks, chunks per bin (merge kernel), sub-blocks per chunk and channel tiles."""
    b, c, h, w, nb = 2, 37, 8, 12, 6
    z = make_features(layout, b, c, h, w)
    bins = make_bins(b, h * w, nb)
    expected = ref_accumulate(z, bins, nb, full)
    assert float(expected[0][0]) > 2 * _small_config().stats_chunk                # bin 0 spans >= 3 chunks
    got = _kernels().fds_accumulate(z, bins, nb, full, config=_small_config())
    check_stats("small blocks vs loops", got, expected)


def test_accumulate_wide_channels_mirrors_tiles():
    """C = 136 > 2 default channel tiles: off-diagonal tiles are computed once and mirrored."""
    b, c, p, nb = 1, 136, 40, 4
    z = torch.randn(b, c, p) + 1.0
    bins = torch.randint(-1, nb, (b, p))
    got = OPS.triton_fds_accumulate(z, bins, nb, True)
    check_stats("wide vs loops", got, ref_accumulate(z, bins, nb, True))
    assert torch.equal(got[2], got[2].mT)


def test_accumulate_large_offset_is_centred():
    """|mean| = 1e5 x spread: E[zz^T] - mu mu^T would lose every digit in fp32, and so would fp32 means
    differenced at 1e3 (ulp 6e-5 vs spread 1e-2); the shifted, centred kernels keep fp32 accuracy.
    The references get the same fp32-rounded inputs."""
    b, c, p, nb = 1, 5, 120, 3
    z = (torch.randn(b, c, p, dtype=torch.float64) * 1e-2 + 1e3).float()
    bins = torch.randint(0, nb, (b, p))
    expected = ref_accumulate(z, bins, nb, True)
    check_stats("offset fp32, small blocks", _kernels().fds_accumulate(z, bins, nb, True, config=_small_config()),
                expected)
    check_stats("offset fp32", OPS.triton_fds_accumulate(z, bins, nb, True), expected)
    check_stats("offset fp64", OPS.triton_fds_accumulate(z.double(), bins, nb, True), expected, rtol=1e-12)


def test_accumulate_fp64_and_fp16():
    b, c, h, w, nb = 2, 11, 6, 7, 5
    z = make_features("dense", b, c, h, w, torch.float64)
    bins = make_bins(b, h * w, nb)
    check_stats("fp64", OPS.triton_fds_accumulate(z, bins, nb, True), ref_accumulate(z, bins, nb, True), 1e-12)
    zh = z.half()
    check_stats("fp16 input", OPS.triton_fds_accumulate(zh, bins, nb, False),
                ref_accumulate(zh, bins, nb, False), 1e-5)


def test_accumulate_all_skipped_and_empty():
    z = torch.randn(2, 6, 10)
    bins = torch.full((2, 10), -1)
    count, mean, m2 = OPS.triton_fds_accumulate(z, bins, 4, True)
    assert count.abs().sum() == 0 and mean.abs().sum() == 0 and m2.abs().sum() == 0
    count, mean, m2 = OPS.triton_fds_accumulate(torch.randn(2, 6, 0), torch.zeros(2, 0, dtype=torch.int64), 4, False)
    assert count.shape == (4,) and mean.shape == (4, 6) and m2.shape == (4, 6) and m2.abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# Recolouring
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("layout,b,c,h,w,nb", LAYOUT_CASES, ids=[case[0] for case in LAYOUT_CASES])
def test_recolor_matches_references(layout, b, c, h, w, nb, full):
    z = make_features(layout, b, c, h, w)
    z_before = z.clone()
    bins = make_bins(b, h * w, nb)
    transform, shift = make_transform(nb, c, full)
    out = triton_impl("fds_recolor", z)(z, bins, transform, shift)
    assert out.is_contiguous() and out.dtype == z.dtype and out.shape == z.shape
    assert out.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()
    assert torch.equal(z, z_before)                                                   # never in place
    assert_close("triton vs loops", out, ref_recolor(z, bins, transform, shift))
    assert_close("triton vs torch", out, torch_impl("fds_recolor", z)(z, bins, transform, shift))
    skipped = bins.unsqueeze(1).expand_as(z) < 0
    assert torch.equal(out[skipped], z[skipped])                                      # identity, bit for bit


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_recolor_small_blocks(full):
    b, c, h, w, nb = 2, 37, 8, 12, 6
    z = make_features("channels_last", b, c, h, w)
    bins = make_bins(b, h * w, nb)
    transform, shift = make_transform(nb, c, full)
    out = _kernels().fds_recolor(z, bins, transform, shift, config=_small_config())
    assert_close("small blocks vs loops", out, ref_recolor(z, bins, transform, shift))


def test_recolor_wide_channels():
    """C = 136: two output-channel programs of 128, five input-channel steps of 32."""
    b, c, p, nb = 1, 136, 40, 4
    z = torch.randn(b, c, p)
    bins = torch.randint(-1, nb, (b, p))
    transform, shift = make_transform(nb, c, True)
    out = OPS.triton_fds_recolor(z, bins, transform, shift)
    assert_close("wide vs loops", out, ref_recolor(z, bins, transform, shift))


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_recolor_fp64_and_fp16(full):
    b, c, h, w, nb = 2, 11, 6, 7, 5
    bins = make_bins(b, h * w, nb)
    z = make_features("dense", b, c, h, w, torch.float64)
    transform, shift = make_transform(nb, c, full, torch.float64)
    out = OPS.triton_fds_recolor(z, bins, transform, shift)
    assert out.dtype == torch.float64
    assert_close("fp64", out, ref_recolor(z, bins, transform, shift), 1e-12)
    zh = z.half()
    out_h = OPS.triton_fds_recolor(zh, bins, transform.float(), shift.float())
    assert out_h.dtype == torch.float16
    expected = ref_recolor(zh, bins, transform.float(), shift.float())
    assert_close("fp16 vs loops", out_h, expected, 1e-3)                              # fp16 output rounding
    assert_close("fp16 vs torch", out_h, torch_impl("fds_recolor", zh)(zh, bins, transform.float(), shift.float()),
                 1e-3)


def test_recolor_out_of_range_bins_are_skipped():
    """Documented behaviour of the Triton kernels: bins outside [0, nb) act as -1 (no out-of-bounds read)."""
    z = torch.randn(1, 9, 30)
    bins = torch.randint(0, 4, (1, 30))
    bins[0, ::4] = 7
    bins[0, 1::5] = -4
    for full in (True, False):
        transform, shift = make_transform(4, 9, full)
        assert_close("out of range", OPS.triton_fds_recolor(z, bins, transform, shift),
                     ref_recolor(z, bins, transform, shift))


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_recolor_gradient(full):
    """Autograd through the op (backward = the op with A^T, zero shift) against the loop A_k^T g."""
    b, c, h, w, nb = 2, 19, 6, 9, 7
    z = make_features("channels_last", b, c, h, w).detach().requires_grad_(True)
    bins = make_bins(b, h * w, nb)
    transform, shift = make_transform(nb, c, full)
    grad_out = torch.randn(b, c, h * w) * 3                                         # not ones
    out = triton_impl("fds_recolor", z)(z, bins, transform, shift)
    (out * grad_out).sum().backward()
    assert_close("grad vs loops", z.grad, ref_recolor_grad(grad_out, bins, transform))
    z_t = z.detach().clone().requires_grad_(True)
    (torch_impl("fds_recolor", z_t)(z_t, bins, transform, shift) * grad_out).sum().backward()
    assert_close("grad vs torch", z.grad, z_t.grad)


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_recolor_gradcheck_fp64(full):
    b, c, p, nb = 1, 5, 12, 3
    z = torch.randn(b, c, p, dtype=torch.float64, requires_grad=True)
    bins = torch.tensor([[0, 2, -1, 1, 0, 0, 2, -1, 1, 1, 0, 2]])
    transform, shift = make_transform(nb, c, full, torch.float64)

    def fn(x):
        return OPS.triton_fds_recolor(x, bins, transform, shift)

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (z,), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


# --------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, dispatch, import hygiene, bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_opcheck(full):
    b, c, h, w, nb = 2, 6, 4, 5, 5
    z = make_features("channels_last", b, c, h, w)
    bins = make_bins(b, h * w, nb)
    torch.library.opcheck(OPS.triton_fds_accumulate.default, (z, bins, nb, full))
    transform, shift = make_transform(nb, c, full)
    torch.library.opcheck(OPS.triton_fds_recolor.default, (z.detach().requires_grad_(True), bins, transform, shift))


def test_compile_fullgraph_recolor():
    """torch.compile(fullgraph=True) of recolour + a loss, forward and backward: equals eager."""
    torch._dynamo.reset()
    b, c, h, w, nb = 2, 10, 4, 6, 5
    x = torch.randn(b, c, h, w)
    bins = make_bins(b, h * w, nb)
    transform, shift = make_transform(nb, c, True)
    weight = torch.randn(b, c, h * w)

    def step(x):
        y = OPS.triton_fds_recolor(torch.tanh(x).flatten(2), bins, transform, shift)
        return (y * weight).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        loss = fn(xi)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    (eager_loss, eager_grad), (comp_loss, comp_grad) = results
    assert_close("compiled loss", comp_loss, eager_loss)
    assert_close("compiled grad", comp_grad, eager_grad)


def test_dispatch_triton_is_explicit_only_on_cpu():
    z = torch.randn(1, 3, 4)
    if z.device.type == "cpu":
        assert _dispatch.resolve("fds_recolor", z)[0] != "triton"                     # auto never picks it on CPU
    assert _dispatch.resolve("fds_recolor", z, "triton")[0] == "triton"
    assert _dispatch.resolve("fds_accumulate", z, "triton")[0] == "triton"


def test_importing_the_backend_does_not_import_triton():
    code = "import sys, imbreg_fast, imbreg_fast.ops.fds; assert 'triton' not in sys.modules, 'triton imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(1, 4, 6)
    bins = torch.zeros(1, 6, dtype=torch.int64)
    transform, shift = make_transform(3, 4, True)
    with pytest.raises(TypeError, match="bins"):
        OPS.triton_fds_recolor(z, bins.int(), transform, shift)
    with pytest.raises(ValueError, match="bins"):
        OPS.triton_fds_recolor(z, bins[:, :5], transform, shift)
    with pytest.raises(ValueError, match="transform"):
        OPS.triton_fds_recolor(z, bins, transform[:, :3], shift)
    with pytest.raises(ValueError, match="shift"):
        OPS.triton_fds_recolor(z, bins, transform, shift[:2])
    with pytest.raises(ValueError, match="features"):
        OPS.triton_fds_accumulate(z[0], bins, 3, True)
    with pytest.raises(ValueError, match="num_bins"):
        OPS.triton_fds_accumulate(z, bins, 0, True)
