"""Reduction codes of every op, defined once for Python and Triton code.

``none`` / ``mean`` / ``sum`` are PyTorch's own numbers (``torch.nn._reduction.get_enum``, the same as
``at::Reduction`` in C++: csrc/cpu/common.h uses that enum); ``WEIGHTED_MEAN`` (sum w l / sum w, weighted
losses only) is our one extension, the next number (``at::Reduction::END`` in C++). :func:`reduce_rows` is
the one reduction of per-row losses in Python (the torch backend of the Balanced MSE losses, the multi-process
BMC path, and RankSim's torch backend and Triton launcher, whose kept rows are its mask).
"""
from __future__ import annotations

import torch
from torch.nn import _reduction

NONE: int = _reduction.get_enum("none")
MEAN: int = _reduction.get_enum("mean")
SUM: int = _reduction.get_enum("sum")
WEIGHTED_MEAN: int = max(NONE, MEAN, SUM) + 1

LOSS_REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}
WEIGHTED_LOSS_REDUCTIONS = {**LOSS_REDUCTIONS, "weighted_mean": WEIGHTED_MEAN}


def reduce_rows(loss_rows: torch.Tensor, mask, reduction: int) -> torch.Tensor:
    """loss_rows [N] -> 'none' [N] (0 on dropped rows), 'mean' over kept rows (0 if none), 'sum'.

    Rows are dropped with ``torch.where`` rather than boolean indexing, so the shapes do not depend on
    the mask's values and ``torch.compile(fullgraph=True)`` traces the masked case too."""
    if mask is not None:
        loss_rows = torch.where(mask, loss_rows, 0.0)
    if reduction == NONE:
        return loss_rows
    total = loss_rows.sum()
    if reduction == SUM:
        return total
    count = loss_rows.new_tensor(loss_rows.shape[0]) if mask is None else mask.sum()
    return total / count.clamp(min=1).to(total.dtype)
