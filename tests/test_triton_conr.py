"""Triton launchers of ConR: ``imbreg_fast.triton_kernels.conr`` (``conr_fwd`` / ``conr_bwd``).

Run with ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_conr.py -q`` on CPU (small n: the
interpreter runs one program after another), or on a CUDA machine. The public-function checks against the
plain-loop reference also run for the Triton backend in tests/test_conr.py when TRITON_INTERPRET=1.
"""
import pytest
import torch

from naive_conr import conr_naive
from test_conr import batch

pytestmark = pytest.mark.requires_triton

RED_CODE = {"none": 0, "mean": 1, "sum": 2}


def kernels():
    from imbreg_fast.triton_kernels import conr
    return conr


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("published", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_blocks_vs_naive(reduction, published, dtype, triton_device):
    """n = 70: three row programs and three column tiles of 32, the last ones partial; d = 20 (padded to 32)."""
    n, d = 70, 20
    f, y, p, w = batch(n, d, dtype, spread=10.0, seed=9)
    kw = dict(window=1.0, temperature=0.07, pushing=0.01, published_denominator=published)
    loss, grad = kernels().conr_fwd(f.to(triton_device), y.to(triton_device), p.to(triton_device),
                                    w.to(triton_device), kw["window"], kw["temperature"], kw["pushing"], published,
                                    RED_CODE[reduction], True)
    ref, ref_grad = conr_naive(f.double(), y.double(), p.double(), w.double(), reduction=reduction, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(loss.cpu().double(), torch.tensor(ref, dtype=torch.float64), **tol)
    torch.testing.assert_close(grad.cpu().double(), torch.tensor(ref_grad, dtype=torch.float64), **tol)


def test_bwd_vs_naive(triton_device):
    n, d = 45, 7
    f, y, p, w = batch(n, d, torch.float64, spread=8.0, seed=2)
    g = torch.linspace(-1.0, 1.5, n, dtype=torch.float64)
    grad = kernels().conr_bwd(f.to(triton_device), y.to(triton_device), p.to(triton_device), w.to(triton_device),
                              g.to(triton_device), 1.0, 0.2, 0.05, True)
    _, ref_grad = conr_naive(f, y, p, w, temperature=0.2, pushing=0.05, reduction="none", grad_rows=g.tolist())
    torch.testing.assert_close(grad.cpu(), torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-11, atol=1e-13)


def test_deterministic_run_to_run(triton_device):
    f, y, p, w = (t.to(triton_device) for t in batch(40, 9, torch.float32, seed=4))
    runs = [kernels().conr_fwd(f, y, p, w, 1.0, 0.07, 0.01, True, 1, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_no_grad_returns_empty(triton_device):
    f, y, p, w = (t.to(triton_device) for t in batch(10, 3, torch.float32))
    loss, grad = kernels().conr_fwd(f, y, p, None, 1.0, 0.07, 0.01, True, 0, True)
    assert loss.shape == (10,) and grad.numel() == 0


def test_d_limit(triton_device):
    f = torch.randn(4, 2000, device=triton_device)
    y = torch.zeros(4, device=triton_device)
    with pytest.raises(ValueError, match="d <= 1024"):
        kernels().conr_fwd(f, y, y, None, 1.0, 0.07, 0.01, True, 1, False)
