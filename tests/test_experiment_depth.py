"""``python -m imbreg_fast train depth``: the scene generator, each method's training step (experiments.methods),
and the command end to end in a tiny configuration (JSON schema, figures, backends, reference timings, errors)."""
from __future__ import annotations

import json

import pytest
import torch

from imbreg_fast import _dispatch
from imbreg_fast.experiments import cli
from imbreg_fast.experiments import depth as D
from imbreg_fast.experiments import methods as M
from imbreg_fast.lds import bin_edges, bin_index

CPP = _dispatch.unavailable_reason("cpp", torch.device("cpu")) is None

# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_in_the_seed():
    a = D.make_scenes(5, 16, 24, seed=3, chunk=2)
    b = D.make_scenes(5, 16, 24, seed=3)                 # chunking does not change the data
    c = D.make_scenes(5, 16, 24, seed=4)
    for x, y in ((a.image, b.image), (a.depth, b.depth), (a.mask, b.mask)):
        assert torch.equal(x, y)
    assert not torch.equal(a.depth, c.depth)


def test_scene_shapes_dtypes_and_holes():
    s = D.make_scenes(6, 16, 24, seed=0)
    assert s.image.shape == (6, 3, 16, 24) and s.image.dtype == torch.float32
    assert s.depth.shape == (6, 1, 16, 24) and s.depth.dtype == torch.float32
    assert s.mask.shape == (6, 1, 16, 24) and s.mask.dtype == torch.bool
    assert len(s) == 6
    assert torch.isfinite(s.image).all() and torch.isfinite(s.depth).all()
    assert (s.depth[~s.mask] == 0).all()
    valid = s.depth[s.mask]
    assert (valid > 0).all() and (valid < D.MAX_DEPTH).all()
    assert (~s.mask).any()                                # holes
    assert s.mask.float().mean() > 0.8


def test_odd_image_sizes_render_finite_depth():
    s = D.make_scenes(2, 15, 17, seed=1)
    assert torch.isfinite(s.depth).all() and s.mask.any()


def test_training_depths_are_long_tailed_and_test_scenes_reach_far():
    train = D.make_scenes(96, 24, 32, seed=0)
    y = train.depth[train.mask]
    near = ((y >= 1) & (y < 4)).float().mean()
    far = (y > 6).float().mean()
    assert near > 0.7                                     # most pixels at 1-4 m
    assert 0 < far < 0.03                                 # few beyond 6 m
    test = D.make_scenes(48, 24, 32, seed=1, balanced=True)
    assert (test.depth[test.mask] > 6).float().mean() > 5 * far


def test_balance_mask_caps_each_bin():
    test = D.make_scenes(16, 24, 32, seed=2, balanced=True)
    edges = bin_edges(100, (0.0, 10.0))
    keep, cap = D.balance_mask(test.depth, test.mask, edges, start=0.7, seed=0)
    assert keep.dtype == torch.bool and keep.shape == test.mask.shape
    assert not (keep & ~test.mask).any()
    counts = torch.bincount(bin_index(test.depth[keep], edges), minlength=100)
    assert counts[:7].sum() == 0                          # below 0.7 m: dropped
    assert counts.max() <= cap and (counts == cap).sum() > 10
    again, _ = D.balance_mask(test.depth, test.mask, edges, start=0.7, seed=0)
    assert torch.equal(keep, again)


# --------------------------------------------------------------------------------------------------
# the methods' training steps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    data = D.make_scenes(4, 16, 16, seed=0)
    cfg = M.MethodConfig(bins=100, label_range=(0.0, 10.0), bmc_candidates=32, gmm_components=3, lds_mode="reflect",
                         inv_clip=None)
    priors = M.fit_priors(data.depth, data.mask, cfg, methods=list(M.METHODS))
    return data, priors


def _factory(out_channels):
    return D.DepthNet(out_channels, width=4)


