"""What every experiment of the main job shares: the common command-line flags, device and backend checks,
progress bars (tqdm), figures (matplotlib, headless), JSON artefacts, step timing and text tables.

Nothing here is part of the library's API; the experiments (:mod:`.synthetic`, :mod:`.depth`,
:mod:`.tabular`) build on it, and :mod:`.cli` wires them into ``python -m imbreg_fast``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .. import _dispatch

__all__ = ["CommonArgs", "add_common_arguments", "common_args", "resolve_device", "check_backend",
           "backend_of", "progress", "pyplot", "out_dir", "write_json", "time_step", "mean_std",
           "format_table", "fmt_mean_std", "synchronize", "Timing", "environment", "int_at_least"]


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommonArgs:
    """The flags every subcommand takes (validated): see :func:`add_common_arguments`."""
    device: torch.device
    backend: str
    seed: int
    out: Path
    quick: bool
    progress: bool
    plots: bool
    threads: int


def add_common_arguments(parser: argparse.ArgumentParser, *, default_out: str,
                         default_threads: Optional[int] = None) -> None:
    """Add ``--device --backend --seed --out --quick --threads --no-progress --no-plots`` to ``parser``."""
    g = parser.add_argument_group("common options")
    g.add_argument("--device", default="cpu",
                   help="where to train: 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available, else CPU); "
                        "default: cpu")
    g.add_argument("--backend", default="auto", choices=("auto",) + _dispatch.BACKENDS,
                   help="kernel backend of the library's ops: 'auto' picks the fastest available for the device "
                        "(cpp on CPU, triton on CUDA; $IMBREG_BACKEND overrides 'auto'); 'torch' is the pure-"
                        "PyTorch reference; 'cpp' needs the compiled extension, 'triton' a CUDA device (or "
                        "TRITON_INTERPRET=1). Default: auto")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the data, the model initialisation and the batch order (default: 0)")
    g.add_argument("--out", default=default_out, metavar="DIR",
                   help=f"directory for the JSON results and the PNG figures, created if missing "
                        f"(default: {default_out})")
    g.add_argument("--quick", action="store_true",
                   help="a small configuration (few epochs, one seed) that finishes in a minute or two")
    g.add_argument("--threads", type=int, default=default_threads,
                   help="torch intra-op threads (default: " + ("torch's default, the number of cores)"
                        if default_threads is None else f"{default_threads}: the quick problems are small, and "
                        "on a busy machine threads that wait on each other cost more than they bring)"))
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")
    g.add_argument("--no-plots", action="store_true", help="write no figures (matplotlib is then not needed)")


def common_args(args: argparse.Namespace) -> CommonArgs:
    """Validate the common flags of a parsed namespace; raises ``SystemExit`` with a clear message."""
    if args.seed < 0:
        raise SystemExit(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backend = check_backend(args.backend, device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {str(out)!r} exists and is not a directory")
    plots = not args.no_plots
    if plots:
        pyplot()   # fail now, not after an hour of training
    return CommonArgs(device, backend, args.seed, out, bool(args.quick), not args.no_progress, plots,
                      torch.get_num_threads())


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (a clear message otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def resolve_device(name: str) -> torch.device:
    """``'auto'`` | ``'cpu'`` | ``'cuda'`` | ``'cuda:N'`` -> a device that exists (``SystemExit`` otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SystemExit(f"--device: not a device name: {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def check_backend(backend: str, device: torch.device) -> str:
    """``backend`` if it can run on ``device`` (``'auto'`` always can); ``SystemExit`` saying why not."""
    if backend == "auto":
        try:                        # $IMBREG_BACKEND is read by 'auto': a bad value fails here, not mid-run
            _dispatch.selected_backend(torch.empty(0, device=device), "bmc_loss", backend)
        except (ValueError, RuntimeError) as exc:
            raise SystemExit(f"--backend auto: {exc}") from None
        return backend
    reason = _dispatch.unavailable_reason(backend, device)
    if reason is not None:
        raise SystemExit(f"--backend {backend}: cannot run on {device} here: {reason}")
    return backend


def backend_of(op: Optional[str], device: torch.device, backend: str) -> str:
    """The backend that runs public op ``op`` (e.g. ``'bmc_loss'``) for ``backend`` on ``device``; 'torch'
    for the methods that use no op of the library (``op=None``)."""
    if op is None:
        return "torch"
    return _dispatch.selected_backend(torch.empty(0, device=device), op, backend)


# --------------------------------------------------------------------------------------------------
# progress, figures, files
# --------------------------------------------------------------------------------------------------


def progress(iterable: Optional[Iterable] = None, *, enabled: bool = True, total: Optional[int] = None,
             desc: Optional[str] = None, leave: bool = False, **kwargs):
    """A tqdm progress bar over ``iterable`` (or a manual one with ``total``), written to stderr; disabled when
    ``enabled`` is false or stderr is not a terminal (then it iterates silently)."""
    from tqdm.auto import tqdm

    disable = not enabled or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable, dynamic_ncols=True,
                file=sys.stderr, **kwargs)


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (``SystemExit`` with the install command when
    matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the figures need matplotlib: pip install 'imbreg_fast[experiments]' (or pass "
                         "--no-plots)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def out_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(x: Any) -> Any:
    """Tensors, numbers and containers as plain JSON values; NaN / inf become ``null`` (strict JSON)."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.device, torch.dtype, Path)):
        return str(x)
    return x


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as strict, indented JSON (NaN/inf -> null); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# timing and statistics
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call of a timed step: the median and the spread over ``repeats`` timed calls."""
    median: float
    min: float
    max: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "repeats": self.repeats}


def time_step(step: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 10) -> Timing:
    """Time ``step()`` (which should include everything a training step does: forward, backward, optimiser):
    ``warmup`` untimed calls, then ``repeats`` calls each timed on its own with the device synchronised."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of ``values``; NaN entries propagate."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``'m ± s'`` (``'-'`` for a NaN mean)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, first_left: bool = True) -> str:
    """A fixed-width text table: the first column left-aligned, the others right-aligned; cells are ``str()``-ed
    (floats with 3 decimals, None and NaN as '-')."""
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.ljust(w) if (i == 0 and first_left) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    out = [line([str(h) for h in header]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def environment() -> dict:
    """Machine facts recorded in every JSON artefact: torch version, threads, CPU kernel library, backends."""
    from .._extension import cpu_capability

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_capability": cpu_capability(),
            "available_backends": list(_dispatch.available_backends()),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_model": _cpu_model(), "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
