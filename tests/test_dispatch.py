"""The dispatch rule (imbreg_fast/_dispatch.py): reports, 'auto', explicit backends, IMBREG_BACKEND."""
import os

import pytest
import torch

import imbreg_fast
import imbreg_fast.functional as F
from conftest import CPP_OK, TRITON_OK, op_kernel_registered
from imbreg_fast import _dispatch, _extension

LOSS_OPS = ("bmc_loss", "gai_loss", "bni_loss")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("IMBREG_BACKEND", raising=False)


def _bmc_inputs():
    return torch.randn(6), torch.randn(6)


def test_available_backends():
    avail = imbreg_fast.available_backends()
    assert isinstance(avail, tuple) and avail[0] == "torch"
    assert set(avail) <= set(imbreg_fast.BACKENDS) == {"torch", "cpp", "triton"}
    assert ("cpp" in avail) == _extension.cpp_available() == CPP_OK
    triton_expected = _dispatch._triton_import_error() is None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    assert ("triton" in avail) == triton_expected == TRITON_OK


def test_backend_info_report():
    info = imbreg_fast.backend_info()
    avail = imbreg_fast.available_backends()
    assert set(info) == {"torch", "cpp", "triton"}
    for name, entry in info.items():
        assert entry["available"] == (name in avail)
        if entry["available"]:
            assert entry["reason"] is None
        else:
            assert isinstance(entry["reason"], str) and entry["reason"]
        assert entry["ops"] == sorted(entry["ops"])
    assert set(LOSS_OPS) <= set(info["torch"]["ops"])
    assert info["cpp"]["cpu_capability"] == imbreg_fast.cpu_capability()
    if CPP_OK:
        assert info["cpp"]["cpu_capability"] in ("avx512", "avx2", "default")
        assert set(LOSS_OPS) <= set(info["cpp"]["ops"])
    else:
        assert info["cpp"]["cpu_capability"] is None
    assert info["triton"]["interpreter"] == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("op", LOSS_OPS)
def test_auto_picks_cpp_on_cpu_when_built_else_torch(op):
    x = torch.randn(4)
    expected = "cpp" if CPP_OK and "cpp" in _dispatch._IMPLS[op] else "torch"
    assert imbreg_fast.selected_backend(x, op) == expected
    assert imbreg_fast.selected_backend(x, op, backend="auto") == expected
    assert imbreg_fast.selected_backend(x, op, backend=None) == expected
    assert imbreg_fast.selected_backend(x, op, backend="torch") == "torch"
    assert imbreg_fast.selected_backend(x, op, backend="TORCH") == "torch"


def test_auto_falls_back_to_torch_without_the_extension(monkeypatch):
    monkeypatch.setattr(_extension, "cpp_available", lambda: False)
    monkeypatch.setattr(_extension, "cpp_error", lambda: "the C++ extension imbreg_fast._C is not built (test)")
    x = torch.randn(4)
    assert imbreg_fast.selected_backend(x, "bmc_loss") == "torch"
    assert "cpp" not in imbreg_fast.available_backends()
    info = imbreg_fast.backend_info()["cpp"]
    assert not info["available"] and "not built" in info["reason"]
    # ... but an explicit request is never replaced silently
    with pytest.raises(RuntimeError, match=r"backend 'cpp' requested.*not built"):
        imbreg_fast.selected_backend(x, "bmc_loss", backend="cpp")
    with pytest.raises(RuntimeError, match="not built"):
        F.bmc_loss(*_bmc_inputs(), 1.0, backend="cpp")


@pytest.mark.skipif(TRITON_OK, reason="Triton can run here")
def test_explicit_triton_without_interpreter_raises_with_reason():
    for op in LOSS_OPS:
        with pytest.raises(RuntimeError, match="triton") as exc:
            imbreg_fast.selected_backend(torch.randn(4), op, backend="triton")
        msg = str(exc.value)
        assert "TRITON_INTERPRET" in msg or "no triton implementation" in msg, msg
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        F.bmc_loss(*_bmc_inputs(), 1.0, backend="triton")


@pytest.mark.skipif(TRITON_OK, reason="Triton can run here")
def test_triton_reason_names_the_interpreter(monkeypatch):
    """Whatever ops have Triton kernels: the reason for a CPU tensor names TRITON_INTERPRET."""
    monkeypatch.setitem(_dispatch._IMPLS, "_probe_op", {"torch": lambda: None, "triton": lambda: None})
    with pytest.raises(RuntimeError, match=r"backend 'triton' requested for _probe_op but .*TRITON_INTERPRET=1"):
        _dispatch.resolve("_probe_op", torch.randn(2), "triton")
    assert _dispatch.resolve("_probe_op", torch.randn(2), "auto")[0] == "torch"


