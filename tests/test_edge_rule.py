"""The ``edge_rule`` of label binning (imbreg_fast.lds.bin_index, LabelWeights, label_histogram, FDS):
``'closed-left'`` (default, float64 comparison with the edges) and ``'float32-truncate'`` (the published
depth code's float32 ``int(depth * 10)``), against the published rule computed in numpy float32 here.

Run: ``.venv/bin/python -m pytest tests/test_edge_rule.py -q``
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imbreg_fast import FDS, lds

DEPTH_EDGES = lds.bin_edges(100, (0.0, 10.0))          # the published 0.1 m buckets over [0, 10) m
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.requires_cpp)]


def published_depth_bucket(depth: np.ndarray, buckets: int = 100, per_unit: float = 10.0) -> np.ndarray:
    """nyud2-dir: the float32 product depth * 10 truncated to int, at most buckets - 1 (clamped at 0 here)."""
    product = depth.astype(np.float32) * np.float32(per_unit)          # a float32 multiply
    return np.clip(np.trunc(product).astype(np.int64), 0, buckets - 1)


class TestBinIndex:
    def test_float32_7_2(self):
        y = torch.tensor([7.2], dtype=torch.float32)
        assert int(lds.bin_index(y, DEPTH_EDGES)) == 71                   # 7.19999981 < 7.2 in float64
        assert int(lds.bin_index(y, DEPTH_EDGES, "float32-truncate")) == 72

    def test_against_the_published_rule(self):
        g = torch.Generator().manual_seed(0)
        on_edges = torch.arange(0, 101, dtype=torch.float64) / 10            # float32(k / 10): the edge cases
        near = torch.cat([on_edges.float().nextafter(torch.tensor(-1.0)), on_edges.float(),
                          on_edges.float().nextafter(torch.tensor(11.0))])
        depth = torch.cat([near, torch.rand(5000, generator=g) * 10.5, torch.tensor([-0.05, 0.0, 10.0, 12.0])])
        depth = depth.float()
        ours = lds.bin_index(depth, DEPTH_EDGES, "float32-truncate")
        assert ours.dtype == torch.int64
        np.testing.assert_array_equal(ours.numpy(), published_depth_bucket(depth.numpy()))
        # the two rules differ exactly on float32 values whose float32 product rounds up to an edge
        default = lds.bin_index(depth, DEPTH_EDGES)
        assert bool((default != ours).any()) and bool(((ours - default).abs() <= 1).all())

    def test_shapes_dtypes_and_offset_range(self):
        d = torch.tensor([[7.2, 0.35], [9.99, 100.0]], dtype=torch.float64)   # float64 labels: rounded to float32
        out = lds.bin_index(d, DEPTH_EDGES, "float32-truncate")
        assert out.shape == d.shape
        np.testing.assert_array_equal(out.numpy(), published_depth_bucket(d.numpy()))
        # range (1, 3) in 0.5 bins: floor(float32(y - 1) * 2)
        edges = lds.bin_edges(4, (1.0, 3.0))
        y = torch.tensor([0.5, 1.0, 1.49, 1.5, 2.99, 3.0, 7.0])
        assert lds.bin_index(y, edges, "float32-truncate").tolist() == [0, 0, 0, 1, 3, 3, 3]
        integer_labels = torch.tensor([3, 5])
        assert lds.bin_index(integer_labels, lds.bin_edges(10, (0.0, 10.0)), "float32-truncate").tolist() == [3, 5]

    def test_bad_rule_and_edges(self):
        with pytest.raises(ValueError, match="edge_rule"):
            lds.bin_index(torch.tensor([1.0]), DEPTH_EDGES, "round")
        with pytest.raises(ValueError, match="edge_rule"):
            lds.LabelWeights(100, (0.0, 10.0), edge_rule="published")
        with pytest.raises(ValueError, match="equal-width"):
            lds.LabelWeights(torch.tensor([0.0, 1.0, 3.0]), edge_rule="float32-truncate")
        lds.LabelWeights(torch.linspace(0, 10, 101), edge_rule="float32-truncate")     # uniform edges: fine


class TestLabelWeights:
    def test_counts_and_lookup(self):
        depth = torch.tensor([7.2, 7.2, 7.25, 1.0, 3.3], dtype=torch.float32)
        for rule in ("closed-left", "float32-truncate"):
            lw = lds.LabelWeights(100, (0.0, 10.0), scheme="inv", lds=False, clip=None, edge_rule=rule).fit(depth)
            bins = published_depth_bucket(depth.numpy()) if rule == "float32-truncate" else \
                lds.bin_index(depth, DEPTH_EDGES).numpy()
            np.testing.assert_array_equal(lw.counts.numpy(), np.bincount(bins, minlength=100))
            w = lw.weights(depth)
            np.testing.assert_allclose(w.double().numpy(), lw.bin_weights[torch.as_tensor(bins)].numpy(), rtol=1e-7)
        default = lds.LabelWeights(100, (0.0, 10.0), scheme="inv", lds=False, clip=None).fit(depth)
        rule = lds.LabelWeights(100, (0.0, 10.0), scheme="inv", lds=False, clip=None,
                                edge_rule="float32-truncate").fit(depth)
        assert float(rule.counts[72]) == 3 and float(rule.counts[71]) == 0
        assert float(default.counts[72]) == 1 and float(default.counts[71]) == 2
        assert "float32-truncate" in repr(rule)

    def test_dense_mask_and_helpers(self):
        g = torch.Generator().manual_seed(1)
        depth = (torch.rand(2, 1, 4, 5, generator=g) * 9.5 + 0.3).float()
        depth[0, 0, 0, :3] = 7.2
        valid = torch.rand(depth.shape, generator=g) > 0.2
        valid[0, 0, 0, :3] = True
        bins = published_depth_bucket(depth[valid].numpy())
        counts = lds.label_histogram(depth, 100, (0.0, 10.0), mask=valid, edge_rule="float32-truncate")
        np.testing.assert_array_equal(counts.numpy(), np.bincount(bins, minlength=100))
        lw = lds.LabelWeights(100, (0.0, 10.0), scheme="sqrt_inv", edge_rule="float32-truncate").fit(depth, valid)
        w = lw.weights(depth, valid)
        assert float(w[~valid].abs().sum()) == 0
        np.testing.assert_allclose(w[valid].double().numpy(), lw.bin_weights[torch.as_tensor(bins)].numpy(), rtol=1e-6)
        sw = lds.sample_weights(depth, 100, "sqrt_inv", range=(0.0, 10.0), mask=valid, edge_rule="float32-truncate")
        torch.testing.assert_close(sw, w)
        density = lds.label_density(depth, 100, (0.0, 10.0), mask=valid, edge_rule="float32-truncate")
        torch.testing.assert_close(density, lw.density)


class TestFDS:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("covariance", ["diag", "full"])
    def test_rows_and_dense_go_to_the_published_bucket(self, backend, covariance):
        x = torch.randn(6, 2)
        y = torch.tensor([7.2, 7.2, 7.2, 7.35, 1.0, 1.0], dtype=torch.float32)
        for rule, bucket in (("closed-left", 71), ("float32-truncate", 72)):
            fds = FDS(2, 100, (0.0, 10.0), covariance=covariance, backend=backend, edge_rule=rule)
            fds.accumulate(x, y)
            assert float(fds.accum_count[bucket]) == 3                  # the three float32 7.2 m rows
            np.testing.assert_array_equal(fds.accum_count.numpy(),
                                          np.bincount(published_depth_bucket(y.numpy()), minlength=100)
                                          if rule == "float32-truncate" else
                                          np.bincount(lds.bin_index(y, DEPTH_EDGES).numpy(), minlength=100))
            assert "float32-truncate" in repr(fds) or rule == "closed-left"
        # dense maps with a mask, and the calibration uses the same buckets
        depth = torch.full((1, 1, 2, 3), 7.2)
        feats = torch.randn(1, 2, 2, 3)
        mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
        mask[0, 0, 0, 0] = False
        fds = FDS(2, 100, (0.0, 10.0), covariance=covariance, backend=backend, edge_rule="float32-truncate")
        fds.accumulate(feats, depth, mask)
        assert float(fds.accum_count[72]) == 5 and float(fds.accum_count.sum()) == 5
        fds.update()
        assert float(fds.num_samples_tracked[72]) == 5
        fds.train()
        out = fds(feats, depth, mask)
        assert out.shape == feats.shape

    def test_bad_rule(self):
        with pytest.raises(ValueError, match="edge_rule"):
            FDS(2, 100, (0.0, 10.0), edge_rule="nearest")
        with pytest.raises(ValueError, match="equal-width"):
            FDS(2, torch.tensor([0.0, 1.0, 5.0]), edge_rule="float32-truncate")
