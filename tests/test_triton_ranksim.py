"""Triton ops of RankSim: ``imbreg_fast::triton_ranksim_fwd`` / ``triton_ranksim_bwd``.

Run with ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_ranksim.py -q`` on CPU (small
sizes: the interpreter runs one program after another), or on a CUDA machine. The public-function checks
against the plain-loop oracle and the published code also run for the Triton backend in
tests/test_ranksim.py when TRITON_INTERPRET=1.
"""
import pytest
import torch

from imbreg_fast.ops.ranksim import label_keys, rank_normalised
from naive_ranksim import ranksim_naive

pytestmark = pytest.mark.requires_triton


def kernels():
    from imbreg_fast.triton_kernels import ranksim
    return ranksim


def batch(m, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, m // 2, (m,), generator=g).double()
    return x.to(dtype).to(device), y.to(dtype).to(device)


@pytest.mark.parametrize("reduction", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow)])
def test_many_blocks_vs_naive(reduction, triton_device):
    """m = 70 > the rank block (64): two column blocks and two comparison tiles per row, partial tiles in
    the similarity and chain kernels; d = 37 > BLOCK_D: two feature chunks."""
    m, d = 70, 37
    x, y = batch(m, d, torch.float64, triton_device)
    loss, z, n, s, rf, ry = kernels().ranksim_fwd(x, y, None, 2.0, reduction, True)
    assert torch.equal(rf, rank_normalised(s, torch.float64))
    assert torch.equal(ry, rank_normalised(label_keys(y), torch.float64))
    go = torch.linspace(-1, 2, m, dtype=torch.float64) if reduction == 0 else torch.tensor(3.0, dtype=torch.float64)
    gx = kernels().ranksim_bwd(go.to(triton_device), z, n, s, rf, ry, None, 2.0, reduction)
    name = {0: "none", 1: "mean", 2: "sum"}[reduction]
    ref_loss, ref_grad = ranksim_naive(x.cpu().tolist(), y.cpu().tolist(), 2.0, name,
                                       go.tolist() if reduction == 0 else 3.0)
    torch.testing.assert_close(loss.cpu(), torch.tensor(ref_loss, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    ref_grad = torch.tensor(ref_grad, dtype=torch.float64)
    torch.testing.assert_close(gx.cpu(), ref_grad, rtol=1e-10, atol=1e-12 * ref_grad.abs().max().item())


def test_nan_ranks_like_torch_sort(triton_device):
    """Unchecked NaN: ranked above every number (torch.sort's order), ties the later index first."""
    x, y = batch(9, 3, torch.float32, triton_device, seed=1)
    x[4, 0] = float("nan")
    _, _, _, s, rf, _ = kernels().ranksim_fwd(x, y, None, 2.0, 2, True)
    assert torch.equal(rf, rank_normalised(s, torch.float32))


def test_no_grad_outputs_empty(triton_device):
    x, y = batch(12, 4, torch.float32, triton_device)
    out = kernels().ranksim_fwd(x, y, None, 2.0, 2, False)
    assert out[0].shape == () and all(t.numel() == 0 for t in out[1:])


def test_opcheck(triton_device):
    x, y = batch(10, 5, torch.float64, triton_device, seed=2)
    fwd = torch.ops.imbreg_fast.triton_ranksim_fwd
    for reduction in (0, 2):
        for count in (None, torch.tensor(6, device=triton_device)):
            torch.library.opcheck(fwd.default, (x.clone().requires_grad_(True), y, count, 2.0, reduction, True),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    count = torch.tensor(6, device=triton_device)
    _, z, n, s, rf, ry = fwd(x, y, count, 2.0, 2, True)
    torch.library.opcheck(torch.ops.imbreg_fast.triton_ranksim_bwd.default,
                          (torch.tensor(1.5, dtype=torch.float64, device=triton_device), z, n, s, rf, ry, count, 2.0, 2))
