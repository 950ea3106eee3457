"""Global statistics over ``torch.distributed``: the collectives every distributed-aware feature uses
(docs/methods.md §7).

Every feature that computes a statistic of the training data takes two keyword-only arguments:

- ``sync`` (default ``False``): combine the statistic over the processes of ``process_group``, so that it is
  the statistic of the concatenated data of every process (rank order) and the same on every process.
  ``False`` is exactly the single-process behaviour.
- ``process_group`` (default ``None``: the default group). Used only with ``sync=True``.

``sync=True`` when ``torch.distributed`` is not available or not initialised, or when the group has one
process, is a world of one: nothing is communicated and the result is the single-process one. Nothing here
initialises ``torch.distributed``; start it as usual (``torchrun`` + ``init_process_group``).

Every process of the group must make the same synchronised calls in the same order (they are collectives).
Each synchronised call first checks its inputs locally and then exchanges one small table
(:func:`agreement`): when the check failed on one process, that process raises its own error and every other
process raises ``RuntimeError`` naming it, instead of waiting forever in the next collective; when the
processes disagree on a setting that must be equal (bins, dimensions, dtypes), every process raises
``ValueError``.

Helpers (usable on their own, all through ``torch.distributed`` collectives only):

- :func:`sync_group`: the group to communicate over, or ``None`` for a world of one;
- :func:`rank`, :func:`world_size`;
- :func:`all_reduce`: float64 element-wise SUM / MIN / MAX over the processes; :func:`min_max`: the range of
  values over the processes (one all-reduce);
- :func:`all_gather`: every process's tensor, sizes along dim 0 may differ (an exchange of the sizes, then
  one all_gather padded to the largest);
- :func:`agreement`, :func:`fingerprint`: the consistency exchange described above.

Device: tensors are communicated where the backend wants them (CUDA for NCCL, the CPU for gloo, their own
device otherwise) and the results come back on the input's device.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["REDUCE_OPS", "Agreement", "agreement", "all_gather", "all_reduce", "fingerprint", "min_max", "rank",
           "sync_group", "world_size"]

REDUCE_OPS = ("sum", "min", "max")

# The agreement table: one row of 1 + 8 + 3 int64 per process, [status, signature..., shared...].
_SIGNATURE_SLOTS = 8
_SHARED_SLOTS = 3
_OK, _FAILED = 0, 1


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


def sync_group(sync: bool, process_group=None):
    """The process group to synchronise over, or ``None`` when there is nothing to synchronise: ``sync`` is
    False, ``torch.distributed`` is not available or not initialised, or the group has one process.

    ``process_group=None`` means the default group. Raises ``ValueError`` if this process is not a member of
    ``process_group``.
    """
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
    if not sync or not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")
    return None if dist.get_world_size(group) == 1 else group


def rank(process_group=None) -> int:
    """This process's rank in ``process_group`` (default group if None); 0 when torch.distributed is not
    initialised."""
    group = sync_group(True, process_group)
    return 0 if group is None else dist.get_rank(group)


def world_size(process_group=None) -> int:
    """The number of processes of ``process_group`` (default group if None); 1 when torch.distributed is not
    initialised."""
    group = sync_group(True, process_group)
    return 1 if group is None else dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the group's collectives take a tensor of ``device``: CUDA for NCCL, the CPU for gloo, the
    tensor's own device for other (and mixed, e.g. ``'cpu:gloo,cuda:nccl'``) backends."""
    backend = dist.get_backend(group)
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device


# --------------------------------------------------------------------------------------------------
# Agreement: the status / consistency exchange every synchronised call starts with
# --------------------------------------------------------------------------------------------------


class Agreement:
    """The local check of a synchronised call and the one exchange that follows it (see :func:`agreement`).

    Inside the ``with`` block, set ``signature`` (a dict name -> int, at most 8 entries: values that must be
    equal on every process) and ``shared`` (a tuple of at most 3 ints that may differ, e.g. a local row count).
    After the block, ``table`` is the int64 ``[world_size, 3]`` table of every process's ``shared`` values
    (rank order), ``None`` for a world of one.
    """

    def __init__(self, group, what: str, device: Optional[torch.device] = None):
        self.group, self.what = group, what
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.signature: dict = {}
        self.shared: Sequence[int] = ()
        self.table: Optional[torch.Tensor] = None

    def __enter__(self) -> "Agreement":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.group is None:
            return False
        if exc is not None:
            self._exchange(_FAILED)
            return False                        # this process raises its own error
        names = list(self.signature)
        if len(names) > _SIGNATURE_SLOTS or len(self.shared) > _SHARED_SLOTS:
            raise ValueError(f"{self.what}: agreement holds at most {_SIGNATURE_SLOTS} signature and "
                             f"{_SHARED_SLOTS} shared values")
        rows = self._exchange(_OK, [int(self.signature[n]) for n in names], [int(v) for v in self.shared])
        failed = [r for r, row in enumerate(rows) if row[0] != _OK]
        if failed:
            raise RuntimeError(f"{self.what}: the input check failed on rank(s) {failed} of the process group "
                               "(their error says why); raised here too, so that no process waits forever in "
                               "the collectives that would follow")
        for i, name in enumerate(names):
            values = [row[1 + i] for row in rows]
            if len(set(values)) > 1:
                raise ValueError(f"{self.what}: the processes disagree on {name} (rank order: {values}); every "
                                 "process must make this call with the same setting")
        self.table = torch.tensor([row[1 + _SIGNATURE_SLOTS:] for row in rows], dtype=torch.int64)
        return False

    def _exchange(self, status: int, signature: Sequence[int] = (), shared: Sequence[int] = ()) -> list:
        row = [status] + list(signature) + [0] * (_SIGNATURE_SLOTS - len(signature))
        row += list(shared) + [0] * (_SHARED_SLOTS - len(shared))
        device = _comm_device(self.group, self.device)
        mine = torch.tensor(row, dtype=torch.int64, device=device)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, mine, group=self.group)
        return torch.stack(rows).tolist()


