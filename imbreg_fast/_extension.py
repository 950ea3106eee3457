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


def _stale_reason(module) -> str | None:
    """Why a loaded library may not be used (built for another torch or from other sources), or None."""
    built_torch = getattr(module, "TORCH_VERSION", None)
    built_source = getattr(module, "SOURCE_ID", None)
    if built_torch is None or built_source is None:
        return f"{module.__name__} has no build id (built by an older setup.py)"
    if built_torch != torch.__version__:
        return f"{module.__name__} was built for torch {built_torch}, but torch {torch.__version__} is running"
    if os.path.isdir(_CSRC):
        current = _build_id.source_id(_CSRC)
        if built_source != current:
            return (f"{module.__name__} was built from other sources (build id {built_source}) than this "
                    f"checkout's csrc/ (id {current})")
    return None


def _try_load() -> tuple[bool, str | None, str | None]:
    try:
        schemas = importlib.import_module("imbreg_fast._C")
    except ImportError as exc:
        return False, f"the C++ extension imbreg_fast._C is not built ({exc}). {BUILD_HINT}", None
    stale = _stale_reason(schemas)
    if stale is not None:
        return False, f"the compiled extension is stale: {stale}; {REBUILD_HINT}", None
    wanted = _wanted_capability()
    # A lower capability stands in when the wanted library was not built (e.g. an old compiler).
    errors = []
    for cap in CAPABILITIES[CAPABILITIES.index(wanted):]:
        try:
            kernels = importlib.import_module(f"imbreg_fast._C_{cap}")
        except ImportError as exc:
            errors.append(f"_C_{cap}: {exc}")
            continue
        stale = _stale_reason(kernels)
        if stale is None and kernels.SOURCE_ID != schemas.SOURCE_ID:
            stale = f"{kernels.__name__} and imbreg_fast._C come from different builds"
        if stale is not None:
            return False, f"the compiled extension is stale: {stale}; {REBUILD_HINT}", None
        return True, None, cap
    return False, f"no CPU kernel library of imbreg_fast could be loaded ({'; '.join(errors)}). {BUILD_HINT}", None


def load() -> bool:
    """Load the extension (once; later calls return the first result): True when the C++ backend can run."""
    if not _state:
        ok, error, capability = _try_load()
        if error is not None and "stale" in error:
            warnings.warn(f"imbreg_fast: {error}. The C++ backend is disabled until then.", RuntimeWarning,
                          stacklevel=2)
        _state.update(ok=ok, error=error, capability=capability)
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
