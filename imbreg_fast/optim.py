"""Balanced sharpness-aware minimisation (BSAM; Liu et al., ICCV 2025; docs/methods.md §5).

BSAM is SAM (Foret et al., ICLR 2021) applied to a label-density re-weighted loss: the weights of
:mod:`imbreg_fast.lds` (SQINV, optionally LDS-smoothed) enter both the ascent pass, which picks the
perturbation, and the descent pass, whose gradient the base optimiser applies. :class:`BSAM` is the
optimiser (SAM and, with ``adaptive=True``, ASAM around any ``torch.optim`` optimiser); :func:`bsam_step`
runs one training step whose two passes may use different weights.

Training loop (the published recipe: SQINV weights, no LDS, in both passes)::

    lw = imbreg_fast.lds.LabelWeights(121, range=(0, 121), scheme="sqrt_inv", lds=False).fit(train_ages)
    opt = BSAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.2, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.base_optimizer, T_max=len(loader) * epochs)
    for images, ages in loader:
        w = lw.weights(ages)
        loss_fn = lambda weights: F.weighted_l1_loss(model(images), ages, weights, check_finite=False)
        loss = bsam_step(opt, loss_fn, w, w)           # ascent weights, descent weights
        sched.step()

The same step written out (what :func:`bsam_step` does)::

    opt.zero_grad()
    loss_fn(w_ascent).backward()                      # gradient at w
    opt.first_step(zero_grad=True)                    # w <- w + e
    loss_fn(w_descent).backward()                     # gradient at w + e
    opt.second_step()                                 # w <- w (exactly), then the base optimiser's step
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import _validation as V

__all__ = ["BSAM", "bsam_step"]

# Added to the gradient norm before dividing by it, as the published code does (‖g‖ + 1e-16). The norm is
# accumulated in at least fp32, where 1e-16 is representable; a zero gradient gives e = 0, not NaN.
NORM_EPS = 1e-16

# The options BSAM adds to every parameter group (per-group values override the constructor's).
_GROUP_OPTIONS = ("rho", "adaptive", "adaptive_eta")


def _check_adaptive(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"adaptive must be a bool, got {type(value).__name__}")
    return value


def _check_group(group: dict) -> None:
    """The BSAM options of one parameter group (errors name the option)."""
    V.check_nonnegative("rho", group["rho"])
    _check_adaptive(group["adaptive"])
    V.check_nonnegative("adaptive_eta", group["adaptive_eta"])


class BSAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation (SAM / ASAM) around a base optimiser, as used by BSAM.

    One step at weights ``w`` with gradient ``g`` (of the ascent loss) at ``w``:

    1. :meth:`first_step` — ``e = rho * g / (‖g‖ + 1e-16)`` (with ``adaptive=True``, ASAM:
       ``e = rho * T² g / (‖T g‖ + 1e-16)``, ``T = |w| + adaptive_eta`` elementwise), then ``w <- w + e``.
       ``‖·‖`` is the 2-norm over all the parameters of all the groups that have a gradient.
    2. The caller computes the gradient ``g'`` of the descent loss at ``w + e``.
    3. :meth:`second_step` — ``w`` is put back (exactly: copied back, not ``(w + e) - e``), and the base
       optimiser steps with ``g'``.

    Two ways to build it:

    - from an optimiser **class**: ``BSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1,
      momentum=0.9)`` — the base optimiser ``SGD(<the same param groups>, lr=0.1, momentum=0.9)`` is
      constructed with the keyword arguments BSAM does not use (``base_kwargs``);
    - around an optimiser **instance**: ``BSAM(None, torch.optim.Adam(model.parameters(), lr=1e-3),
      rho=0.05)`` — ``params`` is None (or the instance's own parameters) and ``base_kwargs`` must be empty.

    Either way BSAM and :attr:`base_optimizer` share their parameter groups (the same dicts: an LR
    scheduler on either changes both) and their state. When stepping with :meth:`first_step` /
    :meth:`second_step` / :func:`bsam_step`, attach the scheduler to ``opt.base_optimizer`` (whose ``step``
    runs); on the BSAM itself torch warns that ``lr_scheduler.step()`` came before ``optimizer.step()``,
    as only :meth:`step` counts as the BSAM's step. Each group holds BSAM's options ``rho``,
    ``adaptive`` and ``adaptive_eta`` next to the base optimiser's; a group may set its own, e.g.
    ``[{"params": weights}, {"params": biases, "adaptive": False}]`` with ``adaptive=True,
    adaptive_eta=0.01`` is ASAM as published (biases are not rescaled). The norm is always global, over all
    groups; a group's ``rho`` scales its own parameters' perturbation.

    Parameters whose ``.grad`` is None at :meth:`first_step` are neither perturbed nor counted in the
    norm. Work per step: a few fused ``torch._foreach_*`` ops per (group, device, dtype) bucket, no host
    synchronisation (the norm stays a tensor; a zero gradient gives ``e = 0`` through the ``1e-16``,
    with no branch on its value).

    Args:
        params: parameters or parameter-group dicts (class form); None or the instance's parameters
            (instance form).
        base_optimizer: a ``torch.optim.Optimizer`` subclass or instance (not a BSAM).
        rho: radius of the perturbation, >= 0 (0: the base optimiser, with a second forward/backward).
            The reference uses 0.2 (AgeDB-DIR) and 0.05 (IMDB-WIKI-DIR).
        adaptive: ASAM's scale-invariant perturbation (``T = |w| + adaptive_eta``); rho is then typically
            larger (ASAM uses 0.5 - 2).
        adaptive_eta: ASAM's eta, >= 0 (0.01 in the ASAM code; the default 0 is ``T = |w|``).
        **base_kwargs: the base optimiser's keyword arguments (class form only).

    ``step(closure)`` follows the SAM convention: ``.grad`` already holds the gradient at ``w`` (the
    caller ran ``loss.backward()``); the closure recomputes the loss at ``w + e`` and calls backward.

    Mixed precision with a ``torch.amp.GradScaler`` (the perturbation does not depend on the loss scale,
    so the first pass may also stay scaled; unscaling it lets the scaler see an overflow there, and is
    needed before clipping)::

        scaler.scale(loss_fn(w_ascent)).backward()
        scaler.unscale_(opt)                          # before first_step
        opt.first_step(zero_grad=True)
        scaler.scale(loss_fn(w_descent)).backward()
        opt.second_step(scaler=scaler)                # restores w, then scaler.step(opt.base_optimizer)
        scaler.update()

    ``scaler.step(opt)`` is not the way: it would call ``opt.step()`` without a closure, and when it skips
    a step (inf/NaN gradients) the weights would stay perturbed; ``second_step(scaler=...)`` always
    restores them first. If the first pass overflows, ``e`` is NaN wherever the gradient is inf/NaN, so the
    second pass overflows too and the scaler skips the step; the weights are restored exactly either way.

    ``state_dict()`` / ``load_state_dict()`` are the base optimiser's (its state, e.g. momentum buffers
    or Adam moments, and the param groups including ``rho`` / ``adaptive`` / ``adaptive_eta``), so a
    checkpoint loads into a fresh BSAM (class or instance form) or into the bare base optimiser. Save it
    between steps, not between :meth:`first_step` and :meth:`second_step` (the saved weights ``w`` are
    not part of it). Hooks registered on the BSAM for state_dict / load_state_dict do not run (register
    them on :attr:`base_optimizer`); step hooks run for :meth:`step` only.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 adaptive_eta: float = 0.0, **base_kwargs: Any):
        rho = V.check_nonnegative("rho", rho)
        adaptive = _check_adaptive(adaptive)
        adaptive_eta = V.check_nonnegative("adaptive_eta", adaptive_eta)
        own = dict(rho=rho, adaptive=adaptive, adaptive_eta=adaptive_eta)
        if isinstance(base_optimizer, BSAM) or (isinstance(base_optimizer, type)
                                                and issubclass(base_optimizer, BSAM)):
            raise TypeError("base_optimizer must not be a BSAM (nested SAM is not supported)")
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"base_kwargs ({', '.join(sorted(base_kwargs))}) are only accepted with an "
                                f"optimizer class; the {type(base_optimizer).__name__} instance is already built "
                                "(set them on it, or pass the class)")
            if params is not None:
                self._check_same_params(params, base_optimizer)
            super().__init__(base_optimizer.param_groups, own)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise TypeError("params must be given when base_optimizer is an optimizer class "
                                "(params=None is for wrapping an optimizer instance)")
            super().__init__(params, {**base_kwargs, **own})
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError("base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or "
                            f"instance, got {type(base_optimizer).__name__}")
        # one set of groups and one state, seen from both
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            _check_group(group)
        # between first_step and second_step: {"saved": [(params, copies of their weights w)] per bucket}.
        # A dict mutated in place, not an attribute rebound: torch.compile drops attribute assignments on
        # optimizer objects made inside a compiled region (torch 2.13), but keeps dict mutations.
        self._perturbed: dict = {}

    @staticmethod
    def _check_same_params(params, base: torch.optim.Optimizer) -> None:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or dicts, or None, got a torch.Tensor")
        given = []
        for item in params:
            if isinstance(item, dict):
                raise ValueError("with an optimizer instance, params must be None or its parameters; its param "
                                 "groups are used as they are (set per-group rho/adaptive on them)")
            given.append(item[1] if isinstance(item, tuple) else item)
        ours = [p for g in base.param_groups for p in g["params"]]
        if {id(p) for p in given} != {id(p) for p in ours}:
            raise ValueError("params are not the parameters of the base_optimizer instance; pass params=None "
                             "to use the instance's param groups")

    # ----------------------------------------------------------------------------------------------
    # Param groups, state, pickling
    # ----------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to BSAM and to the base optimiser (BSAM's options default to the constructor's)."""
        if "base_optimizer" not in self.__dict__:      # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        for name in _GROUP_OPTIONS:
            param_group.setdefault(name, self.defaults[name])
        _check_group(param_group)
        self.base_optimizer.add_param_group(param_group)   # appends to the shared list

    def state_dict(self) -> dict:
        """The base optimiser's ``state_dict()`` (its state and the shared param groups)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` (of a BSAM, or of a bare base optimiser: BSAM's options then keep
        their current values) into the base optimiser, and share its new groups and state again."""
        if "saved" in self._perturbed:
            raise RuntimeError("load_state_dict called between first_step() and second_step(); the weights are "
                               "perturbed (call second_step() or restore() first)")
        current = [{k: g[k] for k in _GROUP_OPTIONS} for g in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group, old in zip(self.param_groups, current):
            for name in _GROUP_OPTIONS:
                group.setdefault(name, old[name])
            _check_group(group)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(base_optimizer=self.base_optimizer, _perturbed=self._perturbed)
        return state

    def __repr__(self) -> str:
        head, _, rest = super().__repr__().partition(" (")
        return f"{head}(base_optimizer={type(self.base_optimizer).__name__}) ({rest}"

    # ----------------------------------------------------------------------------------------------
    # The two steps
    # ----------------------------------------------------------------------------------------------

    def _buckets(self):
        """[(group, params, grads)] per group and (device, dtype) of the parameters that have a gradient."""
        out = []
        for group in self.param_groups:
            _check_group(group)           # cheap Python checks: a group edited after construction
            by_key: dict = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("BSAM does not support sparse gradients")
                ps, gs = by_key.setdefault((p.device, p.dtype), ([], []))
                ps.append(p)
                gs.append(g)
            out.extend((group, ps, gs) for ps, gs in by_key.values())
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Ascent: ``w <- w + e`` for every parameter with a gradient, saving ``w`` for :meth:`second_step`.

        ``e = rho * g / (‖g‖ + 1e-16)`` or, for adaptive groups, ``rho * T² g / (‖T g‖ + 1e-16)`` with
        ``T = |w| + adaptive_eta``; one global norm over all groups (``T g`` for adaptive groups, ``g`` for
        the others). ``zero_grad``: clear the gradients afterwards (set to None), ready for the second pass.
        """
        if "saved" in self._perturbed:
            raise RuntimeError("first_step() called twice without second_step(); the weights are already "
                               "perturbed (call second_step(), or restore() to undo the perturbation)")
        buckets = self._buckets()
        # the norm is accumulated in fp32 (fp16/bf16 squares would overflow), or in fp64 for all buckets
        # when a parameter is fp64 (so fp64 parameters get an fp64 norm even next to fp32 ones)
        acc = torch.float64 if any(ps[0].dtype == torch.float64 for _, ps, _ in buckets) else torch.float32
        scaled = []          # per bucket: the vectors whose norm is taken (g, or T g), and T (or None)
        norms = []
        for group, params, grads in buckets:
            if group["adaptive"]:
                t = torch._foreach_abs(params)
                if group["adaptive_eta"] != 0.0:
                    torch._foreach_add_(t, group["adaptive_eta"])
                v = torch._foreach_mul(t, grads)
            else:
                t, v = None, grads
            per_tensor = torch._foreach_norm(v, 2, dtype=acc)
            norms.append(torch.linalg.vector_norm(torch.stack(per_tensor)))
            scaled.append((v, t))
        backup = []
        if buckets:
            home = norms[0].device
            total = torch.linalg.vector_norm(torch.stack([n.to(home) for n in norms]))
            inv = torch.reciprocal(total + NORM_EPS)
            for (group, params, grads), (v, t) in zip(buckets, scaled):
                scale = (inv * group["rho"]).to(params[0].device)
                # e = scale * g, or scale * T (T g) = scale * T^2 g
                e = torch._foreach_mul(v, scale) if t is None else torch._foreach_mul(v, t)
                if t is not None:
                    torch._foreach_mul_(e, scale)
                backup.append((params, torch._foreach_clone(params)))
                torch._foreach_add_(params, e)
        self._perturbed["saved"] = backup
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` (no optimiser step). :meth:`second_step` calls
        it; call it yourself to abandon a step after :meth:`first_step` (e.g. the second pass failed)."""
        if "saved" not in self._perturbed:
            raise RuntimeError("restore() / second_step() called without a preceding first_step()")
        for params, saved in self._perturbed.pop("saved"):
            torch._foreach_copy_(params, saved)

    def second_step(self, zero_grad: bool = False, *, scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """Descent: restore ``w`` (as saved by :meth:`first_step`), then step the base optimiser with the
        gradients now in ``.grad`` (those at ``w + e``).

        ``scaler``: a ``torch.amp.GradScaler`` whose loss scale the second pass used; the base step is then
        ``scaler.step(self.base_optimizer)`` (unscaling, skipped on inf/NaN). Call ``scaler.update()``
        afterwards. ``zero_grad``: clear the gradients after the step.
        """
        self.restore()
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """A full SAM step, SAM's closure convention: ``.grad`` holds the gradient at ``w`` already; then
        ``first_step(zero_grad=True)``, ``closure()`` (run with grad enabled: it recomputes the loss at
        ``w + e`` and calls backward), ``second_step()``. Returns the closure's value. If the closure
        raises, the weights are restored before the error propagates.

        Example::

            def closure():
                loss = criterion(model(x), y)
                loss.backward()
                return loss

            criterion(model(x), y).backward()
            opt.step(closure)
        """
        if closure is None:
            raise TypeError("BSAM.step requires a closure that recomputes the loss and calls backward() (SAM "
                            "needs a second forward/backward pass); or call first_step() and second_step()")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss


def _backward(loss, scaler, what: str) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor ({what} pass), got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss ({what} pass), got shape {tuple(loss.shape)}")
    (loss if scaler is None else scaler.scale(loss)).backward()


def bsam_step(optimizer: BSAM, loss_fn: Callable[[Any], torch.Tensor], ascent_weights, descent_weights, *,
              scaler: Optional["torch.amp.GradScaler"] = None) -> torch.Tensor:
    """One BSAM training step whose ascent and descent passes may use different per-sample weights.

    ``loss_fn(weights)`` runs the forward pass on the current batch and returns the scalar loss weighted by
    ``weights`` (e.g. ``lambda w: imbreg_fast.functional.weighted_l1_loss(model(x), y, w, check_finite=False)``);
    it is called twice, under grad mode: with ``ascent_weights`` at the current weights ``w`` (the
    gradient that picks the perturbation) and with ``descent_weights`` at ``w + e`` (the gradient the base
    optimiser applies). The weights are passed through untouched (tensors, None, anything ``loss_fn``
    accepts); typically ``LabelWeights.weights(y)`` of :mod:`imbreg_fast.lds`. The published BSAM uses
    the same SQINV weights in both passes: ``bsam_step(opt, loss_fn, w, w)``.

    Steps: ``zero_grad``, ascent backward, ``first_step(zero_grad=True)``, descent backward,
    ``second_step()``. With a GradScaler ``scaler``: both losses are scaled, ``scaler.unscale_(optimizer)``
    precedes ``first_step`` and the base step is ``scaler.step(optimizer.base_optimizer)``; call
    ``scaler.update()`` after this function. If a pass raises after ``first_step``, the weights are
    restored before the error propagates.

    Returns the ascent loss at ``w`` (detached; reading it is the caller's only host synchronisation).
    """
    if not isinstance(optimizer, BSAM):
        raise TypeError(f"optimizer must be a BSAM, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    optimizer.zero_grad()
    with torch.enable_grad():
        loss = loss_fn(ascent_weights)
        _backward(loss, scaler, "ascent")
    if scaler is not None:
        scaler.unscale_(optimizer)
    optimizer.first_step(zero_grad=True)
    try:
        with torch.enable_grad():
            _backward(loss_fn(descent_weights), scaler, "descent")
    except BaseException:
        optimizer.restore()
        raise
    optimizer.second_step(scaler=scaler)
    return loss.detach()
