"""Host and device helpers shared by the Triton kernel families (Balanced MSE, weighted losses, FDS).

Installed as ``imbreg_fast.triton_kernels.common``. Holds what every family needs once:

- the reduction codes as ``tl.constexpr`` (``NONE``, ``MEAN``, ``SUM``, ``WEIGHTED_MEAN``; the numbers of
  ``imbreg_fast._reduction``, i.e. torch's own plus one), usable in kernels and in host code alike;
- ``reduction_scale``: the weight a reduction gives each element of the summed loss (1/count for 'mean',
  1/sum of weights for 'weighted_mean', 1 otherwise), read from the device, so no host sync;
- ``finalize_kernel`` / ``finalize``: the deterministic second stage of a reduction: one program adds the
  per-program partial sums of one or two buffers in a fixed order (no atomics) and applies the scale;
- the accumulation dtype (``compute_dtype`` for torch buffers, ``acc_dtype`` for kernels) and the CUDA
  device guard of the launchers;
- the in-kernel value checks (``check_finite``): ``flag_non_finite`` ORs a bit into an int32 flag when a
  kept value is NaN / inf, and ``raise_flagged`` turns the flag into the ValueError naming the argument (CPU
  tensors, i.e. the interpreter) or an asynchronous device-side assert (CUDA: no host sync);
- ``MAX_DIM``, the largest target dimension of the Balanced MSE kernels (one register accumulator per
  dimension). ``imbreg_fast.ops`` keeps a copy it can read without importing Triton.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import _reduction
from .._validation import compute_dtype

__all__ = ["NONE", "MEAN", "SUM", "WEIGHTED_MEAN", "MAX_DIM", "FINALIZE_BLOCK", "compute_dtype", "acc_dtype",
           "device_guard", "reduction_scale", "finalize_kernel", "finalize", "flag_non_finite", "flag_where",
           "flag_bits", "new_flag", "raise_flagged", "non_finite_message"]

# Kernels compare REDUCTION with these names; on the host `reduction == MEAN` gives a truthy or falsy
# tl.constexpr: wrap it in bool() before storing it or passing it to a kernel.
NONE = tl.constexpr(_reduction.NONE)
MEAN = tl.constexpr(_reduction.MEAN)
SUM = tl.constexpr(_reduction.SUM)
WEIGHTED_MEAN = tl.constexpr(_reduction.WEIGHTED_MEAN)

MAX_DIM = 4
FINALIZE_BLOCK = 1024


def acc_dtype(dtype: torch.dtype):
    """Triton dtype the kernels accumulate in for inputs of ``dtype`` (fp64 for fp64, else fp32)."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current while launching (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def flag_bits(flag_ptr, bits):
    """OR the int32 ``bits`` of a block (one OR-reduction) into the int32 flag [], with one atomic per
    program, only when a bit is set."""
    hit = tl.reduce(bits, 0, _bitwise_or)
    tl.atomic_or(flag_ptr, hit, mask=hit != 0)


@triton.jit
def flag_where(flag_ptr, bad, BIT: tl.constexpr):
    """OR ``BIT`` into the int32 flag [] when any lane of the bool block ``bad`` is set (one atomic per
    program, only then: an OR does not depend on the order of the programs)."""
    hit = tl.max(bad.to(tl.int32), axis=0)
    tl.atomic_or(flag_ptr, hit * BIT, mask=hit != 0)


@triton.jit
def flag_non_finite(flag_ptr, x, BIT: tl.constexpr):
    """OR ``BIT`` into the int32 flag [] when a lane of ``x`` is NaN or +-inf (dropped lanes must hold 0)."""
    flag_where(flag_ptr, ~(tl.abs(x) < float("inf")), BIT)


def new_flag(ref: torch.Tensor) -> torch.Tensor:
    """The zeroed int32 [] flag of the value checks, on ``ref``'s device."""
    return torch.zeros((), dtype=torch.int32, device=ref.device)


def non_finite_message(name: str, masked: bool) -> str:
    """The wording of the Python value checks (imbreg_fast._validation.check_all_finite)."""
    return (f"{name} contains NaN or inf" + (" at kept positions" if masked else "")
            + " (pass check_finite=False to skip this check)")