def agreement(group, what: str, device: Optional[torch.device] = None) -> Agreement:
    """Context manager around the local input checks of a synchronised call ``what``.

    ``group``: a group from :func:`sync_group`, or ``None`` (then it does nothing). On leaving the block every
    process contributes one row to an all_gather of ``[status, signature, shared]`` (12 int64 per process):

    - the block raised here: this process re-raises its error after the exchange;
    - it raised on another process: ``RuntimeError`` naming the failed ranks;
    - the ``signature`` values differ between processes: ``ValueError`` naming the setting;
    - otherwise the shared values are in ``.table``.

    ``device``: where to build the exchanged row (default CPU; moved to CUDA for NCCL).
    """
    return Agreement(group, what, device)


def fingerprint(*values) -> int:
    """A 32-bit checksum of tensors / numbers / strings / None, for :class:`Agreement` signatures (e.g. bin
    edges that must be equal on every process). Tensors are hashed as their float64 CPU bytes."""
    crc = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu", torch.float64).contiguous().reshape(-1)
            data = bytes(t.view(torch.uint8).tolist()) + repr(tuple(v.shape)).encode()
        else:
            data = repr(v).encode()
        crc = zlib.crc32(data, crc)
    return crc


# --------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------


def all_reduce(tensor: torch.Tensor, op: str = "sum", process_group=None) -> torch.Tensor:
    """Element-wise ``'sum'``, ``'min'`` or ``'max'`` of ``tensor`` over the processes of ``process_group``, as
    a new float64 tensor on ``tensor``'s device (the input is not modified). Counts summed in float64 are
    exact up to 2^53. Every process gets the same bits. World of one: a float64 copy."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"tensor must hold real numbers, got {tensor.dtype}")
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
    group = sync_group(True, process_group)
    out = tensor.detach().to(torch.float64, copy=True)
    if group is None:
        return out
    buf = out.to(_comm_device(group, out.device)).contiguous()
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(buf, op=reduce_op, group=group)
    return buf.to(tensor.device)


def all_gather(tensor: torch.Tensor, process_group=None, *, sizes: Optional[Sequence[int]] = None
               ) -> list[torch.Tensor]:
    """Every process's ``tensor``, in rank order (a list of ``world_size`` tensors on ``tensor``'s device).

    The tensors may differ in size along dim 0 (e.g. the kept targets of each batch, an empty one included);
    the other dims and the dtype must be equal on every process. Two collectives: an all_gather of the sizes
    (:func:`agreement`, which also checks the dims and dtypes), then one all_gather of the tensors padded to
    the largest size. ``sizes``: every process's size along dim 0, when the caller already has them (from its
    own agreement): then only the second collective runs. No autograd: the results are constants.
    World of one: ``[tensor]``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 1:
        raise ValueError("tensor must have at least one dim (the one gathered along)")
    group = sync_group(True, process_group)
    if group is None:
        return [tensor]
    if sizes is None:
        with agreement(group, "all_gather", tensor.device) as agreed:
            agreed.signature = {"the shape after dim 0": fingerprint(tuple(tensor.shape[1:])),
                                "dtype": fingerprint(str(tensor.dtype))}
            agreed.shared = (tensor.shape[0],)
        sizes = agreed.table[:, 0].tolist()
    sizes = [int(s) for s in sizes]
    if len(sizes) != dist.get_world_size(group) or sizes[dist.get_rank(group)] != tensor.shape[0]:
        raise ValueError(f"sizes must hold every process's size along dim 0 (this one's is {tensor.shape[0]}), "
                         f"got {sizes}")
    largest = max(sizes)
    if largest == 0:
        return [tensor.detach()[0:0].clone() for _ in sizes]
    device = _comm_device(group, tensor.device)
    padded = tensor.detach().new_zeros((largest,) + tuple(tensor.shape[1:]), device=device)
    padded[:tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return [p[:s].to(tensor.device) for p, s in zip(parts, sizes)]


def value_range(x: torch.Tensor, group, empty: str) -> tuple[float, float]:
    """``(min, max)`` of ``x`` as Python floats: of the local values when ``group`` is None (no
    synchronisation), else over every process of ``group`` (:func:`min_max`). ``ValueError(empty)`` when ``x``
    holds no value (on any process)."""
    if group is None:
        if x.numel() == 0:
            raise ValueError(empty)
        return float(x.min()), float(x.max())
    extremes = min_max(x, group)
    if extremes is None:
        raise ValueError(empty)
    return extremes


def min_max(x: torch.Tensor, process_group=None) -> Optional[tuple[float, float]]:
    """``(min, max)`` of the values of ``x`` over every process of ``process_group`` as Python floats, or
    ``None`` when ``x`` is empty on every process. One all-reduce MAX of ``(-min, max)`` (an empty ``x``
    contributes ``-inf``); NaN propagates as in ``torch.min``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    x = x.detach()
    if x.numel():
        local = torch.stack([x.min(), x.max()]).to(torch.float64)
        local[0] = -local[0]
    else:
        local = torch.full((2,), -math.inf, dtype=torch.float64, device=x.device)
    neg_lo, hi = all_reduce(local, "max", process_group).tolist()
    return None if hi == -math.inf else (-neg_lo, hi)
