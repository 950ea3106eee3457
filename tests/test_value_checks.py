"""Value checks (``check_finite=True``, the default) on every backend: a NaN / +inf / -inf at the first, middle
or last element of any input raises the ValueError naming the argument; one in a masked-out row does not;
``check_finite=False`` lets it through.

On the fused backends the per-element checks run inside the kernels' own pass (a flag reduced with the
outputs; docs/methods.md §1.8); on the torch backend they are explicit passes. The Triton cases run in the
``TRITON_INTERPRET=1`` pass of ``make test`` (tiny shapes: the interpreter is slow).
"""
import math

import pytest
import torch

import imbreg_fast.functional as F
from conftest import CPP_OK

N = 12
BAD = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def _backends():
    out = [pytest.param("torch", id="torch")]
    out.append(pytest.param("cpp", id="cpp", marks=pytest.mark.requires_cpp))
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.requires_triton))
    return out


BACKENDS = _backends()


def _inputs(d, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    target = torch.rand(N, d, generator=g, dtype=dtype) * 4
    pred = target + 0.3 * torch.randn(N, d, generator=g, dtype=dtype)
    return pred.squeeze(-1) if d == 1 else pred, target.squeeze(-1) if d == 1 else target


def _gmm(d):
    w = torch.tensor([0.2, 0.3, 0.5])
    mu = torch.tensor([[0.5] * d, [2.0] * d, [3.5] * d])
    cov = torch.eye(d).expand(3, d, d) * 0.4
    return [w, mu, cov.contiguous()]


# case -> (d, builder of the keyword arguments, the per-element arguments the kernels check)
def _case(name):
    if name == "bmc":
        pred, target = _inputs(1)
        return dict(pred=pred, target=target), ("pred", "target")
    if name == "bmc_candidates":
        pred, target = _inputs(2)
        return dict(pred=pred, target=target, candidates=torch.rand(7, 2) * 4), ("pred", "target", "candidates")
    if name == "gai":
        pred, target = _inputs(2)
        return dict(pred=pred, target=target, gmm=_gmm(2)), ("pred", "target")
    if name == "bni":
        pred, target = _inputs(1)
        return (dict(pred=pred, target=target, bin_centers=torch.linspace(0, 4, 5), bin_weights=torch.full((5,), 0.2)),
                ("pred", "target"))
    if name == "weighted_mse":
        pred, target = _inputs(1)
        return dict(pred=pred, target=target, weight=torch.rand(N) + 0.5), ("pred", "target", "weight")
    if name == "focal_l1":
        pred, target = _inputs(1)
        return dict(pred=pred.reshape(3, 1, 2, 2), target=target.reshape(3, 1, 2, 2),
                    weight=torch.rand(3, 1, 2, 2) + 0.5), ("pred", "target", "weight")
    raise KeyError(name)


CASES = ["bmc", "bmc_candidates", "gai", "bni", "weighted_mse", "focal_l1"]


def _call(name, kw, backend, **extra):
    kw = dict(kw, **extra)
    if name.startswith("bmc"):
        return F.bmc_loss(kw.pop("pred"), kw.pop("target"), 0.5, backend=backend, **kw)
    if name == "gai":
        return F.gai_loss(kw.pop("pred"), kw.pop("target"), 0.5, kw.pop("gmm"), backend=backend, **kw)
    if name == "bni":
        return F.bni_loss(kw.pop("pred"), kw.pop("target"), 0.5, kw.pop("bin_centers"), kw.pop("bin_weights"),
                          backend=backend, **kw)
    fn = F.weighted_mse_loss if name == "weighted_mse" else F.weighted_focal_l1_loss
    return fn(kw.pop("pred"), kw.pop("target"), kw.pop("weight"), backend=backend, **kw)


def _with_bad(kw, arg, index, value):
    kw = dict(kw)
    x = kw[arg].clone()
    x.view(-1)[index] = value
    kw[arg] = x
    return kw


def _positions(x):
    return {"first": 0, "middle": x.numel() // 2, "last": x.numel() - 1}


def _element_cases():
    for name in CASES:
        _, args = _case(name)
        for arg in args:
            yield name, arg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,arg", list(_element_cases()))
def test_nan_at_first_middle_last_element_raises_naming_the_argument(name, arg, backend):
    kw, _ = _case(name)
    for where, index in _positions(kw[arg]).items():
        for label, value in BAD.items():
            if where != "middle" and label != "nan":
                continue   # +-inf at the middle element only: the interpreter pass is slow
            with pytest.raises(ValueError, match=rf"^{arg} contains NaN or inf \(pass check_finite=False"):
                _call(name, _with_bad(kw, arg, index, value), backend)
    # check_finite=False lets it through (the value is garbage, by the caller's choice)
    _call(name, _with_bad(kw, arg, 0, math.nan), backend, check_finite=False)


def _set_rows(x, n_rows, values_by_row):
    """x with every value of row i (x viewed as [n_rows, -1]) set to values_by_row[i]."""
    rows = x.clone().reshape(n_rows, -1)
    for i, v in values_by_row.items():
        rows[i] = v
    return rows.reshape(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_nan_in_a_masked_out_row_is_ignored_and_a_kept_one_is_named(name, backend):
    kw, args = _case(name)
    rows = [a for a in args if a != "candidates"]          # candidates have no mask
    shape = kw["pred"].shape[:1] if name in ("bmc_candidates", "gai") else kw["pred"].shape
    mask = torch.ones(shape, dtype=torch.bool)
    n_rows = mask.numel()
    dropped = [0, n_rows // 2, n_rows - 1]
    mask.view(-1)[dropped] = False
    dirty = dict(kw)
    for arg in rows:
        dirty[arg] = _set_rows(kw[arg], n_rows, dict(zip(dropped, BAD.values())))
    clean = _call(name, kw, backend, mask=mask, reduction="none", check_finite=False)
    got = _call(name, dirty, backend, mask=mask, reduction="none")          # check_finite=True: no error
    assert torch.equal(got, clean)
    # a NaN in a kept row is named, with "at kept positions"
    for arg in rows:
        bad = dict(dirty, **{arg: _set_rows(dirty[arg], n_rows, {1: math.nan})})
        with pytest.raises(ValueError, match=rf"^{arg} contains NaN or inf at kept positions"):
            _call(name, bad, backend, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_weight_raises_at_kept_elements_only(backend):
    kw, _ = _case("weighted_mse")
    bad = _with_bad(kw, "weight", N - 1, -0.5)
    with pytest.raises(ValueError, match=r"^weight must be >= 0$"):
        _call("weighted_mse", bad, backend)
    mask = torch.ones(N, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^weight must be >= 0 at kept elements"):
        _call("weighted_mse", bad, backend, mask=mask)
    mask[N - 1] = False
    _call("weighted_mse", bad, backend, mask=mask)
    _call("weighted_mse", bad, backend, check_finite=False)
    for i in (0, N // 2):
        with pytest.raises(ValueError, match=r"^weight must be >= 0$"):
            _call("weighted_mse", _with_bad(kw, "weight", i, -1e-30), backend)
    # -0.0 is a weight >= 0 (the C++ kernel's sign-bit flag must not raise for it): the loss of +0.0
    signed_zero = _with_bad(kw, "weight", N // 2, -0.0)
    assert torch.equal(_call("weighted_mse", signed_zero, backend, reduction="none"),
                       _call("weighted_mse", _with_bad(kw, "weight", N // 2, 0.0), backend, reduction="none"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_var_and_prior_parameters(backend):
    """sigma^2 and the GMM / bin parameters are checked on the host (K values) on every backend."""
    pred, target = _inputs(1)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match=r"^noise_var must be finite and > 0"):
            F.bni_loss(pred, target, torch.tensor(bad), torch.linspace(0, 4, 5), torch.full((5,), 0.2), backend=backend)
    centers, weights = torch.linspace(0, 4, 5), torch.full((5,), 0.2)
    for i in (0, 2, 4):
        with pytest.raises(ValueError, match=r"^bin_centers contain NaN or inf"):
            F.bni_loss(pred, target, 0.5, _with_bad(dict(c=centers), "c", i, math.inf)["c"], weights, backend=backend)
        with pytest.raises(ValueError, match=r"^bin_weights must be finite and >= 0"):
            F.bni_loss(pred, target, 0.5, centers, _with_bad(dict(w=weights), "w", i, math.nan)["w"], backend=backend)
    w, mu, cov = _gmm(1)
    for i in (0, 1, 2):
        with pytest.raises(ValueError, match=r"^gmm means contain NaN or inf"):
            F.gai_loss(pred, target, 0.5, (w, _with_bad(dict(m=mu), "m", i, -math.inf)["m"], cov), backend=backend)
        with pytest.raises(ValueError, match=r"^gmm weights must be finite and > 0"):
            F.gai_loss(pred, target, 0.5, (_with_bad(dict(w=w), "w", i, math.nan)["w"], mu, cov), backend=backend)
        with pytest.raises(ValueError, match=r"^gmm covariances must be finite"):
            F.gai_loss(pred, target, 0.5, (w, mu, _with_bad(dict(c=cov), "c", i, math.nan)["c"]), backend=backend)


@pytest.mark.requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_cpp_checks_in_other_dtypes_and_overflow_is_not_an_input_error(dtype):
    """fp64 and half inputs are checked alike; a finite pred - target that overflows fires the in-kernel
    flag, and the exact scan after it finds no bad input: no error."""
    pred, target = _inputs(1, dtype)
    with pytest.raises(ValueError, match=r"^target contains NaN"):
        F.weighted_l1_loss(pred, _with_bad(dict(t=target), "t", 5, math.nan)["t"], backend="cpp")
    with pytest.raises(ValueError, match=r"^pred contains NaN"):
        F.bni_loss(_with_bad(dict(p=pred), "p", 5, math.inf)["p"], target, 0.5, torch.linspace(0, 4, 5),
                   torch.full((5,), 0.2), backend="cpp")
    big = torch.finfo(dtype).max
    p, t = torch.full((N,), big, dtype=dtype), torch.full((N,), -big, dtype=dtype)
    loss = F.weighted_l1_loss(p, t, backend="cpp")   # |p - t| overflows: inf, not an input error
    assert torch.isinf(loss)


def test_fused_backends_check_inside_the_kernel(monkeypatch):
    """The fused backends make no separate isfinite pass over pred / target / weight / candidates."""
    if not CPP_OK:
        pytest.skip("C++ extension not built")
    from imbreg_fast import _validation as V
    import imbreg_fast.functional as fn

    def fail(*args, **kwargs):
        raise AssertionError("an explicit value-check pass ran on a fused backend")

    monkeypatch.setattr(V, "check_all_finite", fail)
    monkeypatch.setattr(fn, "_check_values", fail)
    for name in CASES:
        kw, args = _case(name)
        _call(name, kw, "cpp")
        for arg in args:
            with pytest.raises(ValueError, match=rf"^{arg} contains NaN"):
                _call(name, _with_bad(kw, arg, 1, math.nan), "cpp")


# --- RnC and RankSim: the checks before the kernel (no host sync on CUDA) ---------------------------------------

def _contrastive(name, bad=None, where=None, value=math.nan, backend="torch"):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(N, 5, generator=g)
    y = torch.randint(0, 6, (N,), generator=g).float()
    if bad == "features":
        f.view(-1)[where * (f.numel() - 1) // 2] = value
    elif bad is not None:
        y[where * (N - 1) // 2] = value
    if name == "rnc":
        return F.rnc_loss(f, y, backend=backend)
    return F.ranksim_loss(f, y, subsample=None, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("value", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("where", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("name,label", [("rnc", "labels"), ("ranksim", "targets")])
def test_contrastive_checks_name_the_argument(name, label, where, value, backend):
    with pytest.raises(ValueError, match=r"^features contains NaN or inf"):
        _contrastive(name, "features", where, BAD[value], backend)
    with pytest.raises(ValueError, match=rf"^{label} contains NaN or inf"):
        _contrastive(name, label, where, BAD[value], backend)
    assert torch.isfinite(_contrastive(name, backend=backend))


def test_contrastive_check_sums_first_and_an_overflowing_sum_is_not_an_error():
    """The CPU check reads one sum per argument; finite values whose sum overflows take the exact check and
    pass."""
    from imbreg_fast import _validation as V
    big = torch.full((4, 3), torch.finfo(torch.float32).max)
    V.check_all_finite_async("features", big)        # the sum is inf; every value is finite: no error
    big[3, 2] = math.nan
    with pytest.raises(ValueError, match=r"^features contains NaN"):
        V.check_all_finite_async("features", big)


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, to run the CUDA branch of the value checks here."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("finite", [True, False])
def test_cuda_checks_are_device_side_asserts_without_a_host_read(monkeypatch, finite):
    """On CUDA the checks of RnC / RankSim (and the subsample index bounds) never read a value on the host
    (docs/methods.md §1.8): they issue torch._assert_async on the condition, which is false exactly when a
    value is bad."""
    from imbreg_fast import _validation as V
    asserted = []

    def no_host_read(*args, **kwargs):
        raise AssertionError("a value check read a tensor on the host")

    monkeypatch.setattr(V, "any_true", no_host_read)
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg="": asserted.append((bool(cond), msg)))
    x = torch.randn(6, 3)
    if not finite:
        x[5, 2] = math.inf
    V.check_all_finite_async("features", x.as_subclass(_FakeCuda))
    index = torch.tensor([0, 5 if finite else 6])
    V.check_subsample_index(index.as_subclass(_FakeCuda), 6, index.device, True)
    assert [ok for ok, _ in asserted] == [finite, finite]
    assert "features contains NaN or inf" in asserted[0][1] and "outside [0, 6)" in asserted[1][1]


@pytest.mark.parametrize("name,args", [("rnc", ("features", "labels")), ("ranksim", ("features", "targets"))])
def test_rnc_and_ranksim_use_the_sync_free_check(monkeypatch, name, args):
    from imbreg_fast import _validation as V
    seen = []
    monkeypatch.setattr(V, "check_all_finite_async", lambda arg, x: seen.append(arg))
    monkeypatch.setattr(V, "check_all_finite", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sync check")))
    _contrastive(name)
    assert tuple(seen) == args


# --- The prior is validated once per tensor version (GAI's GMM, BNI's bins) -----------------------------------

def _count_prior_checks(monkeypatch):
    from imbreg_fast import _validation as V
    calls = []
    real = V.check_prior_weights
    monkeypatch.setattr(V, "check_prior_weights", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_prior_checked_once_until_modified_in_place(monkeypatch, backend):
    """A prior passed again unchanged is not re-validated (no per-call host reads); an in-place change (copy_,
    a module's load_state_dict) is, and a bad value then raises as on the first call."""
    import imbreg_fast.nn as N
    calls = _count_prior_checks(monkeypatch)
    pred, target = _inputs(1)
    gmm = _gmm(1)
    for _ in range(3):
        F.gai_loss(pred, target, 0.5, gmm, backend=backend)
    assert calls == ["gmm weights"]
    gmm[1].copy_(torch.tensor([[0.5], [math.nan], [3.5]]))
    with pytest.raises(ValueError, match="gmm means contain NaN"):
        F.gai_loss(pred, target, 0.5, gmm, backend=backend)
    centers, weights = torch.linspace(0, 4, 5), torch.full((5,), 0.2)
    for _ in range(3):
        F.bni_loss(pred, target, 0.5, centers, weights, backend=backend)
    assert calls.count("bin_weights") == 1
    weights[2] = -0.1
    with pytest.raises(ValueError, match="bin_weights must be finite and >= 0"):
        F.bni_loss(pred, target, 0.5, centers, weights, backend=backend)

    loss = N.GAILoss(_gmm(1), backend=backend)
    loss(pred, target)
    n0 = len(calls)
    loss(pred, target)
    assert len(calls) == n0
    state = loss.state_dict()
    state["gmm_covariances"] = torch.full_like(state["gmm_covariances"], -1.0)
    loss.load_state_dict(state)
    with pytest.raises(ValueError, match="gmm covariances must be symmetric positive definite"):
        loss(pred, target)


def test_prior_check_cache_is_keyed_on_live_objects():
    """New tensors (even at a freed one's address, with the same shape and version) are validated; the cache stays
    bounded."""
    from imbreg_fast import _validation as V
    pred, target = _inputs(1)
    for _ in range(2 * V._CHECKED_MAX):
        F.gai_loss(pred, target, 0.5, _gmm(1))
    assert len(V._CHECKED) <= V._CHECKED_MAX

    # a freed tensor's id reused by a new one with the same version: forced here by giving every tensor id 0
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(V, "id", lambda obj: 0, raising=False)
        good = torch.ones(3)
        V.check_once("t", (good,), lambda: calls.append(1))
        V.check_once("t", (good,), lambda: calls.append(1))
        assert calls == [1]
        del good
        V.check_once("t", (torch.ones(3),), lambda: calls.append(2))   # same "id", same version, new object
    assert calls == [1, 2]


def _mixture_loss(op, backend, prior, pred, target, **kw):
    """_call's gai / bni case with this prior: [weights, means, covariances] or [bin_centers, bin_weights]."""
    args = dict(gmm=prior) if op == "gai" else dict(bin_centers=prior[0], bin_weights=prior[1])
    return _call(op, dict(pred=pred, target=target, **args), backend, **kw)


def _mixture_prior(op):
    if op == "gai":
        return _gmm(1)
    return [torch.tensor([0.5, 1.5, 2.5, 3.5]), torch.tensor([0.1, 0.2, 0.3, 0.4])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["gai", "bni"])
def test_prior_values_read_on_every_call(op, backend):
    """What the losses derive from the prior is derived on every call: a write that does not bump the version
    counter (``.data``, a NumPy view, a c10d collective such as ``dist.broadcast`` into the prior) still shows in
    the next loss. (Only the prior's value checks are skipped for the same unmodified tensors.)"""
    pred, target = _inputs(1)
    prior = _mixture_prior(op)
    first = _mixture_loss(op, backend, prior, pred, target)
    moved = prior[1].flip(0) if op == "bni" else prior[1] + 0.25        # bin weights / gmm means
    prior[1].data.copy_(moved)                                            # no version bump
    fresh = _mixture_loss(op, backend, [t.clone() for t in prior], pred, target)
    got = _mixture_loss(op, backend, prior, pred, target)
    assert torch.equal(got, fresh) and not torch.equal(got, first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["gai", "bni"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_prior_of_inference_tensors(op, backend, check_finite):
    """A prior made under torch.inference_mode (inference tensors have no version counter): its checks run on
    every call, the loss is computed."""
    pred, target = _inputs(1)
    with torch.inference_mode():
        prior = _mixture_prior(op)
        expected = _mixture_loss(op, backend, [t.clone() for t in prior], pred, target)
        assert torch.equal(_mixture_loss(op, backend, prior, pred, target, check_finite=check_finite), expected)
        if check_finite:
            bad = [t.clone() for t in prior]
            weights = bad[0] if op == "gai" else bad[1]
            weights[0] = -weights[0]                                      # a negative weight
            with pytest.raises(ValueError, match="weights must be"):
                _mixture_loss(op, backend, bad, pred, target)


def test_meta_tensors_shape_inference():
    """Meta tensors (shape inference) have no values: the default value checks skip them, the losses give meta
    outputs of the right shape, and a prior on another device is still named."""
    def meta(*shape):
        return torch.empty(*shape, device="meta")
    p, y = meta(10), meta(10)
    gmm = (meta(2), meta(2), meta(2))
    calls = {
        "gai": lambda: F.gai_loss(p, y, 1.0, gmm, reduction="none"),
        "bni": lambda: F.bni_loss(p, y, meta(()), meta(5), meta(5)),
        "bmc": lambda: F.bmc_loss(p, y, 1.0),
        "weighted_mse": lambda: F.weighted_mse_loss(p, y, meta(10), reduction="weighted_mean"),
        "rnc": lambda: F.rnc_loss(meta(10, 4), y),
        "ranksim": lambda: F.ranksim_loss(meta(10, 4), y),
        "conr": lambda: F.conr_loss(meta(10, 4), y, p),
    }
    for name, call in calls.items():
        out = call()
        assert out.is_meta and tuple(out.shape) == ((10,) if name == "gai" else ()), name
    cpu_prior = (torch.tensor([0.3, 0.7]), torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="gmm weights is on cpu but pred is on meta"):
        F.gai_loss(p, y, 1.0, cpu_prior)