@pytest.mark.parametrize("name", list(M.METHODS))
def test_each_method_step_changes_parameters(tiny, name):
    data, priors = tiny
    stage_one = M.build("mse", priors, _factory).model if name == "rrt" else None
    run = M.build(name, priors, _factory, pretrained=stage_one)
    before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    batch = (data.image, data.depth, data.mask)
    for _ in range(2):
        loss = run.step(*batch)
        assert torch.isfinite(loss)
    run.end_epoch()
    loss = run.step(*batch)                               # FDS re-colours from epoch 1 on
    assert torch.isfinite(loss)
    after = run.model.state_dict()
    changed = {k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])}
    head = {k for k in after if k.startswith("head.")}
    assert head & changed, "the head was not trained"
    if name == "rrt":
        assert not {k for k in changed if k.startswith("encoder.")}, "RRT changed its frozen encoder"
        assert all(not p.requires_grad for p in run.model.encoder.parameters())
    else:
        assert {k for k in changed if k.startswith("encoder.")}
    pred = run.predict(data.image)
    assert pred.shape == data.depth.shape


def test_fds_statistics_are_updated(tiny):
    data, priors = tiny
    run = M.build("fds", priors, _factory)
    fds = run.fds
    assert fds is not None and fds.feature_dim == 8 and int(fds.epoch) == 0
    run.step(data.image, data.depth, data.mask)
    assert fds.accum_count.sum() > 0                      # accumulated during the step
    run.end_epoch()
    assert int(fds.epoch) == 1 and fds.num_samples_tracked.sum() > 0
    seen = fds.num_samples_tracked > 0
    eye = torch.eye(8, dtype=torch.float64)
    assert not torch.allclose(fds.transform[seen], eye.expand(int(seen.sum()), 8, 8))


def test_rrt_keeps_the_stage_one_encoder_and_bn_statistics(tiny):
    data, priors = tiny
    mse = M.build("mse", priors, _factory)
    mse.step(data.image, data.depth, data.mask)
    rrt = M.build("rrt", priors, _factory, pretrained=mse.model)
    assert rrt.model is not mse.model
    enc = {k: v.clone() for k, v in rrt.model.encoder.state_dict().items()}
    for _ in range(3):
        rrt.step(data.image, data.depth, data.mask)
    for k, v in rrt.model.encoder.state_dict().items():
        assert torch.equal(v, enc[k]), k                  # weights and BN running statistics
    assert torch.equal(rrt.model.encoder.stem[0].weight, mse.model.encoder.stem[0].weight)
    with pytest.raises(ValueError, match="pretrained"):
        M.build("rrt", priors, _factory)


def test_labels_at_feature_resolution():
    y = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 1, 2, 2)
    m = torch.tensor([[True, True], [False, True]]).view(1, 1, 2, 2)
    f = torch.zeros(1, 4, 1, 1)
    ly, lm = M.labels_at(f, y, m)
    assert ly.shape == (1, 1, 1, 1) and torch.allclose(ly, torch.tensor(11.0 / 3))
    assert lm.item()
    ly, lm = M.labels_at(f, y, torch.zeros_like(m))
    assert not lm.any() and ly.item() == 0
    same, mask = M.labels_at(torch.zeros(1, 4, 2, 2), y, m)
    assert same is y and mask is m
    with pytest.raises(ValueError, match="integer multiple"):
        M.labels_at(torch.zeros(1, 4, 3, 3), torch.zeros(1, 1, 4, 4))


def test_parse_methods():
    assert M.parse_methods("bmc, mse,bmc") == ["mse", "bmc"]
    with pytest.raises(ValueError, match=r"unknown method 'foo'; valid names: mse,lds,fds,bmc,gai,bni,regcls,bsam,rrt"):
        M.parse_methods("mse,foo")


# --------------------------------------------------------------------------------------------------
# end to end, through the command line
# --------------------------------------------------------------------------------------------------

TINY = ["--quick", "--image-size", "16x16", "--train-images", "6", "--test-images", "4", "--epochs", "1",
        "--batch-size", "3", "--width", "4", "--timing-repeats", "1", "--bmc-candidates", "64", "--no-progress",
        "--threads", "1"]

