"""The one dispatch rule of imbreg_fast.

Every public op names its implementations per backend with :func:`register`; the functional layer calls
:func:`resolve` once per call. The rule:

1. ``backend`` argument if not ``'auto'``, else the ``IMBREG_BACKEND`` environment variable if set, names
   the backend explicitly. An explicitly named backend that cannot run the op on these tensors raises
   ``RuntimeError`` with the reason; it is never replaced silently.
2. ``'auto'``: CUDA tensors -> ``triton`` (when triton is importable and the op has a Triton kernel), else
   ``torch``; CPU tensors -> ``cpp`` (when the extension is built and the op has a C++ kernel), else ``torch``.
   A backend whose kernel does not support this input (its ``supports`` predicate, e.g. Triton BMC for
   d > 4) is passed over by ``'auto'``; asked for explicitly, it raises ``ValueError`` saying why.
   Under ``TRITON_INTERPRET=1`` Triton kernels also run on CPU tensors, but only when asked for explicitly.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from . import _extension

__all__ = ["BACKENDS", "available_backends", "backend_info", "register", "resolve", "selected_backend",
           "unavailable_reason"]

BACKENDS = ("torch", "cpp", "triton")
_IMPLS: dict[str, dict[str, Callable]] = {}
_SUPPORTS: dict[tuple[str, str], Callable] = {}


def register(op: str, backend: str, supports: Callable | None = None):
    """Decorator: ``fn`` implements public op ``op`` on ``backend``.

    ``supports(tensor) -> None | str``: optional per-input check (None: supported, else why not)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        if supports is not None:
            _SUPPORTS[(op, backend)] = supports
        return fn

    return deco


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc}); install it with `pip install triton`"
    return None


def _triton_reason(device: torch.device | None) -> str | None:
    """None if Triton kernels can run on tensors of ``device`` (None: on some device), else why not."""
    err = _triton_import_error()
    if err is not None:
        return err
    if device is None:
        if torch.cuda.is_available() or interpreter_active():
            return None
        return "no CUDA device and TRITON_INTERPRET is not 1"
    if device.type == "cuda":
        return None
    if interpreter_active():
        return None
    return (f"Triton kernels need CUDA tensors (got {device.type}); on CPU they run only under the "
            "interpreter: set TRITON_INTERPRET=1 before triton is imported")


def _cpp_reason(device: torch.device | None) -> str | None:
    if not _extension.cpp_available():
        return _extension.cpp_error()
    if device is not None and device.type != "cpu":
        return f"the C++ kernels run on CPU tensors only (got {device.type})"
    return None


def _reason(backend: str, device: torch.device | None) -> str | None:
    if backend == "torch":
        return None
    if backend == "cpp":
        return _cpp_reason(device)
    return _triton_reason(device)


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """None if ``backend`` can run on tensors of ``device`` (None: on some device of this machine), else why
    not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _reason(backend, device)


def backend_info() -> dict[str, dict]:
    """Per backend: whether it can run here and why not; plus the C++ kernel library in use."""
    info = {}
    for name in BACKENDS:
        reason = _reason(name, None)
        info[name] = {"available": reason is None, "reason": reason,
                      "ops": sorted(op for op, impls in _IMPLS.items() if name in impls)}
    info["cpp"]["cpu_capability"] = _extension.cpu_capability()
    info["triton"]["interpreter"] = interpreter_active()
    return info


def available_backends() -> tuple[str, ...]:
    """The backends that can run on this machine, e.g. ``('torch', 'cpp')``."""
    return tuple(name for name in BACKENDS if _reason(name, None) is None)


def _requested(backend: str) -> str:
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    backend = backend.lower()
    if backend == "auto":
        backend = os.environ.get("IMBREG_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"IMBREG_BACKEND={backend!r}: choose among {('auto',) + BACKENDS}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def resolve(op: str, tensor: torch.Tensor, backend: str = "auto") -> tuple[str, Callable]:
    """(backend name, implementation) for public op ``op`` on ``tensor``'s device."""
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"unknown op {op!r}")
    requested = _requested(backend)
    device = tensor.device
    if requested != "auto":
        if requested not in impls:
            raise RuntimeError(f"imbreg_fast: backend {requested!r} requested but op {op!r} has no "
                               f"{requested} implementation (it has: {sorted(impls)})")
        reason = _reason(requested, device)
        if reason is not None:
            raise RuntimeError(f"imbreg_fast: backend {requested!r} requested for {op} but {reason}")
        unsupported = _unsupported(op, requested, tensor)
        if unsupported is not None:
            raise ValueError(f"imbreg_fast: backend {requested!r} cannot run {op} on this input: {unsupported}")
        return requested, impls[requested]
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in order:
        if name in impls and _reason(name, device) is None and _unsupported(op, name, tensor) is None:
            return name, impls[name]
    raise RuntimeError(f"imbreg_fast: no backend can run {op} on {device}")


def _unsupported(op: str, backend: str, tensor: torch.Tensor) -> str | None:
    supports = _SUPPORTS.get((op, backend))
    return None if supports is None else supports(tensor)


def selected_backend(tensor: torch.Tensor, op: str = "bmc_loss", backend: str = "auto") -> str:
    """The backend dispatch picks for ``op`` on ``tensor`` (what would run), e.g. ``'cpp'``."""
    return resolve(op, tensor, backend)[0]
