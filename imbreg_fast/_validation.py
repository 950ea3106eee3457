"""Argument checks of every public entry point: a clear ``TypeError``/``ValueError`` naming the argument.

Shape, dtype and device checks are free and always run. Value checks (finiteness, positivity,
normalisation) read tensor values, so they synchronise with the device; they run when
``check_finite=True`` (the default of every public entry point; see :func:`value_checks`), are skipped
while ``torch.compile`` traces (they would break the graph), and under ``torch.vmap`` they raise a
``ValueError`` asking for ``check_finite=False`` (vmap cannot read values).
"""
from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping
from typing import NamedTuple

import torch

from ._reduction import LOSS_REDUCTIONS

__all__ = ["ContrastBatch", "Rows", "any_true", "as_contrast_batch", "as_rows", "check_all_finite", "check_choice", "check_float_tensor", "check_int",
           "check_labels", "check_mask", "check_noise_var_value", "check_nonnegative", "check_pair",
           "check_positive", "check_prior_weights", "check_real", "check_real_tensor", "check_reduction",
           "check_same_device", "check_target_constant", "compute_dtype", "is_tracing", "noise_var_tensor",
           "refuse_batched", "value_checks", "ConRInputs", "check_conr_values", "conr_inputs"]


def is_tracing() -> bool:
    return torch.compiler.is_compiling()


def value_checks(check_finite: bool, like: torch.Tensor | None = None) -> bool:
    """Whether the value checks run: asked for, not while ``torch.compile`` traces, and not on meta tensors
    (``like``, the call's main input: shape inference has no values to check)."""
    return bool(check_finite) and not is_tracing() and not (like is not None and like.is_meta)


def any_true(flags: torch.Tensor) -> bool:
    """``bool(flags.any())`` — the one host read of every value check. Under ``torch.vmap`` (which cannot
    read values) it raises a ValueError that names the fix."""
    try:
        return bool(flags.any())
    except RuntimeError as exc:
        if "vmap" not in str(exc) and "data-dependent" not in str(exc):
            raise
        raise _vmap_error() from None


def _vmap_error() -> ValueError:
    return ValueError("check_finite=True reads tensor values, which torch.vmap does not allow: pass "
                      "check_finite=False under vmap (and validate the inputs outside it)")


