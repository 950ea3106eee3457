"""``python -m imbreg_fast train tabular --csv FILE --target COLUMN``: the DIR methods on your own data.

An MLP is trained on the numeric columns of a CSV file to predict the ``--target`` column, once per method,
and evaluated with the DIR protocol (:class:`imbreg_fast.metrics.DIRMetrics`) on a held-out test split that
is balanced over label bins. The steps, each a function of its own:

1. :func:`read_table` reads the CSV (Python's :mod:`csv` module; pandas is not needed) and validates it.
   The first non-blank line is the header (quoted names are fine; a UTF-8 byte-order mark is ignored).
   **Missing values** are empty cells (or cells of spaces). A row whose label is missing is dropped, and the
   count is reported. A row with a missing value in one of the feature columns is dropped too, and the count
   is reported per column: filling the gap would invent a value that the test split then scores; pass
   ``--features`` without a mostly empty column to keep its rows. Any other cell of a used column must be a
   finite number (``nan`` / ``inf`` in a cell are errors, not missing values). Without ``--features`` the
   features are every other column whose cells are all numbers or empty; the other columns (text, entirely
   empty, or without a header name, such as an unnamed index column) are skipped and listed.
2. :func:`balanced_split` holds out a test split balanced over ``--bins`` equal-width label bins (below).
3. :class:`Standardizer`: features and labels are standardised with the mean and standard deviation of the
   training split only (a column that is constant in the training split is centred, not scaled). Every
   method trains on standardised labels; predictions are mapped back, so every metric is in label units.
4. :class:`TabularMLP` (``encoder`` + ``head``, the model contract of :mod:`.methods`) is trained with each
   method of :mod:`.methods` (FDS on the MLP's row features; BMC / GAI / BNI learn their noise scale from
   ``--init-noise-sigma``, by default half the training labels' standard deviation), on the same batches
   from the same initial weights; the DIR table, ``tabular.json`` and ``tabular.png`` are written.

**The balanced test split.** The labels are put into K = ``--bins`` equal-width bins over
``[min label, max label]`` (default: 20, or one bin per 10 rows for files of fewer than 200 rows); n_b
labelled rows fall into bin b. Bin b can give at most ``c_b = floor(n_b / 2)`` test rows, so that it keeps
at least half of its rows for training (a bin with a single row stays in training). The test split takes
``t_b = min(T, c_b)`` rows of every bin, with T the largest integer for which
``sum_b min(T, c_b) <= round(test_fraction * N)``: every bin gives the same number of test rows, as in
the balanced test sets of the DIR benchmarks (Yang et al., ICML 2021), except the rare bins that cannot
give T, which give all they can. The rare label regions are therefore represented in the
test split as much as the data allows, and the test split is at most ``test_fraction`` of the rows. Which
rows of a bin are held out is a uniformly random choice seeded by ``--seed``, so the split is
deterministic. The same bins define the shot groups (many / medium / few-shot by their training count, see
docs/methods.md §6.1) and the x-axis of the figure.

**SMOGN** (Branco et al., 2017) is one more baseline, "SMOGN + MSE": the training split is resampled by
``smogn.smoter`` (the optional ``smogn`` package, which needs pandas) and the MLP is trained with plain MSE.
The row is added when ``smogn`` can be imported, or always with ``--smogn`` (then a missing package is an
error with the install command); ``--no-smogn`` leaves it out.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..lds import bin_edges, bin_index
from ..metrics import DIRMetrics
from . import methods as M
from .common import CommonArgs, environment, format_table, progress, pyplot, write_json

__all__ = ["MIN_ROWS", "MAX_TEST_SHARE", "Table", "read_table", "check_rows", "Split", "balanced_split",
           "default_bins", "Standardizer", "Prepared", "prepare", "TabularMLP", "smogn_available",
           "smogn_resample", "add_arguments", "run"]

MIN_ROWS = 20
"""Fewest labelled rows accepted: both splits need at least 2 rows, each label bin keeps at least half of its
rows for training, and below about 20 rows neither an MLP nor per-group errors carry information."""

MAX_TEST_SHARE = 0.5
"""A label bin gives at most this share of its rows (rounded down) to the test split."""

MISSING_FEATURES_POLICY = "rows with a missing feature value are dropped"

SMOGN_INSTALL = "pip install smogn"

JSON_NAME = "tabular.json"
FIGURE_NAME = "tabular.png"


# --------------------------------------------------------------------------------------------------
# reading the CSV
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """The labelled rows of a CSV file, validated. ``x``: float64 ``[N, F]`` features (columns
    ``features``), ``y``: float64 ``[N]`` labels, ``lines``: int64 ``[N]`` the line of each row in the file.
    ``rows_read`` counts the data rows of the file; ``dropped_missing_label`` and ``dropped_missing_features``
    the rows dropped for a missing value; ``skipped_columns`` maps each column not used to why; ``notes``
    are the messages to show the user."""
    path: Path
    target: str
    features: tuple[str, ...]
    x: Tensor
    y: Tensor
    lines: Tensor
    rows_read: int
    dropped_missing_label: int
    dropped_missing_features: int
    skipped_columns: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _parse_float(cell: str) -> Optional[float]:
    """The number in ``cell``, None when it is not one."""
    try:
        return float(cell)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Column:
    """One column parsed: ``values`` (None for an empty cell, NaN for a cell that is not a number),
    ``present`` non-empty cells, and ``(line, cell)`` of the first cell that is not a number
    (``not_numeric``) and of the first number that is not finite (``not_finite``)."""
    values: list
    present: int
    not_numeric: Optional[tuple[int, str]]
    not_finite: Optional[tuple[int, str]]


def _parse_column(cells: Sequence[str], lines: Sequence[int]) -> _Column:
    values: list = []
    present = 0
    not_numeric = not_finite = None
    for line, cell in zip(lines, cells):
        cell = cell.strip()
        if not cell:
            values.append(None)
            continue
        present += 1
        v = _parse_float(cell)
        if v is None:
            not_numeric = not_numeric or (line, cell)
            v = math.nan
        elif not math.isfinite(v):
            not_finite = not_finite or (line, cell)
        values.append(v)
    return _Column(values, present, not_numeric, not_finite)


def _read_records(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped) and the data records ``(line, cells)`` of a CSV file; blank lines are
    skipped. ``SystemExit`` for a missing, empty or malformed file."""
    if not path.exists():
        raise SystemExit(f"--csv {str(path)!r}: no such file")
    if not path.is_file():
        raise SystemExit(f"--csv {str(path)!r}: not a regular file")
    header: Optional[list[str]] = None
    records: list[tuple[int, list[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            try:
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue
                    if header is None:
                        header = [cell.strip() for cell in row]
                        continue
                    if len(row) != len(header):
                        raise SystemExit(
                            f"--csv {str(path)!r}, line {reader.line_num}: {len(row)} fields, but the header has "
                            f"{len(header)} (is --delimiter {delimiter!r} right?)")
                    records.append((reader.line_num, row))
            except csv.Error as exc:
                raise SystemExit(f"--csv {str(path)!r}, line {reader.line_num}: not valid CSV: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(f"--csv {str(path)!r}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise SystemExit(f"--csv {str(path)!r}: cannot be read: {exc}") from None
    if header is None:
        raise SystemExit(f"--csv {str(path)!r}: the file is empty (expected a header line naming the columns, "
                         f"then one row per sample)")
    if all(_parse_float(name) is not None for name in header):
        raise SystemExit(f"--csv {str(path)!r}: the first line {delimiter.join(header)!r} holds only numbers; "
                         f"it must be a header naming the columns")
    named = [name for name in header if name]
    duplicates = sorted({name for name in named if named.count(name) > 1})
    if duplicates:
        raise SystemExit(f"--csv {str(path)!r}: duplicate column name(s) in the header: {', '.join(duplicates)}")
    if not records:
        raise SystemExit(f"--csv {str(path)!r}: the file has a header but no data rows")
    return header, records


def _columns_text(header: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in header if name)


def read_table(path, target: str, features: Optional[Sequence[str]] = None, *, delimiter: str = ",") -> Table:
    """Read and validate the CSV file ``path`` (see the module docstring for the rules).

    Args:
        path: the CSV file.
        target: the label column.
        features: the feature columns; None: every other column that is numeric.
        delimiter: the field separator (one character).

    Raises ``SystemExit`` with a message naming the flag, the column and the line for every problem of the
    data: a missing or empty file, an unknown column, a non-numeric or non-finite value in a used column, no
    feature column.
    """
    path = Path(path)
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise SystemExit(f"--delimiter must be one character, got {delimiter!r}")
    header, records = _read_records(path, delimiter)
    if target not in header or not target:
        raise SystemExit(f"--target {target!r}: no such column in {str(path)!r}; the columns are: "
                         f"{_columns_text(header)}")
    col = {name: i for i, name in enumerate(header) if name}
    lines = [line for line, _ in records]
    parsed: dict[str, _Column] = {}

    def column(name: str) -> _Column:
        if name not in parsed:
            j = col[name]
            parsed[name] = _parse_column([row[j] for _, row in records], lines)
        return parsed[name]

    # the label
    y_col = column(target)
    if y_col.not_numeric is not None:
        line, cell = y_col.not_numeric
        raise SystemExit(f"--target {target!r}: not a numeric column: line {line} has {cell!r}")
    if y_col.not_finite is not None:
        line, cell = y_col.not_finite
        raise SystemExit(f"--target {target!r}: line {line} has the label {cell!r}; labels must be finite "
                         f"numbers (leave the cell empty to mark a missing label: such rows are dropped)")

    # the features
    skipped: dict[str, str] = {}
    if features is not None:
        features = list(features)
        if not features:
            raise SystemExit("--features: no column given")
        unknown = [name for name in features if name not in col]
        if unknown:
            raise SystemExit(f"--features: no column named {', '.join(map(repr, unknown))} in {str(path)!r}; the "
                             f"columns are: {_columns_text(header)}")
        if target in features:
            raise SystemExit(f"--features must not contain the target column {target!r}")
        repeated = sorted({name for name in features if features.count(name) > 1})
        if repeated:
            raise SystemExit(f"--features names a column more than once: {', '.join(map(repr, repeated))}")
        for name in features:
            c = column(name)
            if c.not_numeric is not None:
                line, cell = c.not_numeric
                raise SystemExit(f"--features: column {name!r} is not numeric: line {line} has {cell!r}")
            if c.present == 0:
                raise SystemExit(f"--features: column {name!r} has no values (every cell is empty)")
    else:
        features = []
        for j, name in enumerate(header):
            if name == target:
                continue
            if not name:
                skipped[f"(column {j + 1})"] = "no name in the header"
                continue
            c = column(name)
            if c.not_numeric is not None:
                skipped[name] = f"not numeric (line {c.not_numeric[0]}: {c.not_numeric[1]!r})"
            elif c.present == 0:
                skipped[name] = "no values"
            else:
                features.append(name)
        if not features:
            raise SystemExit(f"--csv {str(path)!r}: no numeric feature column besides the target {target!r} (the "
                             f"columns are: {_columns_text(header)}); pass --features to name them")
    for name in features:
        if column(name).not_finite is not None:
            line, cell = column(name).not_finite
            raise SystemExit(f"feature column {name!r}: line {line} has {cell!r}; features must be finite numbers "
                             f"(leave the cell empty to mark a missing value; pass --features to leave the column "
                             f"out)")

    notes = []
    if skipped:
        notes.append("skipped column(s) " + "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
                     + " (pass --features to choose the columns)")
    labels = y_col.values
    has_label = [v is not None for v in labels]
    n_no_label = has_label.count(False)
    if n_no_label:
        first = lines[has_label.index(False)]
        notes.append(f"dropped {n_no_label} of {len(records)} row(s) without a {target!r} value (empty cell; "
                     f"first on line {first})")
    feature_values = [column(name).values for name in features]
    missing_per_column: dict[str, int] = {}
    keep = []
    for i, labelled in enumerate(has_label):
        if not labelled:
            continue
        gaps = [name for name, values in zip(features, feature_values) if values[i] is None]
        for name in gaps:
            missing_per_column[name] = missing_per_column.get(name, 0) + 1
        if not gaps:
            keep.append(i)
    n_no_features = len(has_label) - n_no_label - len(keep)
    if n_no_features:
        notes.append(f"dropped {n_no_features} labelled row(s) with a missing feature value ("
                     + ", ".join(f"{name!r}: {k}" for name, k in missing_per_column.items())
                     + f"); {MISSING_FEATURES_POLICY}, pass --features to leave a column out")

    x = torch.tensor([[values[i] for values in feature_values] for i in keep],
                     dtype=torch.float64).reshape(len(keep), len(features))
    y = torch.tensor([labels[i] for i in keep], dtype=torch.float64)
    row_lines = torch.tensor([lines[i] for i in keep], dtype=torch.int64)
    return Table(path, target, tuple(features), x, y, row_lines, len(records), n_no_label, n_no_features,
                 skipped, tuple(notes))


def check_rows(table: Table) -> None:
    """``SystemExit`` unless ``table`` has at least :data:`MIN_ROWS` rows and a label that varies."""
    n = table.y.numel()
    if n < MIN_ROWS:
        dropped = ""
        if table.dropped_missing_label or table.dropped_missing_features:
            dropped = (f" ({table.rows_read} read, {table.dropped_missing_label} without a label and "
                       f"{table.dropped_missing_features} with a missing feature value dropped)")
        raise SystemExit(f"--csv {str(table.path)!r}: {n} usable row(s){dropped}; at least {MIN_ROWS} are needed: "
                         f"the balanced split keeps at least half of each label bin for training and needs 2 "
                         f"rows in each split, and fewer rows cannot train and evaluate an MLP")
    lo, hi = float(table.y.min()), float(table.y.max())
    if lo == hi:
        raise SystemExit(f"--target {table.target!r}: the label is constant ({lo:g} on every usable row); there is "
                         f"nothing to regress")


# --------------------------------------------------------------------------------------------------
# the balanced split and standardisation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """A train / test split of rows ``0 .. N-1``. ``train``, ``test``: sorted int64 row indices;
    ``test_per_bin`` / ``train_per_bin``: int64 ``[K]`` rows of each label bin in each split;
    ``per_bin_target``: T, the test rows asked of every bin (a bin gives ``min(T, floor(n_b / 2))``)."""
    train: Tensor
    test: Tensor
    train_per_bin: Tensor
    test_per_bin: Tensor
    per_bin_target: int


def _water_level(caps: Tensor, budget: int) -> int:
    """The largest T >= 0 with ``sum(min(T, caps)) <= budget`` (T = max(caps) when everything fits)."""
    lo, hi = 0, int(caps.max()) if caps.numel() else 0
    while lo < hi:                         # the sum is non-decreasing in T
        mid = (lo + hi + 1) // 2
        if int(caps.clamp(max=mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def balanced_split(labels: Tensor, edges: Tensor, test_fraction: float, seed: int) -> Split:
    """Hold out a test split of ``labels`` (``[N]``) balanced over the label bins ``edges`` (``[K + 1]``, from
    :func:`imbreg_fast.lds.bin_edges`): bin b gives ``min(T, floor(n_b * MAX_TEST_SHARE))`` rows, T as large
    as the budget ``round(test_fraction * N)`` allows (see the module docstring). Deterministic in ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = labels.numel()
    k = edges.numel() - 1
    idx = bin_index(labels.reshape(-1), edges)
    counts = torch.bincount(idx, minlength=k)
    caps = (counts.double() * MAX_TEST_SHARE).floor().long()
    level = _water_level(caps, round(test_fraction * n))
    take = caps.clamp(max=level)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    # the rows of each bin in the random order: a stable sort by bin keeps the permutation within each bin
    by_bin = order[torch.sort(idx[order], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_bin] = torch.arange(n) - torch.repeat_interleave(starts, counts)
    is_test = rank < take[idx]
    test = torch.nonzero(is_test).reshape(-1)
    train = torch.nonzero(~is_test).reshape(-1)
    return Split(train, test, counts - take, take, level)


@dataclass(frozen=True)
class Standardizer:
    """``(v - mean) / std`` per column, with the statistics of the rows it was fitted on (a column that is
    constant there has ``std = 1``: centred, not scaled)."""
    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, values: Tensor) -> "Standardizer":
        """Fit on ``values`` ``[N]`` or ``[N, F]`` (population standard deviation)."""
        mean = values.mean(0)
        std = values.std(0, correction=0)
        return cls(mean, torch.where(std > 0, std, torch.ones_like(std)))

    def __call__(self, values: Tensor) -> Tensor:
        return (values - self.mean) / self.std

    def inverse(self, values: Tensor) -> Tensor:
        return values * self.std + self.mean


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


class TabularMLP(nn.Module):
    """An MLP on row features: ``encoder`` (Linear + ReLU per width of ``hidden``) maps ``[B, F]`` to the row
    features ``[B, C]``, ``C = hidden[-1]``; ``head`` (Linear) maps them to ``outputs`` values (the prediction,
    then the class logits of reg+cls)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 128), outputs: int = 1) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden must name at least one layer width")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(width, outputs)
        self.feature_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------------------------------
# SMOGN
# --------------------------------------------------------------------------------------------------


def smogn_available() -> bool:
    """Whether the optional ``smogn`` package (and pandas, which it needs) can be imported."""
    try:
        importlib.import_module("smogn")
        importlib.import_module("pandas")
    except ImportError:
        return False
    return True


def smogn_resample(x: Tensor, y: Tensor, features: Sequence[str], target: str, seed: int) -> tuple[Tensor, Tensor]:
    """The training rows ``x`` ``[N, F]``, ``y`` ``[N]`` resampled by ``smogn.smoter`` (over-sampling of the
    rare label regions, under-sampling of the common one) with its defaults; float64 results. smogn draws
    from the global numpy and ``random`` generators: they are seeded with ``seed`` for the call and restored
    afterwards."""
    import numpy as np
    import pandas as pd
    import smogn

    columns = list(features) + [target]
    if target in features:
        raise ValueError(f"target {target!r} is also a feature")
    frame = pd.DataFrame(torch.cat([x, y[:, None]], 1).numpy(), columns=columns)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        np.random.seed(seed)
        random.seed(seed)
        out = smogn.smoter(data=frame, y=target)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    values = torch.as_tensor(np.asarray(out[columns], dtype=np.float64))
    return values[:, :-1].contiguous(), values[:, -1].contiguous()


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

DEFAULT_EPOCHS = 60
DEFAULT_BINS = 20
ROWS_PER_DEFAULT_BIN = 10
QUICK_EPOCHS = 4
DEFAULT_HIDDEN = "128,128"
QUICK_HIDDEN = "32,32"
DEFAULT_NOISE_SHARE = 0.5


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's own flags (``cli`` adds the common ones)."""
    g = parser.add_argument_group("data")
    g.add_argument("--csv", required=True, metavar="FILE",
                   help="the CSV file: a header line naming the columns, then one row per sample; empty cells "
                        "are missing values (rows with a missing label or feature value are dropped and counted)")
    g.add_argument("--target", required=True, metavar="COLUMN", help="the column to predict (numeric)")
    g.add_argument("--features", default=None, metavar="A,B,C",
                   help="the feature columns, comma-separated (default: every other numeric column; text, empty "
                        "and unnamed columns are skipped and listed)")
    g.add_argument("--delimiter", default=",",
                   help="the field separator, one character; 'tab' for tab-separated files (default: ',')")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="at most this fraction of the rows goes to the test split, the same number from every "
                        "label bin where the bin can give it (a bin gives at most half its rows); default: 0.2")
    g.add_argument("--bins", type=int, default=None,
                   help="equal-width label bins over the label range: they balance the test split, define the "
                        f"many / medium / few-shot groups and the x-axis of the figure (default: {DEFAULT_BINS}, "
                        f"fewer for small files: one per {ROWS_PER_DEFAULT_BIN} rows, at least 2)")
    g.add_argument("--many", type=int, default=100,
                   help="a label bin with more than this many training rows is many-shot (default: 100, as in "
                        "the DIR benchmarks)")
    g.add_argument("--few", type=int, default=20,
                   help="a label bin with fewer than this many training rows is few-shot (default: 20)")
    m = parser.add_argument_group("training")
    m.add_argument("--methods", default=None, metavar="M1,M2",
                   help=f"comma-separated methods to compare, among {','.join(M.METHODS)} (default: all of them; "
                        f"FDS runs on the MLP's row features; for SMOGN see --smogn)")
    m.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs per method (default: {DEFAULT_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    m.add_argument("--batch-size", type=int, default=256, help="rows per training batch (default: 256)")
    m.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the MLP (default: 1e-3)")
    m.add_argument("--hidden", default=None, metavar="W1,W2",
                   help=f"widths of the MLP's hidden layers; the last is the feature size of FDS (default: "
                        f"{DEFAULT_HIDDEN}; {QUICK_HIDDEN} with --quick)")
    m.add_argument("--smogn", default=None, action=argparse.BooleanOptionalAction,
                   help="add the 'SMOGN + MSE' baseline (training split resampled by the optional smogn package, "
                        f"`{SMOGN_INSTALL}`); default: added when smogn can be imported; --no-smogn leaves it out")
    m.add_argument("--init-noise-sigma", type=float, default=None, metavar="SIGMA",
                   help="initial noise scale of BMC / GAI / BNI in label units, learned from there (default: "
                        f"{DEFAULT_NOISE_SHARE:g} x the standard deviation of the training labels)")
    m.add_argument("--method-bins", type=int, default=M.MethodConfig().bins,
                   help="equal-width bins over the label range on which the methods fit their label statistics "
                        f"(LDS, FDS, BNI, reg+cls classes, BSAM and RRT weights); default: "
                        f"{M.MethodConfig().bins}")


@dataclass(frozen=True)
class Options:
    """The validated flags of this experiment (see :func:`add_arguments`)."""
    csv: Path
    target: str
    features: Optional[tuple[str, ...]]
    delimiter: str
    methods: tuple[str, ...]
    smogn: bool
    epochs: int
    batch_size: int
    lr: float
    hidden: tuple[int, ...]
    test_fraction: float
    bins: Optional[int]
    method_bins: int
    many: int
    few: int
    init_noise_sigma: Optional[float]


def _options(common: CommonArgs, args: argparse.Namespace) -> Options:
    """Validate the flags; ``SystemExit`` naming the flag otherwise."""
    def positive_int(flag: str, value: int, minimum: int = 1) -> int:
        if value < minimum:
            raise SystemExit(f"{flag} must be >= {minimum}, got {value}")
        return value

    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if common.quick else DEFAULT_EPOCHS)
    positive_int("--epochs", epochs)
    positive_int("--batch-size", args.batch_size, 2)
    if args.bins is not None:
        positive_int("--bins", args.bins)
    positive_int("--method-bins", args.method_bins, 2)
    if args.many < 0 or args.few < 0 or args.few > args.many:
        raise SystemExit(f"--many and --few must satisfy 0 <= --few <= --many, got --many {args.many} "
                         f"--few {args.few}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(f"--lr must be a finite number > 0, got {args.lr}")
    sigma = args.init_noise_sigma
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise SystemExit(f"--init-noise-sigma must be a finite number > 0, got {args.init_noise_sigma}")
    if not 0.0 < args.test_fraction < 1.0:
        raise SystemExit(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    hidden_text = args.hidden if args.hidden is not None else (QUICK_HIDDEN if common.quick else DEFAULT_HIDDEN)
    try:
        hidden = tuple(int(w) for w in _comma_list(hidden_text))
    except ValueError:
        raise SystemExit(f"--hidden must be comma-separated layer widths such as 128,128, got "
                         f"{hidden_text!r}") from None
    if not hidden or min(hidden) < 1:
        raise SystemExit(f"--hidden widths must be >= 1, got {hidden_text!r}")
    try:
        methods = tuple(M.parse_methods(args.methods if args.methods is not None else ",".join(M.METHODS)))
    except ValueError as exc:
        raise SystemExit(f"--methods: {exc} (the SMOGN baseline is --smogn)") from None
    delimiter = {"tab": "\t", "\\t": "\t"}.get(args.delimiter, args.delimiter)
    if len(delimiter) != 1:
        raise SystemExit(f"--delimiter must be one character (or 'tab'), got {args.delimiter!r}")
    features = None
    if args.features is not None:
        features = tuple(_comma_list(args.features))
        if not all(features):
            raise SystemExit(f"--features: an empty column name in {args.features!r}")
    if args.smogn and not smogn_available():
        raise SystemExit(f"--smogn needs the optional smogn package (and pandas): {SMOGN_INSTALL}")
    smogn = smogn_available() if args.smogn is None else bool(args.smogn)
    return Options(Path(args.csv), args.target, features, delimiter, methods, smogn, epochs, args.batch_size,
                   float(args.lr), hidden, float(args.test_fraction), args.bins, args.method_bins, args.many,
                   args.few, args.init_noise_sigma)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------

SMOGN_NAME, SMOGN_DISPLAY = "smogn", "SMOGN + MSE"
EVAL_CHUNK = 8192
_GROUPS = (("All", "all"), ("Many", "many"), ("Med.", "medium"), ("Few", "few"))


@dataclass(frozen=True)
class Prepared:
    """The data every method trains and is evaluated on. ``edges``: the K label bins of the split, the shot
    groups and the figure; ``x_train`` / ``z_train``: standardised features and labels of the training split
    (float32, on the device); ``x_test``: standardised test features; ``y_test``: test labels in label units
    (float64, CPU); ``shot_bins``: how many label bins are many / medium / few-shot."""
    table: Table
    edges: Tensor
    split: Split
    x_scaler: Standardizer
    y_scaler: Standardizer
    x_train: Tensor
    z_train: Tensor
    x_test: Tensor
    y_test: Tensor
    shot_bins: dict

    def metric(self, opts: Options) -> DIRMetrics:
        """A fresh DIR metric on the label bins, shot groups by the training split's counts."""
        return DIRMetrics(self.edges, train_counts=self.split.train_per_bin.double(), many=opts.many, few=opts.few)


def default_bins(rows: int) -> int:
    """The number of label bins without ``--bins``: :data:`DEFAULT_BINS`, or one per
    :data:`ROWS_PER_DEFAULT_BIN` rows when that is fewer (at least 2), so that small files still give every
    bin a few rows to split."""
    return min(DEFAULT_BINS, max(2, rows // ROWS_PER_DEFAULT_BIN))


def prepare(table: Table, opts: Options, seed: int, device: torch.device) -> Prepared:
    """Bin the labels, split (:func:`balanced_split`), standardise with the training split's statistics;
    ``SystemExit`` when a split gets fewer than 2 rows."""
    check_rows(table)
    n = table.y.numel()
    bins = opts.bins if opts.bins is not None else default_bins(n)
    edges = bin_edges(bins, (float(table.y.min()), float(table.y.max())))
    split = balanced_split(table.y, edges, opts.test_fraction, seed)
    if split.train.numel() < 2 or split.test.numel() < 2:
        raise SystemExit(
            f"the balanced split of {n} rows over --bins {bins} label bins gives {split.train.numel()} "
            f"training and {split.test.numel()} test row(s); each split needs at least 2 (a bin gives at most half "
            f"of its rows to the test split, which holds at most --test-fraction {opts.test_fraction:g} of the "
            f"rows): raise --test-fraction or lower --bins")
    x_scaler = Standardizer.fit(table.x[split.train])
    y_scaler = Standardizer.fit(table.y[split.train])
    counts = split.train_per_bin
    shot_bins = {"many": int((counts > opts.many).sum()),
                 "medium": int(((counts >= opts.few) & (counts <= opts.many)).sum()),
                 "few": int((counts < opts.few).sum())}
    return Prepared(table, edges, split, x_scaler, y_scaler,
                    x_scaler(table.x[split.train]).float().to(device),
                    y_scaler(table.y[split.train]).float().to(device),
                    x_scaler(table.x[split.test]).float().to(device), table.y[split.test], shot_bins)


def _batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Callable[[int], list]:
    """``batches(epoch)``: the rows in a random order drawn from ``(seed, epoch)`` (the same for every
    method), cut into batches ``(x, y [B, 1], None)``; a last batch of a single row is left out (BMC and
    reg+cls compare a row with the rest of its batch)."""
    n = x.shape[0]

    def batches(epoch: int) -> list:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
        order = torch.randperm(n, generator=gen).to(x.device)
        out = []
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if idx.numel() < 2 and start > 0:
                break
            out.append((x[idx], y[idx].reshape(-1, 1), None))
        return out

    return batches


@torch.no_grad()
def _predict(run: M.MethodRun, x: Tensor, y_scaler: Standardizer) -> Tensor:
    """Test predictions of ``run`` in label units, float64 ``[N]`` on the CPU."""
    parts = [run.predict(x[i:i + EVAL_CHUNK]).reshape(-1) for i in range(0, x.shape[0], EVAL_CHUNK)]
    return y_scaler.inverse(torch.cat(parts).double().cpu())


class _Trainer:
    """Builds, trains and evaluates one method after another on the same :class:`Prepared` data (the RRT
    stage-one model is the MSE run: trained here when MSE is not a row of its own)."""

    def __init__(self, data: Prepared, opts: Options, common: CommonArgs, priors: M.LabelPriors):
        self.data, self.opts, self.common, self.priors = data, opts, common, priors
        self.batches = _batches(data.x_train, data.z_train, opts.batch_size, common.seed)
        self.steps_per_epoch = len(self.batches(0))
        self.mse: Optional[M.MethodRun] = None
        self.mse_seconds: Optional[float] = None

    def model(self, out_channels: int) -> nn.Module:
        return TabularMLP(self.data.x_train.shape[1], self.opts.hidden, out_channels)

    def progress(self, iterable, desc: str):
        return progress(iterable, enabled=self.common.progress, desc=desc)

    def _build(self, name: str, total_steps: int, **kwargs) -> M.MethodRun:
        return M.build(name, self.priors, self.model, device=self.common.device, backend=self.common.backend,
                       total_steps=total_steps, seed=self.common.seed, **kwargs)

    def _train(self, run: M.MethodRun, batches) -> M.TrainResult:
        return M.train(run, batches, self.opts.epochs, progress=self.progress)

    def _stage_one(self) -> M.MethodRun:
        if self.mse is None:
            self.mse = self._build("mse", self.opts.epochs * self.steps_per_epoch)
            self.mse_seconds = self._train(self.mse, self.batches).seconds
        return self.mse

    def __call__(self, name: str) -> dict:
        """The JSON record of method ``name`` (a key of :data:`.methods.METHODS`, or ``'smogn'``)."""
        data, opts = self.data, self.opts
        batches = self.batches
        extra: dict = {}                           # the keys of SMOGN and RRT, present even when they fail
        if name == SMOGN_NAME:
            extra["smogn_train_rows"] = None
        elif name == "rrt":
            extra["stage_one_seconds"] = None
        op_of = "mse" if name == SMOGN_NAME else name
        display = SMOGN_DISPLAY if name == SMOGN_NAME else M.METHODS[name]
        backends = M.method_backends(op_of, self.common.device, self.common.backend)

        def failed(why: str) -> dict:
            return {"name": name, "display": display, "backend": backends[M.METHOD_OPS[op_of][0]],
                    "backends": backends, "metrics": None, "train_seconds": None, "epoch_losses": None,
                    "noise_sigma": None, "per_bin_mae": None, "error": why, **extra}

        try:
            if name == SMOGN_NAME:
                try:
                    xs, ys = smogn_resample(data.table.x[data.split.train], data.table.y[data.split.train],
                                            data.table.features, opts.target, self.common.seed)
                except ValueError as exc:          # smogn refuses some label distributions
                    return failed(f"{display}: smogn.smoter failed: {exc}")
                if ys.numel() < 2:
                    return failed(f"{display}: smogn.smoter returned {ys.numel()} row(s)")
                batches = _batches(data.x_scaler(xs).float().to(self.common.device),
                                   data.y_scaler(ys).float().to(self.common.device), opts.batch_size,
                                   self.common.seed)
                extra["smogn_train_rows"] = int(ys.numel())
                run = self._build("mse", opts.epochs * len(batches(0)))
                run.display = display              # run.name stays 'mse': it selects the loss
            elif name == "rrt":
                try:
                    stage_one = self._stage_one()
                except FloatingPointError as exc:
                    return failed(f"{display} stage one: {exc}")
                extra["stage_one_seconds"] = self.mse_seconds
                run = self._build("rrt", opts.epochs * self.steps_per_epoch, pretrained=stage_one.model)
            else:
                run = self._build(name, opts.epochs * self.steps_per_epoch)
            trained = self._train(run, batches)
        except FloatingPointError as exc:          # a diverged method: reported, the others still run
            return failed(str(exc))                # (the message names the method)
        if name == "mse":
            self.mse, self.mse_seconds = run, trained.seconds
        pred = _predict(run, data.x_test, data.y_scaler)
        metric = data.metric(opts)
        metric.update(pred, data.y_test)
        metrics = {k: (int(v) if v.dtype == torch.int64 else float(v)) for k, v in metric.compute().items()}
        per_bin_mae = metric.per_bin()["mae"].tolist()
        sigma = run.noise_sigma
        return {"name": name, "display": display, "backend": backends[M.METHOD_OPS[op_of][0]], "backends": backends,
                "metrics": metrics, "train_seconds": trained.seconds, "epoch_losses": trained.epoch_losses,
                "noise_sigma": None if sigma is None else sigma * float(data.y_scaler.std),
                "per_bin_mae": per_bin_mae, "error": None, **extra}


def _tables(results: list[dict]) -> str:
    """The DIR tables: MSE / MAE (with the backend and training time) and GM / bMAE / bMSE / Pearson, per shot
    group; a diverged method shows '-'."""
    def cell(v):
        # format_table prints floats with 3 decimals: scientific notation where that would mislead
        if isinstance(v, float) and math.isfinite(v) and v != 0 and not 1e-3 <= abs(v) < 1e5:
            return f"{v:.3e}"
        return v

    def group_cells(metrics, key):
        return [None if metrics is None else cell(metrics[f"{g}/{key}"]) for _, g in _GROUPS]

    def header(metric):
        return [f"{metric} {_GROUPS[0][0]}"] + [label for label, _ in _GROUPS[1:]]

    first = [["method", "backend"] + header("MSE") + header("MAE") + ["train s"]]
    second = [["method"] + header("GM") + header("bMAE") + header("bMSE") + ["Pearson"]]
    for r in results:
        m = r["metrics"]
        first.append([r["display"], r["backend"]] + group_cells(m, "mse") + group_cells(m, "mae")
                     + [r["train_seconds"]])
        second.append([r["display"]] + group_cells(m, "gm") + group_cells(m, "bmae") + group_cells(m, "bmse")
                      + [None if m is None else cell(m["all/pearson"])])
    return format_table(first[0], first[1:]) + "\n\n" + format_table(second[0], second[1:])


def _figure(path: Path, data: Prepared, results: list[dict], target: str) -> Path:
    """Per-label-bin test MAE of each method (lines) over the training-label histogram (bars)."""
    plt = pyplot()
    edges = data.edges
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    hist = ax.twinx()
    hist.bar(centres, data.split.train_per_bin.tolist(), width=float(edges[1] - edges[0]) * 0.95, color="0.85")
    hist.set_ylabel("training rows per label bin")
    ax.set_zorder(hist.get_zorder() + 1)          # the lines over the bars
    ax.patch.set_visible(False)
    for r in results:
        if r["per_bin_mae"] is not None:
            ax.plot(centres, r["per_bin_mae"], marker="o", markersize=3, linewidth=1.2, label=r["display"])
    ax.set_xlabel(f"{target} (label bin centre)")
    ax.set_ylabel("test MAE per label bin")
    ax.set_title(f"{data.table.path.name}: test error per label bin (balanced test split, "
                 f"{data.split.test.numel()} rows)")
    if ax.get_lines():
        ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _document(common: CommonArgs, opts: Options, data: Prepared, cfg: M.MethodConfig, shot_rows: dict,
              results: list[dict]) -> dict:
    table, split, y = data.table, data.split, data.table.y
    return {
        "experiment": "train tabular",
        "config": {
            "csv": str(opts.csv), "target": opts.target,
            "features": list(opts.features) if opts.features is not None else None,
            "delimiter": opts.delimiter, "methods": list(opts.methods), "smogn": opts.smogn,
            "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr, "hidden": list(opts.hidden),
            "test_fraction": opts.test_fraction, "bins": data.edges.numel() - 1, "method_bins": opts.method_bins,
            "many": opts.many, "few": opts.few, "missing_features": MISSING_FEATURES_POLICY,
            "init_noise_sigma": cfg.init_noise_sigma * float(data.y_scaler.std),
            "method_config": cfg.as_dict(), "seed": common.seed, "device": str(common.device),
            "backend": common.backend, "quick": common.quick, "environment": environment(),
        },
        "data": {
            "rows_read": table.rows_read, "rows_used": y.numel(),
            "dropped_missing_label": table.dropped_missing_label,
            "dropped_missing_features": table.dropped_missing_features,
            "skipped_columns": dict(table.skipped_columns), "features": list(table.features),
            "label": {"min": float(y.min()), "max": float(y.max()), "mean": float(y.mean()),
                      "std": float(y.std(correction=0))},
            "bin_edges": data.edges.tolist(),
            "split": {"train": split.train.numel(), "test": split.test.numel(),
                      "test_per_bin_target": split.per_bin_target, "train_per_bin": split.train_per_bin.tolist(),
                      "test_per_bin": split.test_per_bin.tolist()},
            "shot_bins": dict(data.shot_bins), "shot_test_rows": shot_rows,
        },
        "methods": results,
    }


def run(common: CommonArgs, args: argparse.Namespace, *, print_fn: Callable[[str], None] = print) -> dict:
    """Train the MLP with each method on the CSV of ``args``; print the DIR tables; write ``tabular.json`` (and
    ``tabular.png`` unless ``--no-plots``) into ``common.out``; return the JSON document plus ``"artefacts"``
    (the written paths as strings).

    The JSON document: ``config`` (the flags, the methods' hyper-parameters, ``environment()``), ``data``
    (rows read / used / dropped, features, skipped columns, label statistics, bin edges, split sizes per
    bin, shot groups) and ``methods``: one record per method with ``name``, ``display``, ``backend`` (of the
    method's characteristic op) and ``backends`` (every op), ``metrics`` (:class:`DIRMetrics` keys, label
    units), ``train_seconds``, ``epoch_losses`` (standardised label units), ``noise_sigma`` (BMC / GAI / BNI,
    label units), ``per_bin_mae`` and ``error`` (None, or why the method has no metrics: it diverged, or
    smogn failed); RRT adds ``stage_one_seconds``, SMOGN ``smogn_train_rows``."""
    opts = _options(common, args)
    table = read_table(opts.csv, opts.target, opts.features, delimiter=opts.delimiter)
    print_fn(f"train tabular: {str(opts.csv)!r}, target {opts.target!r}, {len(table.features)} feature(s): "
             f"{', '.join(table.features)}")
    for note in table.notes:
        print_fn(f"  note: {note}")
    data = prepare(table, opts, common.seed, common.device)
    split, y_scaler = data.split, data.y_scaler
    shot_rows = {g: int(v) for g, v in _shot_counts(data, opts).items()}
    lo, hi = float(data.edges[0]), float(data.edges[-1])
    print_fn(f"  rows: {table.rows_read} read, {table.y.numel()} used; labels in [{lo:g}, {hi:g}]; balanced "
             f"split over {data.edges.numel() - 1} label bins: {split.train.numel()} train, {split.test.numel()} "
             f"test rows (up to {split.per_bin_target} per bin); test rows many / medium / few-shot: "
             f"{shot_rows['many']} / {shot_rows['medium']} / {shot_rows['few']}")
    z = lambda v: (v - float(y_scaler.mean)) / float(y_scaler.std)  # noqa: E731
    distinct = torch.unique(data.z_train).numel()
    # the methods see standardised labels: sigma in units of the training labels' standard deviation
    sigma = DEFAULT_NOISE_SHARE if opts.init_noise_sigma is None else opts.init_noise_sigma / float(y_scaler.std)
    cfg = M.MethodConfig(lr=opts.lr, bins=opts.method_bins, label_range=(z(lo), z(hi)), init_noise_sigma=sigma,
                         gmm_components=min(M.MethodConfig.gmm_components, distinct))
    try:
        priors = M.fit_priors(data.z_train, None, cfg, methods=opts.methods, seed=common.seed)
    except ValueError as exc:
        raise SystemExit(f"--target {opts.target!r}: the methods cannot fit their label statistics on the "
                         f"{data.z_train.numel()} training labels: {exc}") from None
    trainer = _Trainer(data, opts, common, priors)
    print_fn(f"  model: MLP {len(table.features)}-{'-'.join(map(str, opts.hidden))}-1, Adam lr {opts.lr:g} "
             f"(cosine), {opts.epochs} epoch(s) of {trainer.steps_per_epoch} batch(es) of <= {opts.batch_size} "
             f"rows; seed {common.seed}; device {common.device}; backend {common.backend}")

    names = list(opts.methods) + ([SMOGN_NAME] if opts.smogn else [])
    results = []
    for name in trainer.progress(names, "methods"):
        record = trainer(name)
        if record["error"] is not None:
            print_fn(f"  {record['error']}; no metrics")
        results.append(record)
    print_fn("")
    print_fn(_tables(results))
    print_fn(f"errors in label units on the balanced test split; Many / Med. / Few: test rows whose label bin has "
             f"> {opts.many} / {opts.few}..{opts.many} / < {opts.few} training rows; backend: where the method's "
             f"library op ran")

    out = Path(common.out)
    path = write_json(out / JSON_NAME, _document(common, opts, data, cfg, shot_rows, results))
    doc = json.loads(path.read_text())           # what was written: strict JSON, NaN as null
    artefacts = [path]
    if common.plots:
        artefacts.append(_figure(out / FIGURE_NAME, data, results, opts.target))
    return {**doc, "artefacts": [str(p) for p in artefacts]}


def _shot_counts(data: Prepared, opts: Options) -> dict:
    """Test rows in each shot group (``all``, ``many``, ``medium``, ``few``)."""
    metric = data.metric(opts)
    metric.update(data.y_test, data.y_test)
    values = metric.compute()
    return {g: values[f"{g}/count"] for _, g in _GROUPS}
