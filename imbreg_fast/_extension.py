"""Loading of the compiled C++ extension (operator schemas + one CPU kernel library).

The kernel library is chosen per CPU capability, the way PyTorch chooses its own kernels:
``torch.backends.cpu.get_cpu_capability()`` (which honours ``ATEN_CPU_CAPABILITY``), overridable with
``IMBREG_CPU_CAPABILITY=default|avx2|avx512``. Nothing is loaded until a C++ kernel is first needed or
:func:`imbreg_fast.available_backends` is called.
"""
from __future__ import annotations

import importlib
import os
import threading

import torch

__all__ = ["cpp_available", "cpp_error", "cpu_capability", "require_cpp"]

_CAPABILITY_ORDER = ("avx512", "avx2", "default")
_lock = threading.Lock()
_state: dict = {}

BUILD_HINT = (
    "Build it from a source checkout with `pip install --no-build-isolation -e .` "
    "(needs a C++17 compiler and ninja; `make build` does this in .venv), "
    "or use backend='torch'."
)


def _wanted_capability() -> str:
    forced = os.environ.get("IMBREG_CPU_CAPABILITY", "").strip().lower()
    if forced:
        if forced not in _CAPABILITY_ORDER:
            raise ValueError(f"IMBREG_CPU_CAPABILITY={forced!r}: choose among {list(_CAPABILITY_ORDER)}")
        return forced
    cap = torch.backends.cpu.get_cpu_capability().lower()
    # torch reports e.g. "AVX512", "AVX2", "DEFAULT", "NO AVX", "ZVECTOR", "SVE256"
    return cap if cap in _CAPABILITY_ORDER else "default"


def _load() -> dict:
    if _state:  # lock-free once loaded: torch.compile (fullgraph) cannot trace a `with lock:` block
        return _state
    with _lock:
        if _state:
            return _state
        try:
            importlib.import_module("imbreg_fast._C")
        except ImportError as exc:
            _state.update(ok=False, error=f"the C++ extension imbreg_fast._C is not built ({exc}). {BUILD_HINT}",
                          capability=None)
            return _state
        wanted = _wanted_capability()
        # Fall back to a lower capability when the wanted library was not built (e.g. an old compiler).
        candidates = _CAPABILITY_ORDER[_CAPABILITY_ORDER.index(wanted):]
        errors = []
        for cap in candidates:
            try:
                importlib.import_module(f"imbreg_fast._C_{cap}")
            except ImportError as exc:
                errors.append(f"_C_{cap}: {exc}")
                continue
            _state.update(ok=True, error=None, capability=cap)
            return _state
        _state.update(ok=False, capability=None,
                      error=f"no CPU kernel library of imbreg_fast could be loaded ({'; '.join(errors)}). {BUILD_HINT}")
        return _state


def cpp_available() -> bool:
    """True when the C++ extension and a CPU kernel library are loaded."""
    return _load()["ok"]


def cpp_error() -> str | None:
    """Why the C++ backend is unavailable (None when it is available)."""
    return _load()["error"]


def cpu_capability() -> str | None:
    """The CPU kernel library in use: 'avx512', 'avx2' or 'default' (None without the extension)."""
    return _load()["capability"]


def require_cpp() -> None:
    state = _load()
    if not state["ok"]:
        raise RuntimeError(f"imbreg_fast: backend 'cpp' requested but {state['error']}")
