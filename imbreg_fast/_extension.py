"""Loading of the compiled C++ extension: the operator schemas (``imbreg_fast._C``) and ONE CPU kernel library
(``imbreg_fast._C_default`` / ``_C_avx2`` / ``_C_avx512``).

:func:`load` is called once, when ``imbreg_fast`` is imported (by :mod:`imbreg_fast.ops`, which then
registers the C++ backend only if it succeeded). It never raises: when the extension cannot be used, the
``cpp`` backend is unavailable and :func:`cpp_error` says why (``backend='cpp'`` then raises with that
reason; ``'auto'`` uses the torch backend). Reasons:

- not built (a pure-Python install, ``IMBREG_SKIP_EXT=1``);
- a stale build: the libraries record the sources (a hash of ``csrc/``) and the torch version they were
  built from (:mod:`imbreg_fast._build_id`); a library built for another torch, or in a source checkout from
  other sources than the current ``csrc/``, is refused with "rebuild with `make build`" (and a warning);
- no kernel library for this CPU.

The kernel library is chosen the way PyTorch chooses its own kernels: ``torch.backends.cpu.get_cpu_capability()``
(which honours ``ATEN_CPU_CAPABILITY``), overridable with ``IMBREG_CPU_CAPABILITY=default|avx2|avx512``. A
capability the CPU does not have (e.g. ``avx512`` forced on an AVX2-only CPU, which would die of SIGILL) is
never loaded: the best one the CPU supports is used instead, with a warning (likewise for an unknown value).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _build_id

__all__ = ["cpp_available", "cpp_error", "cpu_capability", "load"]

CAPABILITIES = ("avx512", "avx2", "default")   # best first
REBUILD_HINT = "rebuild it with `make build` (or `pip install --no-build-isolation -e .`)"
BUILD_HINT = ("Build it from a source checkout with `pip install --no-build-isolation -e .` (needs a C++17 "
              "compiler and ninja; `make build` does this in .venv), or use backend='torch'.")

_state: dict = {}
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def supported_capabilities() -> tuple[str, ...]:
    """The kernel libraries this CPU can run, best first (from the CPU's own feature flags)."""
    caps = []
    if torch.cpu._is_avx512_supported():
        caps.append("avx512")
    if torch.cpu._is_avx2_supported():
        caps.append("avx2")
    return tuple(caps) + ("default",)


def _wanted_capability() -> str:
    supported = supported_capabilities()
    forced = os.environ.get("IMBREG_CPU_CAPABILITY", "").strip().lower()
    if forced:
        if forced not in CAPABILITIES:
            warnings.warn(f"IMBREG_CPU_CAPABILITY={forced!r} is not one of {list(CAPABILITIES)}; ignored "
                          f"(loading the {supported[0]} kernels)", RuntimeWarning, stacklevel=4)
            return supported[0]
        if forced not in supported:
            warnings.warn(f"IMBREG_CPU_CAPABILITY={forced!r}, but this CPU does not support {forced} "
                          f"(it supports {', '.join(supported)}); loading the {supported[0]} kernels instead",
                          RuntimeWarning, stacklevel=4)
            return supported[0]
        return forced
    cap = torch.backends.cpu.get_cpu_capability().lower()
    # torch reports e.g. "AVX512", "AVX2", "DEFAULT", "NO AVX", "ZVECTOR", "SVE256"
    return cap if cap in supported else "default"


def _current_source_id() -> str | None:
    """The id of this checkout's csrc/ (None in an installed package, which has no sources to drift from)."""
    return _build_id.source_id(_CSRC) if os.path.isdir(_CSRC) else None


def _stale_reason(module, current: str | None) -> str | None:
    """Why a loaded library may not be used (built for another torch, or from other sources than
    ``current``), or None."""
    built_torch = getattr(module, "TORCH_VERSION", None)
    built_source = getattr(module, "SOURCE_ID", None)
    if built_torch is None or built_source is None:
        return f"{module.__name__} has no build id (built by an older setup.py)"
    if built_torch != torch.__version__:
        return f"{module.__name__} was built for torch {built_torch}, but torch {torch.__version__} is running"
    if current is not None:
        if built_source != current:
            return (f"{module.__name__} was built from other sources (build id {built_source}) than this "
                    f"checkout's csrc/ (id {current})")
    return None


def _try_load() -> tuple[str | None, str | None, bool]:
    """(capability loaded or None, why not, whether the reason deserves a warning: a stale build)."""
    try:
        schemas = importlib.import_module("imbreg_fast._C")
    except ImportError as exc:
        return None, f"the C++ extension imbreg_fast._C is not built ({exc}). {BUILD_HINT}", False
    current = _current_source_id()
    stale = _stale_reason(schemas, current)
    if stale is not None:
        return None, f"the compiled extension is stale: {stale}; {REBUILD_HINT}", True
    wanted = _wanted_capability()
    # A lower capability stands in when the wanted library was not built (e.g. an old compiler).
    errors = []
    for cap in CAPABILITIES[CAPABILITIES.index(wanted):]:
        try:
            kernels = importlib.import_module(f"imbreg_fast._C_{cap}")
        except ImportError as exc:
            errors.append(f"_C_{cap}: {exc}")
            continue
        stale = _stale_reason(kernels, current)
        if stale is None and kernels.SOURCE_ID != schemas.SOURCE_ID:
            stale = f"{kernels.__name__} and imbreg_fast._C come from different builds"
        if stale is not None:
            return None, f"the compiled extension is stale: {stale}; {REBUILD_HINT}", True
        return cap, None, False
    return None, f"no CPU kernel library of imbreg_fast could be loaded ({'; '.join(errors)}). {BUILD_HINT}", False


def load() -> bool:
    """Load the extension (once; later calls return the first result): True when the C++ backend can run."""
    if not _state:
        capability, error, warn = _try_load()
        if warn:
            warnings.warn(f"imbreg_fast: {error}. The C++ backend is disabled until then.", RuntimeWarning,
                          stacklevel=2)
        _state.update(ok=capability is not None, error=error, capability=capability)
    return _state["ok"]


def cpp_available() -> bool:
    """True when the C++ extension and a CPU kernel library are loaded."""
    return load()


def cpp_error() -> str | None:
    """Why the C++ backend is unavailable (None when it is available)."""
    load()
    return _state["error"]


def cpu_capability() -> str | None:
    """The CPU kernel library in use: 'avx512', 'avx2' or 'default' (None without the extension)."""
    load()
    return _state["capability"]