def test_op_without_implementation_on_requested_backend(monkeypatch):
    monkeypatch.setitem(_dispatch._IMPLS, "_probe_op", {"torch": lambda: None})
    with pytest.raises(RuntimeError, match=r"no cpp implementation"):
        _dispatch.resolve("_probe_op", torch.randn(2), "cpp")


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
def test_cpp_rejects_non_cpu_tensors():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        imbreg_fast.selected_backend(torch.empty(3, device="meta"), "bmc_loss", backend="cpp")
    # auto on a non-CPU, non-CUDA device falls back to torch
    assert imbreg_fast.selected_backend(torch.empty(3, device="meta"), "bmc_loss") == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        F.bmc_loss(*_bmc_inputs(), 1.0, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string"):
        F.bmc_loss(*_bmc_inputs(), 1.0, backend=1)
    with pytest.raises(KeyError, match="unknown op"):
        imbreg_fast.selected_backend(torch.randn(2), "no_such_loss")
    with pytest.raises(ValueError, match="unknown backend"):
        _dispatch.register("bmc_loss", "cuda")


def test_env_override(monkeypatch):
    x = torch.randn(4)
    monkeypatch.setenv("IMBREG_BACKEND", " Torch ")
    assert imbreg_fast.selected_backend(x, "bmc_loss") == "torch"
    monkeypatch.setenv("IMBREG_BACKEND", "")
    assert imbreg_fast.selected_backend(x, "bmc_loss") == ("cpp" if CPP_OK else "torch")
    monkeypatch.setenv("IMBREG_BACKEND", "auto")
    assert imbreg_fast.selected_backend(x, "bmc_loss") == ("cpp" if CPP_OK else "torch")
    monkeypatch.setenv("IMBREG_BACKEND", "bogus")
    with pytest.raises(ValueError, match="IMBREG_BACKEND='bogus'"):
        F.bmc_loss(*_bmc_inputs(), 1.0)
    # an explicit backend argument wins over the environment
    assert imbreg_fast.selected_backend(x, "bmc_loss", backend="torch") == "torch"


@pytest.mark.skipif(TRITON_OK, reason="Triton can run here")
def test_env_override_to_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("IMBREG_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton"):
        F.bmc_loss(*_bmc_inputs(), 1.0)
    with pytest.raises(RuntimeError, match="triton"):
        imbreg_fast.nn.BMCLoss()(*_bmc_inputs())


@pytest.mark.skipif(not (CPP_OK and op_kernel_registered("imbreg_fast::bmc_fwd")), reason="C++ kernel not built")
def test_env_override_selects_the_backend_that_runs(monkeypatch):
    """The backend named by IMBREG_BACKEND is the one that runs: the C++ op is (not) called."""
    calls = []
    real = _dispatch._IMPLS["bmc_loss"]

    def spy(name):
        def impl(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return impl

    monkeypatch.setitem(_dispatch._IMPLS, "bmc_loss", {name: spy(name) for name in real})
    for env, expected in (("cpp", "cpp"), ("torch", "torch")):
        monkeypatch.setenv("IMBREG_BACKEND", env)
        calls.clear()
        F.bmc_loss(*_bmc_inputs(), 1.0)
        assert calls == [expected]
    monkeypatch.delenv("IMBREG_BACKEND")
    calls.clear()
    F.bmc_loss(*_bmc_inputs(), 1.0)
    assert calls == ["cpp"]


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
def test_cpp_and_torch_agree_through_auto():
    pred, target = _bmc_inputs()
    auto = F.bmc_loss(pred, target, 0.5)
    cpp = F.bmc_loss(pred, target, 0.5, backend="cpp")
    assert torch.equal(auto, cpp)
    torch.testing.assert_close(cpp, F.bmc_loss(pred, target, 0.5, backend="torch"))


@pytest.mark.requires_cpp
def test_auto_passes_over_a_backend_that_does_not_support_the_input(monkeypatch):
    """A backend whose ``supports`` predicate rejects the input is skipped by 'auto' and raises a
    ValueError with the reason when asked for explicitly (e.g. Triton BMC with d > 4 on CUDA)."""
    monkeypatch.setattr(_dispatch, "_IMPLS", dict(_dispatch._IMPLS))
    monkeypatch.setattr(_dispatch, "_SUPPORTS", dict(_dispatch._SUPPORTS))
    monkeypatch.delenv("IMBREG_BACKEND", raising=False)
    _dispatch.register("_probe_op", "torch")(lambda: "torch")
    _dispatch.register("_probe_op", "cpp", supports=lambda t: None if t.shape[1] <= 4 else "d > 4")(lambda: "cpp")
    assert _dispatch.selected_backend(torch.zeros(3, 4), "_probe_op") == "cpp"
    assert _dispatch.selected_backend(torch.zeros(3, 5), "_probe_op") == "torch"
    with pytest.raises(ValueError, match="d > 4"):
        _dispatch.resolve("_probe_op", torch.zeros(3, 5), "cpp")
