"""BNI on a uniform grid (issue [P] part 3; docs/methods.md §1.5): the chunked recurrence of the fused kernels
(2 exps per chunk of bins) against the torch backend, the general path (exp per bin) and the naive reference;
empty bins as zero weights (bin_prior's default); the masked rows of the d = 1 kernel."""
import math

import pytest
import torch

import imbreg_fast
from imbreg_fast import functional as F
from imbreg_fast.ops import balanced_mse as bm

from conftest import CPP_OK, op_kernel_registered
from naive_reference import bni_naive

pytestmark = pytest.mark.requires_cpp

GRID_PROBE = "imbreg_fast_bench::mixture_grid_chunk"
SIGMAS = (1e-3, 1e-2, 0.1, 0.3, 1.0, 10.0, 100.0, 1e3)   # in bin widths


def grid_chunk(centers, weights, noise_var, dtype):
    """The chunk length R the C++ kernel takes for these bins (0: the general path)."""
    if not op_kernel_registered(GRID_PROBE):
        pytest.skip("the grid probe is not in this build")
    tables = bm.bni_tables(torch.as_tensor(noise_var, dtype=dtype), centers.reshape(-1, 1).to(dtype),
                           weights.to(dtype), dtype)
    return torch.ops.imbreg_fast_bench.mixture_grid_chunk(*tables)


def problem(k=37, h=0.25, lo=-2.0, n=300, dtype=torch.float64, zero_every=0, seed=0):
    """Bins c_k = lo + k h (k < K), weights with some empty bins, predictions inside, just outside and far
    outside the grid, targets near them."""
    g = torch.Generator().manual_seed(seed)
    centers = (lo + h * torch.arange(k, dtype=torch.float64)).to(dtype)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.05
    if zero_every:
        weights[::zero_every] = 0.0
    weights = (weights / weights.sum()).to(dtype)
    span = k * h
    inside = lo + span * torch.rand(n - 40, generator=g, dtype=torch.float64)
    near = torch.cat([lo - h * torch.rand(10, generator=g, dtype=torch.float64) * 3,
                      lo + span + h * torch.rand(10, generator=g, dtype=torch.float64) * 3])
    far = torch.cat([lo - span * (1 + 5 * torch.rand(10, generator=g, dtype=torch.float64)),
                     lo + span * (2 + 5 * torch.rand(10, generator=g, dtype=torch.float64))])
    pred = torch.cat([inside, near, far])[torch.randperm(n, generator=g)].reshape(n, 1)
    target = pred + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype), centers, weights


def run(pred, target, noise_var, centers, weights, backend, reduction="none", mask=None, grad_output=None):
    p = pred.clone().requires_grad_()
    s2 = torch.tensor(noise_var, dtype=pred.dtype, requires_grad=True)
    loss = F.bni_loss(p, target, s2, centers, weights, mask=mask, reduction=reduction, backend=backend)
    g = grad_output if grad_output is not None else torch.ones_like(loss)
    loss.backward(g)
    return loss.detach(), p.grad, s2.grad


def assert_close_rel(got, ref, rtol):
    """|got - ref| <= rtol (|ref| + max|ref| 1e-3): relative per element, with a floor at 1e-3 of the scale
    (a loss or gradient that crosses 0 has no relative error of its own)."""
    scale = ref.abs().max().clamp_min(1e-300)
    err = ((got - ref).abs() / (ref.abs() + 1e-3 * scale)).max()
    assert err <= rtol, f"relative error {float(err):.3g} > {rtol}"


@pytest.mark.parametrize("sigma_bins", SIGMAS)
def test_grid_fp64_matches_torch_over_sigma(sigma_bins):
    h = 0.25
    pred, target, centers, weights = problem(h=h, zero_every=5)
    s2 = (sigma_bins * h) ** 2
    r = grid_chunk(centers, weights, s2, torch.float64)
    assert (r > 2) == (sigma_bins >= 0.3), r          # the recurrence is taken from ~0.26 bin widths up
    got = run(pred, target, s2, centers, weights, "cpp")
    ref = run(pred, target, s2, centers, weights, "torch")
    for a, b in zip(got, ref):
        assert_close_rel(a, b, 1e-6)