TOP_KEYS = {"schema", "config", "data", "shots", "methods", "timing", "histogram", "error_by_bin"}
CONFIG_KEYS = {"methods", "epochs", "train_images", "test_images", "image_size", "batch_size", "width",
               "bmc_candidates", "lr", "compare_reference", "timing_backends", "timing_repeats", "steps_per_epoch",
               "method_config", "device", "backend", "seed", "quick", "threads", "environment"}
DATA_KEYS = {"image_size", "train_images", "test_images", "train_pixels", "test_pixels", "train_fraction_1_4m",
             "train_fraction_beyond_6m", "train_hole_fraction", "test_cap_per_bin", "generate_seconds"}
SHOT_KEYS = {"bin_width", "many_share", "few_share", "many_threshold", "few_threshold", "groups"}
METHOD_KEYS = {"display", "backend", "backends", "metrics", "train_seconds", "epoch_losses", "noise_sigma",
               "stage_one"}
TIMING_KEYS = {"median_ms", "min_ms", "max_ms", "repeats", "overhead_vs_mse", "overhead_ms"}
REFERENCE_KEYS = {"median_ms", "min_ms", "max_ms", "repeats", "formulation", "ours_ms", "ours_backend", "speedup"}


def _run(tmp_path, *extra):
    lines = []
    rc = cli.main(["train", "depth", *TINY, "--out", str(tmp_path), *extra], print_fn=lines.append)
    assert rc == 0
    doc = json.loads((tmp_path / "depth.json").read_text())
    return doc, lines


def test_end_to_end_schema_figures_and_tables(tmp_path):
    doc, lines = _run(tmp_path, "--timing-backends", "torch")
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == D.SCHEMA
    assert set(doc["config"]) == CONFIG_KEYS
    assert set(doc["config"]["environment"]) >= {"torch", "threads", "available_backends"}
    assert doc["config"]["method_config"]["bmc_candidates"] == 64
    assert set(doc["data"]) == DATA_KEYS and doc["data"]["image_size"] == [16, 16]
    assert set(doc["shots"]) == SHOT_KEYS and len(doc["shots"]["groups"]) == 100
    assert set(doc["shots"]["groups"]) <= {"many", "medium", "few"}
    assert list(doc["methods"]) == list(M.METHODS)
    metric_keys = None
    for name, entry in doc["methods"].items():
        assert set(entry) == METHOD_KEYS, name
        assert entry["display"] == M.METHODS[name]
        assert entry["backend"] in _dispatch.BACKENDS
        assert set(entry["backends"]) == set(M.METHOD_OPS[name])
        assert entry["backend"] == entry["backends"][M.METHOD_OPS[name][0]]
        assert {"all/rmse", "many/rmse", "medium/rmse", "few/rmse", "all/absrel", "few/delta1"} <= set(entry["metrics"])
        metric_keys = metric_keys or set(entry["metrics"])
        assert set(entry["metrics"]) == metric_keys
        assert all(v is None or isinstance(v, (int, float)) for v in entry["metrics"].values())
        assert len(entry["epoch_losses"]) == 1 and entry["train_seconds"] > 0
        assert (entry["noise_sigma"] is not None) == (name in ("bmc", "gai", "bni"))
        assert entry["stage_one"] == ("mse" if name == "rrt" else None)
    assert set(doc["timing"]) == set(M.METHODS) | {"reference"}
    assert doc["timing"]["reference"] is None
    for name in M.METHODS:
        assert set(doc["timing"][name]) == {"torch"}
        t = doc["timing"][name]["torch"]
        assert set(t) == TIMING_KEYS and t["median_ms"] > 0 and t["repeats"] == 1
    assert doc["timing"]["mse"]["torch"]["overhead_vs_mse"] == pytest.approx(1.0)
    assert set(doc["histogram"]) == {"edges", "train_counts", "test_counts"}
    assert len(doc["histogram"]["edges"]) == 101 and len(doc["histogram"]["train_counts"]) == 100
    assert sum(doc["histogram"]["train_counts"]) == doc["data"]["train_pixels"]
    assert set(doc["error_by_bin"]) == set(M.METHODS)
    assert all(len(v["rmse"]) == 100 and len(v["count"]) == 100 for v in doc["error_by_bin"].values())
    for png in ("depth_error_by_bin.png", "depth_label_histogram.png", "depth_samples.png"):
        assert (tmp_path / png).stat().st_size > 1000
    text = "\n".join(lines)
    assert "RMSE All" in text and "δ1 Few" in text and "torch vs MSE" in text
    for display in M.METHODS.values():
        assert display in text


