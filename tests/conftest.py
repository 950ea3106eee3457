"""Shared test configuration.

- ``requires_triton``: Triton tests; they run only when Triton kernels can run here (CUDA, or
  TRITON_INTERPRET=1 set before triton is imported). ``make test`` runs them in a separate pytest
  invocation with TRITON_INTERPRET=1.
- ``requires_cpp``: needs the compiled extension.
- ``slow``: large problems, excluded by default (``-m slow`` to run them).
"""
import os

import pytest
import torch

import imbreg_fast
from imbreg_fast import _dispatch

TRITON_OK = _dispatch._triton_reason(None) is None
CPP_OK = "cpp" in imbreg_fast.available_backends()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "requires_triton" in item.keywords and not TRITON_OK:
            item.add_marker(pytest.mark.skip(reason="Triton cannot run here (no CUDA, TRITON_INTERPRET!=1)"))
        if "requires_cpp" in item.keywords and not CPP_OK:
            item.add_marker(pytest.mark.skip(reason="C++ extension not built"))


@pytest.fixture
def triton_device():
    """Device for Triton tests: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def fused_backends():
    """Backends other than the oracle that can run on CPU tensors in this pytest process."""
    out = []
    if CPP_OK:
        out.append("cpp")
    if TRITON_OK and os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    return out