@pytest.mark.parametrize("sigma_bins", (0.3, 1.0, 10.0, 1e3))
def test_grid_fp64_matches_naive_reference(sigma_bins):
    h = 0.5
    pred, target, centers, weights = problem(k=21, h=h, n=60, zero_every=4, seed=1)
    s2 = (sigma_bins * h) ** 2
    assert grid_chunk(centers, weights, s2, torch.float64) > 2
    grad_output = 0.7
    loss, gp, gv = run(pred, target, s2, centers, weights, "cpp", reduction="mean",
                       grad_output=torch.tensor(grad_output, dtype=torch.float64))
    ref = bni_naive(pred, target, s2, centers, weights, reduction="mean", grad_output=grad_output)
    assert abs(float(loss) - ref.loss) <= 1e-9 * max(1.0, abs(ref.loss))
    torch.testing.assert_close(gp, torch.tensor(ref.grad_pred, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert abs(float(gv) - ref.grad_var) <= 1e-9 * max(1.0, abs(ref.grad_var))


@pytest.mark.parametrize("dtype,rtol", ((torch.float64, 1e-12), (torch.float32, 2e-5)))
@pytest.mark.parametrize("sigma_bins", (0.3, 1.0, 3.0, 100.0))
def test_grid_matches_general_path(dtype, rtol, sigma_bins):
    """The same bins in a shuffled order are not a grid: the kernel's general path (one exp per bin) on the
    same mathematical problem."""
    h = 0.25
    pred, target, centers, weights = problem(k=45, h=h, dtype=dtype, zero_every=7)
    s2 = (sigma_bins * h) ** 2
    perm = torch.randperm(centers.numel(), generator=torch.Generator().manual_seed(3))
    assert grid_chunk(centers, weights, s2, dtype) > 2
    assert grid_chunk(centers[perm], weights[perm], s2, dtype) == 0
    got = run(pred, target, s2, centers, weights, "cpp")
    ref = run(pred, target, s2, centers[perm], weights[perm], "cpp")
    for a, b in zip(got, ref):
        assert_close_rel(a, b, rtol)


@pytest.mark.parametrize("k", (3, 16, 17, 33, 100))
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_grid_chunk_tails_and_reductions(k, reduction):
    """K below, at and off a multiple of the chunk length; every reduction; an upstream gradient != 1."""
    h = 1.0
    pred, target, centers, weights = problem(k=k, h=h, n=97, zero_every=3 if k > 3 else 0)
    s2 = (2.0 * h) ** 2
    assert grid_chunk(centers, weights, s2, torch.float64) > 2
    g = torch.linspace(-1.0, 2.0, 97, dtype=torch.float64) if reduction == "none" else torch.tensor(
        -1.5, dtype=torch.float64)
    mask = torch.rand(97, generator=torch.Generator().manual_seed(4)) < 0.8
    got = run(pred, target, s2, centers, weights, "cpp", reduction, mask, g)
    ref = run(pred, target, s2, centers, weights, "torch", reduction, mask, g)
    for a, b in zip(got, ref):
        assert_close_rel(a, b, 1e-9)


def test_grid_taken_only_on_a_grid():
    c = torch.arange(10, dtype=torch.float32) * 0.5
    w = torch.full((10,), 0.1)
    assert grid_chunk(c, w, 1.0, torch.float32) == 16                      # a = h^2 / (2 s2) = 1/8
    bent = c.clone()
    bent[4] += 1e-3                                                           # not evenly spaced
    assert grid_chunk(bent, w, 1.0, torch.float32) == 0
    assert grid_chunk(c, w, 1e-4, torch.float32) == 0                        # sigma = 0.02 bins: general path
    assert grid_chunk(c[:1], w[:1] * 10, 1.0, torch.float32) == 0          # one bin
    # bin_prior's bins (float32 midpoints of linspace edges) are a grid within the kernel's tolerance
    y = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 7 + 1.3
    centers, weights = imbreg_fast.bin_prior(y, 100, dtype=torch.float32)
    assert centers.numel() == 100 and grid_chunk(centers, weights, 1.0, torch.float32) > 2


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_empty_bins_are_zero_weight_terms(dtype):
    """bin_prior's default keeps empty bins with weight 0: the same loss and gradients as with them dropped,
    on the grid (kept) and general (dropped: not evenly spaced) paths, and on the torch backend."""
    y = torch.cat([torch.rand(300, generator=torch.Generator().manual_seed(0)) * 2,
                   8 + torch.rand(100, generator=torch.Generator().manual_seed(1))]).to(dtype)
    c_all, w_all = imbreg_fast.bin_prior(y, 40, dtype=dtype)
    c_kept, w_kept = imbreg_fast.bin_prior(y, 40, dtype=dtype, drop_empty=True)
    assert (w_all == 0).any() and c_kept.numel() < c_all.numel()
    s2 = 0.5 ** 2
    assert grid_chunk(c_all, w_all, s2, dtype) > 2 and grid_chunk(c_kept, w_kept, s2, dtype) == 0
    pred = (torch.linspace(-3, 12, 211, dtype=dtype)).reshape(-1, 1)          # also over the empty middle
    target = pred.flip(0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    ref = run(pred, target, s2, c_kept, w_kept, "torch")
    for backend in ("torch", "cpp"):
        for centers, weights in ((c_all, w_all), (c_kept, w_kept)):
            got = run(pred, target, s2, centers, weights, backend)
            for a, b in zip(got, ref):
                assert_close_rel(a, b, tol)


def test_empty_bins_far_from_every_kept_bin():
    """sigma far below the distance to the nearest non-empty bin: a zero-weight bin right at the prediction must
    not set the shift (the kept terms would all underflow, log 0 = -inf)."""
    c = torch.arange(20, dtype=torch.float64)
    w = torch.zeros(20, dtype=torch.float64)
    w[[2, 15]] = 0.5
    pred = torch.tensor([[8.0], [9.5], [2.2]], dtype=torch.float64)
    target = pred + 0.1
    for s2 in (1e-4, 1e-2, 1.0):
        got = run(pred, target, s2, c, w, "cpp")
        ref = run(pred, target, s2, c, w, "torch")
        naive = bni_naive(pred, target, s2, c, w, reduction="none")
        assert all(torch.isfinite(x).all() for x in got + ref)
        torch.testing.assert_close(ref[0], torch.tensor(naive.loss, dtype=torch.float64), rtol=1e-12, atol=0)
        for a, b in zip(got, ref):
            assert_close_rel(a, b, 1e-9)


def test_zero_weights_validation():
    c = torch.arange(4.0)
    pred = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="bin_weights must be finite and >= 0"):
        F.bni_loss(pred, pred, 1.0, c, torch.tensor([0.5, -0.1, 0.3, 0.3]))
    with pytest.raises(ValueError, match="bin_weights must sum to 1"):
        F.bni_loss(pred, pred, 1.0, c, torch.zeros(4))
    with pytest.raises(ValueError, match="gmm weights must be finite and > 0"):   # GAI components stay > 0
        F.gai_loss(pred, pred, 1.0, (torch.tensor([1.0, 0.0]), torch.zeros(2), torch.ones(2)))


def test_grid_bit_identical_across_thread_counts():
    pred, target, centers, weights = problem(k=100, h=0.1, n=5000, dtype=torch.float32, zero_every=6)
    s2 = 0.1 ** 2
    assert grid_chunk(centers, weights, s2, torch.float32) > 2
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(run(pred, target, s2, centers, weights, "cpp", reduction="mean"))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("op", ("gai", "bni"))
def test_masked_rows_vector_path(dtype, op):
    """d = 1 groups of rows with dropped rows and the tail (the vector path with a lane select): NaN holes in
    dropped rows are never read; values equal the torch backend's."""
    g = torch.Generator().manual_seed(5)
    n = 203                                                   # not a multiple of any vector width
    pred = (torch.rand(n, 1, generator=g) * 10).to(dtype)
    target = (pred + 0.5 * torch.randn(n, 1, generator=g).to(dtype))
    mask = torch.rand(n, generator=g) < 0.7
    pred[~mask] = float("nan")
    target[~mask] = float("inf")
    if op == "gai":
        k = 5
        gmm = (torch.full((k,), 1.0 / k, dtype=dtype), torch.linspace(1, 9, k, dtype=dtype),
               torch.rand(k, generator=g).to(dtype) + 0.3)

        def f(p, s2, backend):
            return F.gai_loss(p, target, s2, gmm, mask=mask, reduction="sum", backend=backend)
    else:
        centers, weights = torch.arange(10, dtype=dtype) + 0.5, torch.full((10,), 0.1, dtype=dtype)

        def f(p, s2, backend):
            return F.bni_loss(p, target, s2, centers, weights, mask=mask, reduction="sum", backend=backend)

    out = {}
    for backend in ("torch", "cpp"):
        p = pred.clone().requires_grad_()
        s2 = torch.tensor(0.8, dtype=dtype, requires_grad=True)
        loss = f(p, s2, backend)
        loss.backward()
        out[backend] = (loss.detach(), p.grad, s2.grad)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, b in zip(out["cpp"], out["torch"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
    assert (out["cpp"][1][~mask] == 0).all()
