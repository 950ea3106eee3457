"""Self-test of tests/published_reference.py against values worked out by hand."""
import math

import pytest
import torch

from published_reference import (bmc_loss_candidates_published, bmc_loss_md_published, bmc_loss_published,
                                 bni_loss_published, gai_loss_published)


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