def raise_flagged(flag: torch.Tensor, messages: list) -> None:
    """After kernels that ORed bit ``1 << i`` into ``flag`` for a bad value of kind i: raise
    ``ValueError(messages[i])`` for the lowest bit set. On CUDA the flag is not read (that would be a host
    sync per call): ``torch._assert_async`` makes a set flag an asynchronous device-side assert instead
    (docs/methods.md §1.8)."""
    if flag.is_cuda:
        torch._assert_async(flag == 0, "imbreg_fast: " + " / ".join(messages))
        return
    bits = int(flag)
    for i, message in enumerate(messages):
        if bits >> i & 1:
            raise ValueError(message)


@triton.jit
def _denominator(denom_ptr, N, READ_DENOM: tl.constexpr, ACC: tl.constexpr):
    """Denominator of MEAN / WEIGHTED_MEAN in ACC: loaded from ``denom_ptr`` [] when READ_DENOM, else N."""
    if READ_DENOM:
        denom = tl.load(denom_ptr).to(ACC)
    else:
        denom = tl.full([], N, ACC)
    return denom


@triton.jit
def _inverse(denom):
    """1/denom, 0 where denom <= 0."""
    return tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)


@triton.jit
def reduction_scale(denom_ptr, N, REDUCTION: tl.constexpr, READ_DENOM: tl.constexpr, ACC: tl.constexpr):
    """Weight of one element in the reduced loss: 1/denom for MEAN and WEIGHTED_MEAN (denom: see
    _denominator; e.g. the kept count or the sum of kept weights), 0 when denom <= 0; 1 otherwise."""
    scale = tl.full([], 1.0, ACC)
    if REDUCTION == MEAN or REDUCTION == WEIGHTED_MEAN:
        scale = _inverse(_denominator(denom_ptr, N, READ_DENOM, ACC))
    return scale


@triton.jit
def _apply_denominator(total, denom, DIVIDE: tl.constexpr):
    """total / denom (DIVIDE: one rounding) or _inverse(denom) * total (the rounded scale the main
    kernels apply to the gradients); 0 where denom <= 0."""
    if DIVIDE:
        out = tl.where(denom > 0, total / tl.where(denom > 0, denom, 1.0), 0.0)
    else:
        out = _inverse(denom) * total
    return out


@triton.jit
def finalize_kernel(
    partial_ptr,     # [P] per-program partial sums (ACC)
    partial2_ptr,    # [P] second buffer of partial sums, reduced alike (read when TWO)
    denom_ptr,       # [] denominator of MEAN / WEIGHTED_MEAN (read when READ_DENOM, else N is used)
    out_ptr,         # [] reduced partial_ptr
    out2_ptr,        # [] reduced partial2_ptr (written when TWO)
    P, N,
    REDUCTION: tl.constexpr, READ_DENOM: tl.constexpr, TWO: tl.constexpr, DIVIDE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # BLOCK-wide strided accumulation, then one tree sum: a fixed order, the same every run.
    acc = tl.zeros([BLOCK], dtype=ACC)
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, P, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < P, other=0.0)
        if TWO:
            acc2 += tl.load(partial2_ptr + idx, mask=idx < P, other=0.0)
    total = tl.sum(acc, axis=0)
    total2 = tl.sum(acc2, axis=0)
    if REDUCTION == MEAN or REDUCTION == WEIGHTED_MEAN:
        denom = _denominator(denom_ptr, N, READ_DENOM, ACC)
        total = _apply_denominator(total, denom, DIVIDE)
        total2 = _apply_denominator(total2, denom, DIVIDE)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
    if TWO:
        tl.store(out2_ptr, total2.to(out2_ptr.dtype.element_ty))


def finalize(partial: torch.Tensor, denom: torch.Tensor, out: torch.Tensor, n: int, reduction: int,
             read_denom: bool, acc, *, partial2: torch.Tensor | None = None, out2: torch.Tensor | None = None,
             divide: bool = False) -> None:
    """Launch :func:`finalize_kernel`: ``out`` (and ``out2`` from ``partial2``) = the sum of the [P]
    partials scaled by the reduction (``denom`` [] on the device, read when ``read_denom``; else n)."""
    p = partial.shape[0]
    two = partial2 is not None
    block = min(FINALIZE_BLOCK, triton.next_power_of_2(max(p, 1)))
    finalize_kernel[(1,)](
        partial, partial2 if two else partial, denom, out, out2 if two else out, p, n,
        REDUCTION=reduction, READ_DENOM=bool(read_denom), TWO=two, DIVIDE=bool(divide), ACC=acc, BLOCK=block,
        num_warps=4)
