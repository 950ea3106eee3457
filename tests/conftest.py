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


def op_kernel_registered(qualname: str, dispatch_key: str = "CPU") -> bool:
    """Is a kernel registered for C++ op ``qualname`` (e.g. 'imbreg_fast::bmc_fwd') on ``dispatch_key``?"""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:  # op schema not defined
        return False


def backend_params(op: str, cpp_ops=(), include_torch: bool = True):
    """pytest params over the backends of public op ``op`` (e.g. 'bmc_loss'): 'torch', then each fused
    backend of :func:`fused_backends`, marked ``requires_cpp`` / ``requires_triton``.

    ``cpp_ops``: the C++ ops the cpp implementation calls; while their CPU kernels are not registered the
    cpp param is skipped (reported, not hidden). A fused backend with no implementation of ``op`` is skipped
    the same way. Use as ``@pytest.mark.parametrize("backend", backend_params("bmc_loss", ("imbreg_fast::bmc_fwd",)))``.
    """
    params = [pytest.param("torch", id="torch")] if include_torch else []
    for name in fused_backends():
        marks = [pytest.mark.requires_cpp if name == "cpp" else pytest.mark.requires_triton]
        if name not in _dispatch._IMPLS.get(op, {}):
            marks.append(pytest.mark.skip(reason=f"no {name} implementation of {op} registered"))
        elif name == "cpp":
            missing = [q for q in cpp_ops if not op_kernel_registered(q)]
            if missing:
                marks.append(pytest.mark.skip(reason=f"C++ CPU kernel not registered: {', '.join(missing)}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def interpreted(backend: str) -> bool:
    """True for the Triton backend running under the (slow) interpreter: keep such problems tiny."""
    return backend == "triton" and not torch.cuda.is_available()


def assert_compiled_step_matches_eager(step, make_model, compile_backend: str) -> None:
    """``step(model) -> loss`` run eagerly and under ``torch.compile(fullgraph=True, backend=compile_backend)``
    on fresh models from ``make_model()`` (same seed): equal losses and parameter gradients."""
    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compile_backend)):
        torch.manual_seed(0)
        model = make_model()
        loss = fn(model)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (eager_loss, eager_grads), (comp_loss, comp_grads) = results
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        assert a is not None
        torch.testing.assert_close(a, b)