def test_run_returns_the_document_with_artefacts(tmp_path):
    from imbreg_fast.experiments import common

    parser = cli.build_parser()
    args = parser.parse_args(["train", "depth", *TINY, "--methods", "mse", "--timing-backends", "torch",
                              "--no-plots", "--out", str(tmp_path)])
    doc = D.run(common.common_args(args), args, print_fn=lambda s: None)
    assert doc["artefacts"] == [str(tmp_path / "depth.json")]
    assert set(doc) == TOP_KEYS | {"artefacts"}


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_backend_flag_reaches_every_op(tmp_path, monkeypatch, backend):
    """--backend X: every library op of the training and of the timed steps runs on X (the other backend's
    implementations are replaced by ones that fail), and the JSON says so."""
    if not CPP:
        pytest.skip("the C++ extension is not built")
    other = "torch" if backend == "cpp" else "cpp"
    calls: dict[str, int] = {}
    for op in {op for ops in M.METHOD_OPS.values() for op in ops}:
        impl = _dispatch._IMPLS[op][backend]

        def spy(*args, _impl=impl, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _impl(*args, **kwargs)

        def forbidden(*args, _op=op, **kwargs):
            raise AssertionError(f"{_op} ran on {other} under --backend {backend}")

        monkeypatch.setitem(_dispatch._IMPLS[op], backend, spy)
        monkeypatch.setitem(_dispatch._IMPLS[op], other, forbidden)
    doc, _ = _run(tmp_path, "--backend", backend, "--methods", "mse,lds,fds,bmc,gai,bni,regcls,bsam,rrt",
                  "--timing-backends", backend, "--no-plots")
    assert set(calls) == {"weighted_regression_loss", "fds_accumulate", "fds_recolor", "bmc_loss", "gai_loss",
                          "bni_loss"}
    for name, entry in doc["methods"].items():
        assert entry["backend"] == backend and set(entry["backends"].values()) == {backend}, name
    assert all(set(doc["timing"][name]) == {backend} for name in M.METHODS)


def test_compare_reference_adds_the_published_timings(tmp_path):
    doc, lines = _run(tmp_path, "--methods", "mse,fds,bmc,regcls,rrt", "--timing-backends", "torch",
                      "--compare-reference", "--no-plots")
    reference = doc["timing"]["reference"]
    assert set(reference) == {"mse", "fds", "bmc", "rrt"}                 # reg+cls has no published step
    for name, entry in reference.items():
        assert set(entry) == REFERENCE_KEYS
        assert entry["formulation"] == M.REFERENCE[name]
        assert entry["ours_backend"] == "torch"
        assert entry["ours_ms"] == doc["timing"][name]["torch"]["median_ms"]
        assert entry["speedup"] == pytest.approx(entry["median_ms"] / entry["ours_ms"])
    assert "published ms" in "\n".join(lines)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "mse,foo"], "unknown method 'foo'; valid names: mse,lds,fds,bmc,gai,bni,regcls,bsam,rrt"),
    (["--image-size", "12x16"], "multiples of 8"),
    (["--image-size", "big"], "expected HxW"),
    (["--epochs", "0"], "must be >= 1"),
    (["--timing-backends", "cuda"], "unknown backend(s) 'cuda'"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "depth", *argv])
    assert message in capsys.readouterr().err


def test_unavailable_timing_backend_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="--timing-backends: triton cannot run on cpu"):
        cli.main(["train", "depth", *TINY, "--timing-backends", "triton", "--out", str(tmp_path)])