def refuse_batched(*tensors) -> None:
    """The error :func:`any_true` gives under ``torch.vmap``, for value checks that run inside a fused kernel
    (which would otherwise run once per batch element through vmap's fallback): the same behaviour as the
    explicit checks."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t):
            raise _vmap_error()


# --------------------------------------------------------------------------------------------------
# Scalars and choices
# --------------------------------------------------------------------------------------------------


def published_gmm_form(x) -> str | None:
    """What ``x`` is, if it is the published BalancedMSE code's form of a GMM (the path of its joblib file, or
    its dict), else None: for the porting errors of ``gai_loss`` / ``GAILoss``."""
    if isinstance(x, (str, os.PathLike)):
        return f"a path ({os.fspath(x)!r})"
    if isinstance(x, Mapping):
        return f"a {type(x).__name__} with keys {sorted(map(str, x))}"
    return None


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` is a Python int (not a bool), >= ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_real(name: str, value) -> float:
    """``value`` is a finite real number (int or float, not a bool) -> float."""
    value = _number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_momentum(name: str, momentum) -> float | None:
    """An EMA momentum in [0, 1], or None (kept as None) -> float or None."""
    if momentum is None:
        return None
    momentum = check_real(name, momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or None, got {momentum}")
    return momentum


def check_clip(name: str, clip) -> tuple[float, float]:
    """``clip`` is a pair ``(lo, hi)`` of finite reals with ``0 < lo <= hi`` -> (float, float)."""
    try:
        lo, hi = clip
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lo, hi), got {clip!r}") from None
    lo, hi = check_real(f"{name}[0]", lo), check_real(f"{name}[1]", hi)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi, got ({lo}, {hi})")
    return lo, hi


def check_positive(name: str, value) -> float:
    value = _number(name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_nonnegative(name: str, value) -> float:
    value = _number(name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_choice(name: str, value, choices):
    """``value`` is one of ``choices`` (a sequence, or a dict whose keys are the choices)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_reduction(reduction, choices: dict = LOSS_REDUCTIONS) -> int:
    """The code of ``reduction`` (a string among ``choices``; codes in ``imbreg_fast._reduction``)."""
    if not isinstance(reduction, str) or reduction not in choices:
        raise ValueError(f"reduction must be one of {sorted(choices)}, got {reduction!r}")
    return choices[reduction]


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def check_float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def check_real_tensor(name: str, x) -> torch.Tensor:
    """A tensor of real numbers: floating or integer dtype (not bool, not complex)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold real numbers (a floating or integer dtype), got {x.dtype}")
    return x


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to the same device")


def check_mask(mask, shape: tuple, like: torch.Tensor, like_name: str, shape_name: str | None = None
               ) -> torch.Tensor | None:
    """``mask`` is None or a bool tensor of ``shape`` on ``like``'s device (errors name ``like_name``, or
    ``shape_name`` for the shape)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} for {shape_name or like_name} of shape {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")
    check_same_device(**{like_name: like, "mask": mask})
    return mask


def check_pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """pred and target: floating tensors of the same shape, dtype and device."""
    pred = check_float_tensor("pred", pred)
    target = check_float_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                         f"and target {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    check_same_device(pred=pred, target=target)
    return pred, target


def check_target_constant(**tensors) -> None:
    """The Balanced MSE losses treat targets (and candidate targets) as data: a tensor that requires grad
    while grad mode is on is refused, on every backend, rather than silently not differentiated."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad, but the Balanced MSE losses do not differentiate their "
                             f"{name} (labels are data): pass {name}.detach()")


def check_all_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise if ``x`` (restricted to rows kept by ``mask`` [N] when given, x being [N, ...]) has NaN/inf."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad.reshape(mask.shape[0], math.prod(bad.shape[1:])) & mask.reshape(-1, 1)   # N = 0 too
    if any_true(bad):
        raise ValueError(f"{name} contains NaN or inf" + (" at kept positions" if mask is not None else "")
                         + " (pass check_finite=False to skip this check)")


def check_all_finite_async(name: str, x: torch.Tensor) -> None:
    """:func:`check_all_finite` without a host sync on CUDA: an asynchronous device-side assert there
    (``torch._assert_async``, the policy of docs/methods.md §1.8: the next synchronising call raises), the
    ValueError elsewhere. On the CPU a NaN / inf is first looked for in one sum (a single reduction pass; only
    a non-finite sum, which an overflow of finite values also gives, pays the exact elementwise check)."""
    if asserts_on_device(x):
        torch._assert_async(torch.isfinite(x).all(),
                            f"imbreg_fast: {name} contains NaN or inf (pass check_finite=False to skip this check)")
        return
    if x.is_floating_point():
        total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        if not any_true(~torch.isfinite(total)):
            return
    check_all_finite(name, x)


def check_labels(labels, mask=None, *, check_finite: bool = True, name: str = "labels") -> torch.Tensor:
    """Real-valued labels (floating or integer), an optional bool mask of their shape and device, and
    (``check_finite``) no NaN/inf where the mask keeps them."""
    labels = check_real_tensor(name, labels)
    check_mask(mask, tuple(labels.shape), labels, name)
    if value_checks(check_finite, labels) and labels.is_floating_point():
        bad = ~torch.isfinite(labels)
        if mask is not None:
            bad = bad & mask
        if any_true(bad):
            raise ValueError(f"{name} contain NaN or inf" + (" at kept positions" if mask is not None else "")
                             + " (mask them out, or pass check_finite=False)")
    return labels


_CHECKED: dict = {}      # (tag, ids) -> (weak references, version counters) of inputs that passed a check
_CHECKED_MAX = 64


def check_once(tag: str, tensors: tuple, check) -> None:
    """Run ``check()`` unless these same tensor objects passed the check ``tag`` before and none has been
    modified in place since (autograd's version counter, which every in-place op bumps, ``copy_`` and
    ``load_state_dict`` included). A prior stored as module buffers is then validated once, not per call: on
    CUDA that removes the check's host syncs from every later step. Writes that bypass the version counter
    (through ``.data``, a NumPy view, or a c10d collective such as ``dist.broadcast`` into the tensors) are not
    seen: validate again by passing new tensors. Only checks are kept this way, never values derived from the
    tensors (those writes would silently serve stale ones). Batched tensors (``torch.vmap``) and inference
    tensors (``torch.inference_mode``: no version counter) are checked every time."""
    if any(torch._C._functorch.is_batchedtensor(t) or t.is_inference() for t in tensors):
        check()
        return
    key = (tag,) + tuple(id(t) for t in tensors)
    versions = tuple(t._version for t in tensors)
    entry = _CHECKED.get(key)
    if entry is not None and entry[1] == versions and all(r() is t for r, t in zip(entry[0], tensors)):
        return
    check()
    _CHECKED.pop(key, None)
    while len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = (tuple(weakref.ref(t) for t in tensors), versions)


def check_prior_weights(name: str, w: torch.Tensor, allow_zero: bool = False) -> None:
    """Mixture / bin weights: finite, > 0 (>= 0 with ``allow_zero``: empty bins), summing to 1 up to the rounding
    of their dtype (a bf16 prior sums to 1 only within ~2^-8)."""
    w64 = w.double()
    if not bool(torch.isfinite(w64).all()) or bool((w64 < 0 if allow_zero else w64 <= 0).any()):
        raise ValueError(f"{name} must be finite and " + (">= 0" if allow_zero else "> 0 (drop empty components)"))
    total = float(w64.sum())
    # each weight rounded to w's dtype is off by at most eps/2 relative, so the sum by eps/2 of the total
    tolerance = max(1e-4, torch.finfo(w.dtype).eps)
    if abs(total - 1.0) > tolerance:
        raise ValueError(f"{name} must sum to 1, got {total:.6g}; normalise them (w / w.sum())")


# --------------------------------------------------------------------------------------------------
# Balanced MSE rows
# --------------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """pred/target flattened to rows: [N, d] tensors, mask [N] (bool) or None, and the shape of the
    'none'-reduced loss."""
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor | None
    loss_shape: tuple


def as_rows(pred, target, mask=None) -> Rows:
    """Validate pred/target/mask and view them as rows.

    Accepted layouts: [N] (d = 1), [N, d], dense [B, 1, H, W] (N = B*H*W pixels, d = 1). The mask has
    the target's shape, except for [N, d] targets where it is per row, [N].
    """
    pred, target = check_pair(pred, target)
    if pred.dim() == 1:
        n, d, row_shape = pred.shape[0], 1, tuple(pred.shape)
    elif pred.dim() == 2:
        n, d, row_shape = pred.shape[0], pred.shape[1], (pred.shape[0],)
    elif pred.dim() == 4 and pred.shape[1] == 1:
        n, d, row_shape = pred.numel(), 1, tuple(pred.shape)
    else:
        raise ValueError("pred must be [N], [N, d] or dense [B, 1, H, W], got shape "
                         f"{tuple(pred.shape)}")
    if d < 1:
        raise ValueError(f"pred must have a target dimension d >= 1, got shape {tuple(pred.shape)}")
    mask = check_mask(mask, row_shape, pred, "pred", shape_name="pred/target")
    if mask is not None:
        mask = mask.reshape(n)
    return Rows(pred.reshape(n, d), target.reshape(n, d), mask, row_shape)


def noise_var_tensor(noise_var, ref: torch.Tensor) -> torch.Tensor:
    """noise_var as a 0-dim floating tensor on ref's device (a Python number becomes ref's dtype,
    fp32 for half types)."""
    if isinstance(noise_var, torch.Tensor):
        if not noise_var.is_floating_point():
            raise TypeError(f"noise_var must have a floating dtype, got {noise_var.dtype}")
        if noise_var.numel() != 1:
            raise ValueError(f"noise_var must be a scalar (one element), got shape {tuple(noise_var.shape)}")
        if noise_var.device != ref.device:
            raise ValueError(f"noise_var is on {noise_var.device} but pred is on {ref.device}")
        return noise_var.reshape(())
    if isinstance(noise_var, bool) or not isinstance(noise_var, (int, float)):
        raise TypeError(f"noise_var must be a float or a scalar tensor, got {type(noise_var).__name__}")
    return torch.tensor(float(noise_var), dtype=compute_dtype(ref.dtype), device=ref.device)


def asserts_on_device(x: torch.Tensor) -> bool:
    """Whether value checks of ``x`` are asynchronous device-side asserts (``torch._assert_async``) rather than a
    host read and a ValueError: on CUDA, outside ``torch.vmap`` (docs/methods.md §1.8)."""
    return x.is_cuda and not torch._C._functorch.is_batchedtensor(x)


def check_noise_var_value(noise_var: torch.Tensor) -> None:
    """sigma^2 finite and > 0. On CUDA without a host sync: an asynchronous device-side assert
    (docs/methods.md §1.8); elsewhere a ValueError."""
    v = noise_var.detach()
    if v.device.type == "cpu" and not torch.compiler.is_compiling() and not torch._C._functorch.is_batchedtensor(v):
        x = v.item()          # a CPU scalar: one read, no tensor ops (this runs on every call)
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"noise_var must be finite and > 0, got {x}")
        return
    ok = torch.isfinite(v) & (v > 0)
    if asserts_on_device(v):
        torch._assert_async(ok, "imbreg_fast: noise_var must be finite and > 0")
        return
    if any_true(~ok):
        raise ValueError(f"noise_var must be finite and > 0, got {float(v)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in the input dtype, with fp32 for half types."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------------------------------
# Rank-N-Contrast batches
# --------------------------------------------------------------------------------------------------


class ContrastBatch(NamedTuple):
    """A contrastive batch flattened to anchors: features [n, d], labels [n, L] (views repeated), and the
    shape of the 'none'-reduced loss with how to get it from the [n] per-anchor losses."""
    features: torch.Tensor
    labels: torch.Tensor
    views: int | None        # V of a [B, V, d] input (anchor v * B + b is features[b, v]); None: flat
    batch: int


def as_contrast_batch(features, labels) -> ContrastBatch:
    """features [n, d] with labels [n] / [n, L], or views [B, V, d] (the published [B, 2, d]) with labels [B] /
    [B, L]: flattened view-major as the published ``torch.cat([f[:, 0], f[:, 1]])``, labels repeated per view.
    Labels must be floating (labels are data: they are detached, their distances only compared)."""
    features = check_float_tensor("features", features)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if not labels.is_floating_point():
        raise TypeError(f"labels must have a floating dtype, got {labels.dtype} (pass labels.float(), or "
                        "labels.double() for integers beyond 2^24)")
    check_same_device(features=features, labels=labels)
    if features.dim() not in (2, 3):
        raise ValueError("features must be [n, d] or [B, V, d] (views, e.g. the published [B, 2, d]), got shape "
                         f"{tuple(features.shape)}")
    if features.shape[-1] < 1:
        raise ValueError(f"features must have a feature dimension d >= 1, got shape {tuple(features.shape)}")
    b = features.shape[0]
    if labels.dim() not in (1, 2) or labels.shape[0] != b or (labels.dim() == 2 and labels.shape[1] < 1):
        raise ValueError(f"labels must be [{b}] or [{b}, L] for features of shape {tuple(features.shape)}, got "
                         f"shape {tuple(labels.shape)}")
    y = labels.detach().reshape(b, labels.shape[1] if labels.dim() == 2 else 1)
    if features.dim() == 2:
        return ContrastBatch(features, y, None, b)
    v = features.shape[1]
    f = features.transpose(0, 1).reshape(v * b, features.shape[2])
    return ContrastBatch(f, y.repeat(v, 1), v, b)


# ConR (features [n, d], per-anchor targets / preds / weights)
# --------------------------------------------------------------------------------------------------


class ConRInputs(NamedTuple):
    features: torch.Tensor          # [n, d]
    targets: torch.Tensor           # [n], compute dtype, detached
    preds: torch.Tensor             # [n], compute dtype, detached
    weights: torch.Tensor | None    # [n], compute dtype, detached


def _per_anchor(name: str, x, n: int, dtype: torch.dtype, features: torch.Tensor) -> torch.Tensor:
    x = check_float_tensor(name, x)
    if tuple(x.shape) not in ((n,), (n, 1)):
        raise ValueError(f"{name} must have shape [{n}] or [{n}, 1] for features of shape "
                         f"{tuple(features.shape)}, got {tuple(x.shape)}")
    check_same_device(features=features, **{name: x})
    return x.detach().reshape(n).to(dtype)


def conr_inputs(features, targets, preds, weights) -> ConRInputs:
    """ConR's tensors: features a floating [n, d] (the two views stacked along dim 0, as the published
    code takes them, or any flat batch), targets / preds / weights floating [n] or [n, 1] on its device.
    targets must not require grad (labels are data); preds and weights are detached (never differentiated)."""
    features = check_float_tensor("features", features)
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d] (stack the views along dim 0), got shape "
                         f"{tuple(features.shape)}")
    if isinstance(targets, torch.Tensor) and targets.requires_grad and torch.is_grad_enabled():
        raise ValueError("targets requires grad, but ConR does not differentiate its targets (labels are "
                         "data): pass targets.detach()")
    n, dtype = features.shape[0], compute_dtype(features.dtype)
    y = _per_anchor("targets", targets, n, dtype, features)
    p = _per_anchor("preds", preds, n, dtype, features)
    w = None if weights is None else _per_anchor("weights", weights, n, dtype, features)
    return ConRInputs(features, y, p, w)


def check_conr_values(inputs: ConRInputs) -> None:
    """No NaN / inf anywhere, weights >= 0 (the explicit checks of the torch backend)."""
    if inputs.features.numel() == 0:
        return
    check_all_finite("features", inputs.features)
    check_all_finite("targets", inputs.targets)
    check_all_finite("preds", inputs.preds)
    if inputs.weights is not None:
        check_all_finite("weights", inputs.weights)
        if any_true(inputs.weights < 0):
            raise ValueError("weights must be >= 0")


# RankSim
# --------------------------------------------------------------------------------------------------


def check_ranksim_inputs(features, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """features [n, ...] floating (viewed as [n, d] rows, d >= 1), targets [n] or [n, 1] real, same device
    -> (features [n, d], targets [n])."""
    features = check_float_tensor("features", features)
    targets = check_real_tensor("targets", targets)
    if features.dim() < 2:
        raise ValueError(f"features must be [n, d] (or [n, ...], flattened per sample), got shape "
                         f"{tuple(features.shape)}")
    n = features.shape[0]
    if not (targets.dim() == 1 or (targets.dim() == 2 and targets.shape[1] == 1)) or targets.shape[0] != n:
        raise ValueError(f"targets must be [n] or [n, 1] with n = {n} (features' first dimension), got shape "
                         f"{tuple(targets.shape)}")
    check_same_device(features=features, targets=targets)
    d = math.prod(features.shape[1:])
    rows = features.reshape(n, d)
    if d < 1:
        raise ValueError(f"features must have at least one value per sample, got shape {tuple(features.shape)}")
    return rows, targets.reshape(n)


def check_subsample_index(index, n: int, device: torch.device, check_values: bool) -> torch.Tensor:
    """An explicit RankSim subsample: a 1-D integer tensor of row indices in [0, n) on ``device``."""
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"subsample must be 'unique_labels', None or an integer index tensor, got a {index.dtype} "
                        "tensor")
    if index.dim() != 1:
        raise ValueError(f"subsample must be a 1-D index tensor, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"subsample is on {index.device} but features are on {device}")
    if check_values and index.numel() > 0:
        message = f"subsample holds indices outside [0, {n})"
        if asserts_on_device(index):
            torch._assert_async(((index >= 0) & (index < n)).all(), "imbreg_fast: " + message)
        elif any_true((index < 0) | (index >= n)):
            raise ValueError(message)
    return index
