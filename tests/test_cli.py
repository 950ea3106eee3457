"""The main job's command line (``python -m imbreg_fast``): subcommands, help, the common flags and their
errors, and the shared helpers of :mod:`imbreg_fast.experiments.common`. The experiments themselves are tested
end to end in tests/test_experiment_*.py."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imbreg_fast
from imbreg_fast.experiments import cli, common

EXPERIMENT_COMMANDS = [["benchmark", "synthetic"], ["train", "depth"], ["train", "tabular"]]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    out = _help([], capsys)
    for word in ("benchmark", "train", "demo"):
        assert word in out
    assert "synthetic" in _help(["benchmark"], capsys)
    out = _help(["train"], capsys)
    assert "depth" in out and "tabular" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "command" in capsys.readouterr().err


@pytest.mark.parametrize("argv", EXPERIMENT_COMMANDS + [["demo"]], ids=lambda a: "-".join(a))
def test_every_flag_is_explained(argv, capsys):
    """Every option of every subcommand has a help text (argparse prints nothing after a flag without one)."""
    parser = cli.build_parser()
    sub = parser
    for word in argv:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{' '.join(argv)} {action.option_strings} has no help"
    out = _help(argv, capsys)
    for flag in ("--device", "--backend", "--seed", "--out", "--quick", "--no-progress", "--threads"):
        assert flag in out


def _common(argv, tmp_path):
    parser = argparse.ArgumentParser()
    common.add_common_arguments(parser, default_out=str(tmp_path / "out"))
    return common.common_args(parser.parse_args(argv))


def test_common_arguments_defaults(tmp_path):
    threads = torch.get_num_threads()
    try:
        c = _common(["--no-plots"], tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert c.device == torch.device("cpu") and c.backend == "auto" and c.seed == 0
    assert c.out == tmp_path / "out" and not c.quick and c.progress and not c.plots


@pytest.mark.parametrize("argv, match", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:999"], "--device"),
    (["--device", "banana"], "--device: not a device name"),
    (["--device", "meta"], "only cpu and cuda"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_common_argument_errors(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        _common(argv + ["--no-plots"], tmp_path)


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        _common(["--out", str(f), "--no-plots"], tmp_path)


def test_unavailable_backend_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = imbreg_fast._dispatch.unavailable_reason("triton", torch.device("cpu"))
    if reason is None:
        pytest.skip("Triton runs on the CPU here")
    with pytest.raises(SystemExit, match="--backend triton: cannot run on cpu"):
        _common(["--backend", "triton", "--no-plots"], tmp_path)
    with pytest.raises(SystemExit) as exc:     # argparse: not a backend name at all
        _common(["--backend", "cuda", "--no-plots"], tmp_path)
    assert exc.value.code == 2


def test_bad_imbreg_backend_variable_is_a_clear_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("IMBREG_BACKEND", "banana")
    with pytest.raises(SystemExit, match="IMBREG_BACKEND='banana'"):
        _common(["--no-plots"], tmp_path)


def test_unavailable_reason_validates_the_name():
    assert imbreg_fast._dispatch.unavailable_reason("torch") is None
    with pytest.raises(ValueError, match="backend must be one of"):
        imbreg_fast._dispatch.unavailable_reason("cuda")


def test_demo_runs_synthetic_then_depth_quick(tmp_path, monkeypatch):
    """`demo` = both experiments with their own defaults, --quick, under the demo's common flags."""
    calls = []

    def fake_run(name):
        def run(c, args, *, print_fn=print):
            calls.append((name, c.quick, c.seed, args.quick))
            path = c.out / f"{name}.json"
            path.write_text("{}")
            return {"artefacts": [str(path)]}
        return run

    for name in ("synthetic", "depth"):
        monkeypatch.setattr(cli._module(name), "run", fake_run(name))
    lines = []
    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--seed", "3", "--out", str(tmp_path), "--no-plots", "--no-progress"],
                        print_fn=lines.append) == 0
        assert torch.get_num_threads() == 1            # the demo's default
    finally:
        torch.set_num_threads(threads)
    assert calls == [("synthetic", True, 3, True), ("depth", True, 3, True)]
    assert any(str(tmp_path / "synthetic.json") in line for line in lines)
    assert any(str(tmp_path / "depth.json") in line for line in lines)


def test_python_dash_m_prints_help():
    env = dict(os.environ, PYTHONPATH=str(Path(imbreg_fast.__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-m", "imbreg_fast", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "python -m imbreg_fast" in out.stdout and "demo" in out.stdout


# --------------------------------------------------------------------------------------------------
# common helpers
# --------------------------------------------------------------------------------------------------


def test_write_json_is_strict(tmp_path):
    path = common.write_json(tmp_path / "r.json", {"a": float("nan"), "b": torch.tensor([1.5, float("inf")]),
                                                  "c": (1, 2), "d": torch.device("cpu"), 3: Path("x")})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": [1, 2], "d": "cpu", "3": "x"}


def test_mean_std_and_format():
    assert common.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert common.mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in common.mean_std([]))
    assert common.fmt_mean_std(1.23456, 0.5, 2) == "1.23 ± 0.50"
    assert common.fmt_mean_std(math.nan, 0.0) == "-"
    table = common.format_table(["method", "x"], [["MSE", 1.0], ["BMC (long)", None]]).splitlines()
    assert table[0].split() == ["method", "x"]
    assert table[2].startswith("MSE ") and table[2].endswith("1.000")
    assert table[3].endswith("-") and len(table[2]) == len(table[3])


def test_time_step_counts_calls():
    calls = []
    timing = common.time_step(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and timing.repeats == 5
    assert 0 <= timing.min <= timing.median <= timing.max
    with pytest.raises(ValueError, match="repeats"):
        common.time_step(lambda: None, torch.device("cpu"), repeats=0)


def test_progress_is_silent_off_a_terminal(capsys):
    assert list(common.progress(range(3), desc="x")) == [0, 1, 2]   # pytest's stderr is not a TTY
    assert capsys.readouterr().err == ""


def test_backend_of_reports_the_dispatch():
    cpu = torch.device("cpu")
    assert common.backend_of(None, cpu, "auto") == "torch"
    assert common.backend_of("bmc_loss", cpu, "torch") == "torch"
    assert common.backend_of("bmc_loss", cpu, "auto") == imbreg_fast.selected_backend(torch.empty(0), "bmc_loss")
