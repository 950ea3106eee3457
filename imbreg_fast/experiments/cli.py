"""``python -m imbreg_fast``: the main job's command line (argparse subcommands).

::

    python -m imbreg_fast benchmark synthetic [--settings normal-high,exp-low,...] [--seeds N] [--epochs E]
    python -m imbreg_fast train depth [--methods mse,bmc,...] [--compare-reference]
    python -m imbreg_fast train tabular --csv FILE --target COLUMN [--features a,b,c]
    python -m imbreg_fast demo            # benchmark synthetic --quick, then train depth --quick

Every subcommand takes the common flags of :func:`.common.add_common_arguments` (``--device``,
``--backend``, ``--seed``, ``--out DIR``, ``--quick``, ``--threads``, ``--no-progress``, ``--no-plots``).

An experiment module provides ``add_arguments(parser)`` (its own flags) and
``run(common, args, print_fn=print) -> dict`` (prints its tables, writes its JSON and figures into
``common.out`` and returns the JSON document).
"""
from __future__ import annotations

import argparse
import importlib
import time
from typing import Callable, Optional

from .common import add_common_arguments, common_args, out_dir

__all__ = ["build_parser", "main"]

DEFAULT_OUT = "imbreg_fast_out"

# (command, subcommand) -> (module, one-line help, description)
EXPERIMENTS = {
    ("benchmark", "synthetic"): (
        "synthetic",
        "the Balanced MSE paper's synthetic protocol (linear model, 1-D / 2-D skewed labels)",
        "The synthetic benchmark of the Balanced MSE paper (Ren et al., CVPR 2022, supplement): a linear model "
        "trained on 1024 noisy samples whose labels follow a skewed distribution (Normal or Exponential at three "
        "skew levels, or a 2-D multivariate normal), tested on balanced, noise-free labels. Methods: MSE, "
        "Reweight, GAI and BMC with the true noise, GAI and BMC with learned noise, BNI. Prints test MSE "
        "(mean ± std over seeds) per method and setting; writes synthetic.json and a figure of the fitted lines."),
    ("train", "depth"): (
        "depth",
        "a dense depth-regression run on generated long-tailed scenes, with per-step cost of each method",
        "Train a small encoder-decoder CNN on generated indoor-like depth maps (long-tailed depth, holes in the "
        "validity mask) with each DIR method; print the DIR depth table (RMSE, AbsRel, δ1 over All / Many / "
        "Med. / Few), the training step time of each method and its overhead over plain MSE; with "
        "--compare-reference also the same step with the published formulations. Writes depth.json and figures."),
    ("train", "tabular"): (
        "tabular",
        "your own imbalanced tabular data from a CSV file",
        "Train an MLP on the numeric columns of a CSV file to predict --target, with each DIR method, on a "
        "training split and a held-out test split balanced over label bins; print the DIR table. Writes "
        "tabular.json and a figure."),
}


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (subcommands and their flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m imbreg_fast",
        description="imbreg_fast's main job: what each deep imbalanced regression method does on an imbalanced "
                    "problem, and what it costs per training step. Start with `python -m imbreg_fast demo`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m imbreg_fast <command> --help` for a command's flags.")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    groups: dict[str, argparse._SubParsersAction] = {}
    group_help = {"benchmark": "reproduce a published benchmark protocol",
                  "train": "train models with every DIR method and compare them"}
    for (command, sub), (module, short, long) in EXPERIMENTS.items():
        if command not in groups:
            cp = commands.add_parser(command, help=group_help[command], description=group_help[command])
            groups[command] = cp.add_subparsers(dest="experiment", metavar="experiment", required=True)
        sp = groups[command].add_parser(sub, help=short, description=long)
        _module(module).add_arguments(sp)
        add_common_arguments(sp, default_out=DEFAULT_OUT)
        sp.set_defaults(experiments=[module])

    demo = commands.add_parser(
        "demo", help="the quick tour: `benchmark synthetic --quick`, then `train depth --quick`",
        description="The quick tour (what `make demo` runs): the synthetic benchmark and the depth run in their "
                    "--quick configurations, a few minutes on a laptop CPU; then where the artefacts are.")
    add_common_arguments(demo, default_out=DEFAULT_OUT, default_threads=1)
    demo.set_defaults(experiments=["synthetic", "depth"], quick=True)
    return parser


def main(argv: Optional[list[str]] = None, *, print_fn: Callable[[str], None] = print) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        args.quick = True
    common = common_args(args)
    out_dir(common.out)
    results = {}
    start = time.perf_counter()
    for name in args.experiments:
        module = _module(name)
        if args.command == "demo":
            # the experiment's own defaults, under the demo's common flags
            sub = argparse.ArgumentParser()
            module.add_arguments(sub)
            exp_args = sub.parse_args([])
            for key, value in vars(args).items():
                setattr(exp_args, key, value)
        else:
            exp_args = args
        results[name] = module.run(common, exp_args, print_fn=print_fn)
        print_fn("")
    artefacts = [p for r in results.values() for p in r.get("artefacts", [])]
    print_fn(f"done in {time.perf_counter() - start:.0f} s; artefacts in {common.out.resolve()}:")
    for path in artefacts:
        print_fn(f"  {path}")
    return 0
