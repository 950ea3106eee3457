"""``python -m imbreg_fast train tabular``: CSV loading and its errors, the balanced split, standardisation,
SMOGN and the end-to-end run through the command line (tiny CSVs, a few epochs, CPU)."""
import csv
import json
import math
import sys
import types

import pytest
import torch

from imbreg_fast.experiments import tabular
from imbreg_fast.lds import bin_edges, bin_index


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def imbalanced_rows(n: int = 160, seed: int = 0) -> list[list]:
    """Rows (y, a, b, c): y = 10 * Beta-like skewed (most labels small, a long tail), a = y + noise,
    b = noise, c = a constant-ish feature; y rounded to 3 decimals."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    y = 10 * u ** 3                                   # density ~ y^(-2/3): many small labels, few large ones
    a = y + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    c = 3.0 + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)
    return [[f"{y[i]:.3f}", f"{a[i]:.4f}", f"{b[i]:.4f}", f"{c[i]:.4f}"] for i in range(n)]


def write_csv(path, rows, header=("y", "a", "b", "c"), *, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def data_csv(tmp_path):
    return write_csv(tmp_path / "data.csv", imbalanced_rows())


def exit_message(excinfo) -> str:
    return str(excinfo.value.code)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def test_read_table_default_features_and_lines(tmp_path):
    rows = imbalanced_rows(30)
    path = write_csv(tmp_path / "d.csv", rows)
    t = tabular.read_table(path, "y")
    assert t.features == ("a", "b", "c")
    assert t.x.shape == (30, 3) and t.x.dtype == torch.float64
    assert t.y.tolist() == [float(r[0]) for r in rows]
    assert t.x[:, 1].tolist() == [float(r[2]) for r in rows]
    assert t.lines.tolist() == list(range(2, 32))          # the header is line 1
    assert t.rows_read == 30 and t.notes == ()


def test_read_table_quoted_header_bom_blank_lines_and_tab(tmp_path):
    path = tmp_path / "q.tsv"
    body = '\ufeff"the label"\t"feature, one"\t"id"\n\n1.5\t2\tx1\n2.5\t"3"\tx2\n\n'
    path.write_text(body, encoding="utf-8")
    t = tabular.read_table(path, "the label", delimiter="\t")
    assert t.features == ("feature, one",)
    assert t.y.tolist() == [1.5, 2.5] and t.x.reshape(-1).tolist() == [2.0, 3.0]
    assert t.lines.tolist() == [3, 4]
    assert "'id': not numeric (line 3: 'x1')" in t.notes[0]


def test_read_table_drops_missing_labels_and_features(tmp_path):
    rows = imbalanced_rows(40)
    rows[3][0] = ""             # line 5: no label
    rows[7][0] = "  "           # line 9: no label
    rows[10][1] = ""            # line 12: no 'a'
    rows[11][1] = rows[11][2] = ""    # line 13: no 'a', no 'b'
    rows[12][0] = rows[12][3] = ""    # no label and no 'c': counted as a missing label only
    path = write_csv(tmp_path / "m.csv", rows)
    t = tabular.read_table(path, "y")
    assert t.y.numel() == 35
    assert (t.dropped_missing_label, t.dropped_missing_features) == (3, 2)
    assert 12 not in t.lines.tolist() and 13 not in t.lines.tolist() and 5 not in t.lines.tolist()
    assert "dropped 3 of 40 row(s) without a 'y' value (empty cell; first on line 5)" in t.notes[0]
    assert "dropped 2 labelled row(s) with a missing feature value ('a': 2, 'b': 1)" in t.notes[1]
    # with --features b only the 'b' gap drops a row
    t = tabular.read_table(path, "y", ["b"])
    assert (t.dropped_missing_label, t.dropped_missing_features) == (3, 1)


def test_read_table_skips_text_empty_and_unnamed_columns(tmp_path):
    rows = [[str(i), f"{i * 0.5}", f"city{i}", "", f"{i}"] for i in range(25)]
    path = write_csv(tmp_path / "s.csv", rows, header=("y", "a", "city", "empty", ""))
    t = tabular.read_table(path, "y")
    assert t.features == ("a",)
    assert t.skipped_columns == {"city": "not numeric (line 2: 'city0')", "empty": "no values",
                                 "(column 5)": "no name in the header"}


@pytest.mark.parametrize("case, args, message", [
    ("missing", {}, r"--csv '.*nope\.csv': no such file"),
    ("empty", {}, r"--csv '.*': the file is empty"),
    ("blank", {}, r"--csv '.*': the file is empty"),
    ("header_only", {}, r"the file has a header but no data rows"),
    ("numeric_header", {}, r"the first line '1,2,3' holds only numbers; it must be a header"),
    ("no_target", {"target": "z"}, r"--target 'z': no such column in '.*'; the columns are: 'y', 'a', 'b', 'c'"),
    ("text_target", {}, r"--target 'y': not a numeric column: line 4 has 'ten'"),
    ("nan_target", {}, r"--target 'y': line 5 has the label 'nan'; labels must be finite numbers"),
    ("inf_target", {}, r"--target 'y': line 3 has the label '-inf'"),
    ("text_feature", {"features": ["a", "b"]}, r"--features: column 'b' is not numeric: line 6 has 'oops'"),
    ("inf_feature", {}, r"feature column 'a': line 2 has 'inf'; features must be finite"),
    ("unknown_feature", {"features": ["a", "q"]}, r"--features: no column named 'q' in '.*'; the columns are"),
    ("target_feature", {"features": ["a", "y"]}, r"--features must not contain the target column 'y'"),
    ("empty_feature", {"features": ["c"]}, r"--features: column 'c' has no values"),
    ("no_features", {}, r"no numeric feature column besides the target 'y'"),
    ("ragged", {}, r"line 3: 3 fields, but the header has 4 \(is --delimiter ',' right\?\)"),
    ("duplicate", {}, r"duplicate column name\(s\) in the header: a"),
])
def test_read_table_errors(tmp_path, case, args, message):
    path = tmp_path / ("nope.csv" if case == "missing" else "bad.csv")
    rows = [r for r in imbalanced_rows(25)]
    header = ("y", "a", "b", "c")
    if case == "empty":
        path.write_text("")
    elif case == "blank":
        path.write_text("\n  \n")
    elif case == "header_only":
        path.write_text("y,a,b,c\n")
    elif case == "numeric_header":
        path.write_text("1,2,3\n4,5,6\n")
    elif case != "missing":
        if case == "text_target":
            rows[2][0] = "ten"
        elif case == "nan_target":
            rows[3][0] = "nan"
        elif case == "inf_target":
            rows[1][0] = "-inf"
        elif case == "text_feature":
            rows[4][2] = "oops"
        elif case == "inf_feature":
            rows[0][1] = "inf"
        elif case == "empty_feature":
            for r in rows:
                r[3] = ""
        elif case == "no_features":
            rows = [[r[0], "x", "", "y"] for r in rows]
        elif case == "duplicate":
            header = ("y", "a", "a", "c")
        write_csv(path, rows, header)
        if case == "ragged":
            lines = path.read_text().splitlines()
            lines[2] = ",".join(lines[2].split(",")[:3])
            path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as excinfo:
        tabular.read_table(path, args.get("target", "y"), args.get("features"))
    assert excinfo.match(message)


def test_check_rows_too_few_and_constant(tmp_path):
    rows = imbalanced_rows(tabular.MIN_ROWS + 2)
    rows[0][0] = rows[1][0] = rows[2][0] = ""
    t = tabular.read_table(write_csv(tmp_path / "few.csv", rows), "y")
    with pytest.raises(SystemExit) as excinfo:
        tabular.check_rows(t)
    assert excinfo.match(rf"{tabular.MIN_ROWS - 1} usable row\(s\) \({tabular.MIN_ROWS + 2} read, 3 without a label "
                         rf"and 0 with a missing feature value dropped\); at least {tabular.MIN_ROWS} are needed: "
                         r"the balanced split keeps at least half of each label bin")
    rows = [["4.25", r[1], r[2], r[3]] for r in imbalanced_rows(30)]
    t = tabular.read_table(write_csv(tmp_path / "const.csv", rows), "y")
    with pytest.raises(SystemExit, match=r"--target 'y': the label is constant \(4.25 on every usable row\)"):
        tabular.check_rows(t)


# --------------------------------------------------------------------------------------------------
# the balanced split and standardisation
# --------------------------------------------------------------------------------------------------


def test_balanced_split_counts_per_bin():
    # bins of width 1 over [0, 10]: bin b holds counts[b] labels
    counts = [60, 30, 12, 7, 4, 3, 2, 1, 0, 1]
    y = torch.cat([b + 0.5 + 0.4 * torch.rand(c, dtype=torch.float64) for b, c in enumerate(counts)])
    y[-1] = 10.0                                            # the top edge counts in the last bin
    edges = bin_edges(10, (0.0, 10.0))
    split = tabular.balanced_split(y, edges, 0.2, seed=3)
    caps = [c // 2 for c in counts]                         # 30 15 6 3 2 1 1 0 0 0
    # budget round(0.2 * 120) = 24: T = 5 gives 5+5+5+3+2+1+1 = 22 <= 24; T = 6 gives 25 > 24
    assert split.per_bin_target == 5
    expected = [min(5, c) for c in caps]
    assert split.test_per_bin.tolist() == expected
    assert split.train_per_bin.tolist() == [c - e for c, e in zip(counts, expected)]
    test_bins = bin_index(y[split.test], edges)
    assert torch.bincount(test_bins, minlength=10).tolist() == expected
    # a partition of the rows
    assert set(split.train.tolist()).isdisjoint(split.test.tolist())
    assert sorted(split.train.tolist() + split.test.tolist()) == list(range(len(y)))
    # every bin keeps at least half of its rows for training
    assert all(tr >= c / 2 for tr, c in zip(split.train_per_bin.tolist(), counts))


def test_balanced_split_budget_larger_than_caps_and_determinism():
    y = torch.tensor([0.1] * 10 + [5.5] * 3 + [9.9] * 2, dtype=torch.float64)
    edges = bin_edges(10, (0.0, 10.0))
    split = tabular.balanced_split(y, edges, 0.9, seed=0)
    assert split.test_per_bin[[0, 5, 9]].tolist() == [5, 1, 1]
    again = tabular.balanced_split(y, edges, 0.9, seed=0)
    assert torch.equal(split.test, again.test)
    other = [tabular.balanced_split(y, edges, 0.9, seed=s).test for s in range(1, 6)]
    assert any(not torch.equal(split.test, o) for o in other)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        tabular.balanced_split(y, edges, 1.0, seed=0)


def test_standardizer_uses_given_rows_only():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [100.0, -7.0]], dtype=torch.float64)
    s = tabular.Standardizer.fit(x[:2])
    assert s.mean.tolist() == [2.0, 5.0] and s.std.tolist() == [1.0, 1.0]    # constant column: std 1
    assert s(x).tolist() == [[-1.0, 0.0], [1.0, 0.0], [98.0, -12.0]]
    assert torch.allclose(s.inverse(s(x)), x)


def test_mlp_is_encoder_plus_head():
    model = tabular.TabularMLP(3, (8, 5), outputs=4)
    x = torch.randn(6, 3)
    feats = model.encoder(x)
    assert feats.shape == (6, 5) and model.feature_dim == 5
    assert torch.equal(model(x), model.head(feats))
    assert model(x).shape == (6, 4)


def _parse(argv):
    import argparse

    from imbreg_fast.experiments import common

    parser = argparse.ArgumentParser()
    tabular.add_arguments(parser)
    common.add_common_arguments(parser, default_out="out")
    args = parser.parse_args(argv + ["--no-plots"])
    return common.common_args(args), args


def test_prepare_standardises_with_training_rows_only(tmp_path):
    rows = imbalanced_rows(120)
    for r in rows:                         # a feature far off for the large labels, which the split samples
        if float(r[0]) > 8:
            r[2] = "1000"
    path = write_csv(tmp_path / "d.csv", rows)
    common, args = _parse(["--csv", str(path), "--target", "y", "--bins", "10"])
    opts = tabular._options(common, args)
    table = tabular.read_table(path, "y")
    data = tabular.prepare(table, opts, 0, torch.device("cpu"))
    train, test = data.split.train, data.split.test
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == 120
    x_tr = table.x[train]
    assert torch.allclose(data.x_scaler.mean, x_tr.mean(0))
    assert torch.allclose(data.x_scaler.std, x_tr.std(0, correction=0))
    assert torch.allclose(data.y_scaler.mean, table.y[train].mean())
    assert torch.allclose(data.x_train.double().mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(data.z_train.double().std(correction=0), torch.ones((), dtype=torch.float64), atol=1e-6)
    all_rows = tabular.Standardizer.fit(table.x)
    assert not torch.allclose(all_rows.mean, data.x_scaler.mean)       # the test rows would have moved it
    assert torch.allclose(data.x_test.double(), ((table.x[test] - x_tr.mean(0)) / x_tr.std(0, correction=0)),
                          atol=1e-5)
    assert torch.equal(data.y_test, table.y[test])                      # evaluated in label units


# --------------------------------------------------------------------------------------------------
# end to end, through the command line
# --------------------------------------------------------------------------------------------------

ALL_METHODS = ["mse", "lds", "fds", "bmc", "gai", "bni", "regcls", "bsam", "rrt"]
RECORD_KEYS = {"name", "display", "backend", "backends", "metrics", "train_seconds", "epoch_losses", "noise_sigma",
               "per_bin_mae", "error"}
SHOT_KEYS = {"count", "mae", "mse", "rmse", "gm", "gm_floored", "bmae", "bmse"}


def run_cli(tmp_path, csv_path, *extra, backend="torch", out=None):
    from imbreg_fast.experiments import cli

    lines = []
    out = out or tmp_path / "out"
    argv = ["train", "tabular", "--csv", str(csv_path), "--target", "y", "--quick", "--epochs", "2", "--out",
            str(out), "--no-progress", "--backend", backend, *extra]
    assert cli.main(argv, print_fn=lines.append) == 0
    doc = json.loads((out / "tabular.json").read_text())
    return doc, "\n".join(lines).splitlines()


@pytest.fixture
def no_smogn(monkeypatch):
    monkeypatch.setitem(sys.modules, "smogn", None)        # import smogn -> ImportError


def test_end_to_end_json_schema_table_and_figure(tmp_path, data_csv, no_smogn):
    doc, lines = run_cli(tmp_path, data_csv, "--method-bins", "25")
    assert set(doc) == {"experiment", "config", "data", "methods"}
    assert doc["experiment"] == "train tabular"
    cfg = doc["config"]
    assert set(cfg) == {"csv", "target", "features", "delimiter", "methods", "smogn", "epochs", "batch_size", "lr",
                        "hidden", "test_fraction", "bins", "method_bins", "many", "few", "missing_features",
                        "init_noise_sigma", "method_config", "seed", "device", "backend", "quick", "environment"}
    assert cfg["methods"] == ALL_METHODS and cfg["smogn"] is False and cfg["epochs"] == 2
    assert cfg["csv"] == str(data_csv) and cfg["features"] is None and cfg["backend"] == "torch"
    assert {"torch", "threads", "available_backends"} <= set(cfg["environment"])
    assert cfg["method_config"]["init_noise_sigma"] == 0.5      # default: half the training labels' std
    assert cfg["method_config"]["bins"] == cfg["method_bins"] == 25
    data = doc["data"]
    assert set(data) == {"rows_read", "rows_used", "dropped_missing_label", "dropped_missing_features",
                         "skipped_columns", "features", "label", "bin_edges", "split", "shot_bins", "shot_test_rows"}
    assert data["rows_read"] == data["rows_used"] == 160 and data["features"] == ["a", "b", "c"]
    ys = [float(r[0]) for r in imbalanced_rows()]
    assert data["label"]["min"] == min(ys) and data["label"]["max"] == max(ys)
    assert len(data["bin_edges"]) == cfg["bins"] + 1 == 16 + 1                 # default: one bin per 10 rows
    split = data["split"]
    assert set(split) == {"train", "test", "test_per_bin_target", "train_per_bin", "test_per_bin"}
    assert split["train"] + split["test"] == 160 and sum(split["test_per_bin"]) == split["test"]
    edges = torch.tensor(data["bin_edges"], dtype=torch.float64)
    counts = torch.bincount(bin_index(torch.tensor(ys, dtype=torch.float64), edges), minlength=16).tolist()
    assert [a + b for a, b in zip(split["train_per_bin"], split["test_per_bin"])] == counts
    # the rule: min(T, n_b // 2) test rows per bin, T the largest level within round(0.2 * 160) = 32 rows
    level = max(t for t in range(200) if sum(min(t, c // 2) for c in counts) <= 32)
    assert split["test_per_bin_target"] == level
    assert split["test_per_bin"] == [min(level, c // 2) for c in counts]
    assert sum(data["shot_test_rows"][g] for g in ("many", "medium", "few")) == data["shot_test_rows"]["all"] \
        == split["test"]

    assert [m["name"] for m in doc["methods"]] == ALL_METHODS
    for m in doc["methods"]:
        expected = RECORD_KEYS | ({"stage_one_seconds"} if m["name"] == "rrt" else set())
        assert set(m) == expected, m["name"]
        assert m["error"] is None and m["backend"] == "torch" and set(m["backends"].values()) == {"torch"}
        assert m["train_seconds"] > 0 and len(m["epoch_losses"]) == 2
        assert {k.split("/")[1] for k in m["metrics"]} == SHOT_KEYS | {"pearson"}
        assert {k.split("/")[0] for k in m["metrics"]} == {"all", "many", "medium", "few"}
        assert m["metrics"]["all/count"] == split["test"] and math.isfinite(m["metrics"]["all/mae"])
        assert len(m["per_bin_mae"]) == 16
        assert (m["noise_sigma"] is not None) == (m["name"] in ("bmc", "gai", "bni"))
    # the printed tables: one row per method with its backend, the shot-group columns
    text = "\n".join(lines)
    assert "MSE All" in text and "Med." in text and "bMAE All" in text and "GM All" in text
    for m in doc["methods"]:
        assert any(line.startswith(m["display"]) and " torch " in line for line in lines), m["display"]
    # the figure
    png = tmp_path / "out" / "tabular.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_returned_document_and_artefacts(tmp_path, data_csv, no_smogn):
    from imbreg_fast.experiments import cli

    # run() returns the JSON document plus the artefacts
    seen = {}
    real_run = tabular.run

    def spy(common, args, print_fn=print):
        seen["doc"] = real_run(common, args, print_fn=print_fn)
        return seen["doc"]

    import unittest.mock
    with unittest.mock.patch.object(tabular, "run", spy):
        cli.main(["train", "tabular", "--csv", str(data_csv), "--target", "y", "--quick", "--epochs", "1",
                  "--methods", "mse", "--out", str(tmp_path), "--no-progress", "--backend", "torch"],
                 print_fn=lambda s: None)
    doc = seen["doc"]
    assert doc["artefacts"] == [str(tmp_path / "tabular.json"), str(tmp_path / "tabular.png")]
    on_disk = json.loads((tmp_path / "tabular.json").read_text())
    assert on_disk == {k: v for k, v in doc.items() if k != "artefacts"}


def test_deterministic_in_seed(tmp_path, data_csv, no_smogn):
    args = ("--methods", "mse,bmc,regcls", "--no-plots")
    a, _ = run_cli(tmp_path, data_csv, *args, out=tmp_path / "a")
    b, _ = run_cli(tmp_path, data_csv, *args, out=tmp_path / "b")
    c, _ = run_cli(tmp_path, data_csv, *args, "--seed", "1", out=tmp_path / "c")
    for x, y in zip(a["methods"], b["methods"]):
        assert x["metrics"] == y["metrics"] and x["epoch_losses"] == y["epoch_losses"]
    assert a["data"]["split"] == b["data"]["split"]
    assert a["data"]["split"]["test_per_bin"] == c["data"]["split"]["test_per_bin"]   # the same counts ...
    assert a["methods"][0]["metrics"] != c["methods"][0]["metrics"]                    # ... other rows, weights


@pytest.mark.requires_cpp
def test_cpp_backend_really_runs_the_cpp_kernels(tmp_path, data_csv, monkeypatch, no_smogn):
    from imbreg_fast import _dispatch
    from imbreg_fast.experiments import methods as M

    calls = {}
    ops = sorted({op for name in ALL_METHODS for op in M.METHOD_OPS[name]})
    for op in ops:
        for backend in ("torch", "cpp"):
            impl = _dispatch._IMPLS[op][backend]

            def spy(*a, _impl=impl, _key=(op, backend), **k):
                calls[_key] = calls.get(_key, 0) + 1
                return _impl(*a, **k)

            monkeypatch.setitem(_dispatch._IMPLS[op], backend, spy)
    doc, lines = run_cli(tmp_path, data_csv, backend="cpp")
    for m in doc["methods"]:
        assert m["backend"] == "cpp" and set(m["backends"].values()) == {"cpp"}, m["name"]
    for op in ops:
        assert calls.get((op, "cpp"), 0) > 0, op
        assert calls.get((op, "torch"), 0) == 0, op
    assert any(line.startswith("BMC") and " cpp " in line for line in lines)


# --------------------------------------------------------------------------------------------------
# SMOGN
# --------------------------------------------------------------------------------------------------


class FakeFrame:
    """The little of a pandas DataFrame that smogn_resample uses."""

    def __init__(self, data, columns):
        import numpy as np

        self.values = np.asarray(data, dtype=float)
        self.columns = list(columns)

    def __getitem__(self, cols):
        return FakeFrame(self.values[:, [self.columns.index(c) for c in cols]], cols)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


@pytest.fixture
def fake_smogn(monkeypatch):
    import numpy as np

    calls = []

    def smoter(data, y):
        calls.append({"columns": list(data.columns), "y": y, "rows": data.values.shape[0],
                      "draw": float(np.random.rand())})
        labels = data.values[:, data.columns.index(y)]
        rare = data.values[labels > np.median(labels)]
        return FakeFrame(np.concatenate([data.values, rare]), data.columns)   # over-sample the upper half

    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(DataFrame=FakeFrame))
    monkeypatch.setitem(sys.modules, "smogn", types.SimpleNamespace(smoter=smoter))
    return calls


def test_smogn_row_added_when_importable(tmp_path, data_csv, fake_smogn):
    import numpy as np

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    doc, lines = run_cli(tmp_path, data_csv, "--methods", "mse")
    assert [m["name"] for m in doc["methods"]] == ["mse", "smogn"] and doc["config"]["smogn"] is True
    row = doc["methods"][1]
    assert set(row) == RECORD_KEYS | {"smogn_train_rows"}
    assert row["display"] == "SMOGN + MSE" and row["backend"] == "torch" and row["error"] is None
    train = doc["data"]["split"]["train"]
    assert fake_smogn[0]["rows"] == train and fake_smogn[0]["columns"] == ["a", "b", "c", "y"]
    assert fake_smogn[0]["y"] == "y" and row["smogn_train_rows"] == train + train // 2
    assert any(line.startswith("SMOGN + MSE") for line in lines)
    assert (np.random.get_state()[1] == before).all()                 # the global numpy state is restored
    # seeded: the same draw inside smoter in a second run; --no-smogn leaves the row out
    run_cli(tmp_path, data_csv, "--methods", "mse", out=tmp_path / "again")
    assert fake_smogn[1]["draw"] == fake_smogn[0]["draw"]
    doc, _ = run_cli(tmp_path, data_csv, "--methods", "mse", "--no-smogn", out=tmp_path / "none")
    assert [m["name"] for m in doc["methods"]] == ["mse"]


def test_smogn_flag_without_the_package_is_an_error(tmp_path, data_csv, no_smogn):
    with pytest.raises(SystemExit) as excinfo:
        run_cli(tmp_path, data_csv, "--smogn")
    assert "--smogn needs the optional smogn package" in exit_message(excinfo)
    assert "pip install smogn" in exit_message(excinfo)
    doc, _ = run_cli(tmp_path, data_csv, "--methods", "mse")          # by default: no row, no error
    assert [m["name"] for m in doc["methods"]] == ["mse"]


# --------------------------------------------------------------------------------------------------
# errors and notes through the command line
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch-size", "1"], "--batch-size must be >= 2, got 1"),
    (["--bins", "0"], "--bins must be >= 1, got 0"),
    (["--method-bins", "1"], "--method-bins must be >= 2, got 1"),
    (["--many", "10", "--few", "50"], "0 <= --few <= --many, got --many 10 --few 50"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--init-noise-sigma", "-1"], "--init-noise-sigma must be a finite number > 0, got -1.0"),
    (["--test-fraction", "1"], "--test-fraction must be in (0, 1), got 1.0"),
    (["--hidden", "32,x"], "--hidden must be comma-separated layer widths such as 128,128, got '32,x'"),
    (["--hidden", "32,0"], "--hidden widths must be >= 1, got '32,0'"),
    (["--methods", "mse,foo"], "--methods: unknown method 'foo'; valid names: mse,lds,fds,bmc,gai,bni,regcls,bsam,"
                               "rrt (the SMOGN baseline is --smogn)"),
    (["--delimiter", "ab"], "--delimiter must be one character (or 'tab'), got 'ab'"),
    (["--features", "a,,b"], "--features: an empty column name in 'a,,b'"),
    (["--features", "a,zz"], "--features: no column named 'zz' in"),
    (["--target", "zz"], "--target 'zz': no such column in"),
    (["--test-fraction", "0.01"], "the balanced split of 160 rows over --bins 16 label bins gives 160 training and 0 "
                                  "test row(s); each split needs at least 2"),
])
def test_cli_errors(tmp_path, data_csv, no_smogn, extra, message):
    argv = list(extra)
    if "--target" in argv:                   # replace run_cli's --target y
        i = argv.index("--target")
        target, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        target = "y"
    from imbreg_fast.experiments import cli

    with pytest.raises(SystemExit) as excinfo:
        cli.main(["train", "tabular", "--csv", str(data_csv), "--target", target, "--quick", "--out",
                  str(tmp_path / "out"), "--no-progress", "--no-plots", *argv], print_fn=lambda s: None)
    assert message in exit_message(excinfo)
    assert not (tmp_path / "out" / "tabular.json").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "the file is empty"),
    ("too_few", f"{tabular.MIN_ROWS - 1} usable row(s); at least {tabular.MIN_ROWS} are needed"),
    ("constant", "--target 'y': the label is constant (2 on every usable row)"),
    ("nan_label", "--target 'y': line 4 has the label 'NaN'"),
    ("text_label", "--target 'y': not a numeric column: line 3 has 'n/a'"),
])
def test_cli_data_errors(tmp_path, no_smogn, case, message):
    path = tmp_path / "d.csv"
    rows = imbalanced_rows(40)
    if case == "empty":
        path.write_text("")
    elif case != "missing":
        if case == "too_few":
            rows = rows[:tabular.MIN_ROWS - 1]
        elif case == "constant":
            rows = [["2", *r[1:]] for r in rows]
        elif case == "nan_label":
            rows[2][0] = "NaN"
        elif case == "text_label":
            rows[1][0] = "n/a"
        write_csv(path, rows)
    with pytest.raises(SystemExit) as excinfo:
        run_cli(tmp_path, path)
    assert message in exit_message(excinfo)


def test_cli_reports_dropped_rows_and_skipped_columns(tmp_path, no_smogn):
    rows = imbalanced_rows(60)
    rows[0][0] = ""
    rows[5][2] = ""
    rows = [r + [f"id{i}"] for i, r in enumerate(rows)]
    path = write_csv(tmp_path / "d.csv", rows, header=("y", "a", "b", "c", "name"))
    doc, lines = run_cli(tmp_path, path, "--methods", "mse", "--no-plots")
    text = "\n".join(lines)
    assert "note: skipped column(s) 'name': not numeric (line 2: 'id0')" in text
    assert "note: dropped 1 of 60 row(s) without a 'y' value (empty cell; first on line 2)" in text
    assert "note: dropped 1 labelled row(s) with a missing feature value ('b': 1)" in text
    data = doc["data"]
    assert (data["rows_read"], data["rows_used"]) == (60, 58)
    assert (data["dropped_missing_label"], data["dropped_missing_features"]) == (1, 1)
    assert data["skipped_columns"] == {"name": "not numeric (line 2: 'id0')"}
    assert len(data["bin_edges"]) == 5 + 1                              # small file: one bin per 10 rows


def test_rrt_alone_trains_its_own_stage_one(tmp_path, data_csv, no_smogn):
    doc, lines = run_cli(tmp_path, data_csv, "--methods", "rrt", "--no-plots")
    (rrt,) = doc["methods"]
    assert rrt["name"] == "rrt" and rrt["error"] is None and rrt["stage_one_seconds"] > 0
    assert not any(line.startswith("MSE ") for line in lines)       # stage one is not a row of its own


def test_a_diverged_method_is_reported_and_the_others_still_run(tmp_path, data_csv, no_smogn):
    doc, lines = run_cli(tmp_path, data_csv, "--methods", "mse,rrt", "--lr", "1e30")
    mse, rrt = doc["methods"]
    assert mse["metrics"] is None and mse["train_seconds"] is None
    assert mse["error"].startswith("MSE: the training loss of epoch") and "diverged" in mse["error"]
    assert rrt["metrics"] is None and rrt["stage_one_seconds"] is None
    assert rrt["error"].startswith("RRT stage one: MSE: the training loss")
    assert f"  {mse['error']}; no metrics" in lines
    assert (tmp_path / "out" / "tabular.png").exists()


def test_metrics_are_in_label_units(tmp_path, no_smogn):
    """Training sees standardised labels only, so an affine change of the label unit changes nothing but the
    unit of the errors: MAE scales by the factor, MSE by its square, Pearson not at all."""
    rows = imbalanced_rows(120)
    scaled = [[f"{1000 * float(r[0]) + 50000:.1f}", *r[1:]] for r in rows]
    a, _ = run_cli(tmp_path, write_csv(tmp_path / "a.csv", rows), "--methods", "mse,bmc", "--no-plots",
                   out=tmp_path / "a")
    b, _ = run_cli(tmp_path, write_csv(tmp_path / "b.csv", scaled), "--methods", "mse,bmc", "--no-plots",
                   out=tmp_path / "b")
    assert a["data"]["split"] == b["data"]["split"]
    assert b["config"]["init_noise_sigma"] == pytest.approx(1000 * a["config"]["init_noise_sigma"])
    for x, y in zip(a["methods"], b["methods"]):
        mx, my = x["metrics"], y["metrics"]
        for group in ("all", "few"):
            assert my[f"{group}/mae"] == pytest.approx(1000 * mx[f"{group}/mae"], rel=1e-3)
            assert my[f"{group}/mse"] == pytest.approx(1e6 * mx[f"{group}/mse"], rel=2e-3)
        assert my["all/pearson"] == pytest.approx(mx["all/pearson"], abs=1e-4)
        if x["noise_sigma"] is not None:
            assert y["noise_sigma"] == pytest.approx(1000 * x["noise_sigma"], rel=1e-3)
