"""Reduction codes of every op, defined once for Python and Triton code.

``none`` / ``mean`` / ``sum`` are PyTorch's own numbers (``torch.nn._reduction.get_enum``, the same as
``at::Reduction`` in C++: csrc/cpu/common.h uses that enum); ``WEIGHTED_MEAN`` (sum w l / sum w, weighted
losses only) is our one extension, the next number (``at::Reduction::END`` in C++).
"""
from __future__ import annotations

from torch.nn import _reduction

NONE: int = _reduction.get_enum("none")
MEAN: int = _reduction.get_enum("mean")
SUM: int = _reduction.get_enum("sum")
WEIGHTED_MEAN: int = max(NONE, MEAN, SUM) + 1

LOSS_REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}
WEIGHTED_LOSS_REDUCTIONS = {**LOSS_REDUCTIONS, "weighted_mean": WEIGHTED_MEAN}

