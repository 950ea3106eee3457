"""The one registration helper of every fused op, C++ and Triton alike.

A fused op is defined once per backend: its schema in ``csrc/<family>.cpp`` (C++, loaded by
:mod:`imbreg_fast._extension`) or a ``torch.library.custom_op`` around a Triton launcher (in the family's
glue module, ``imbreg_fast/ops/<family>.py``). :func:`register_fused_op` then gives it, in one call:

- its fake kernel (``torch.compile``, ``opcheck``),
- its autograd (``torch.library.register_autograd``), with the inputs handed to the family's
  ``setup_context`` / ``backward`` **by name** (the op's schema names them), and
- a callable :class:`FusedOp` that also works under ``torch.func`` transforms (``grad``, ``vmap``,
  ``jacrev``): these need an ``autograd.Function`` in the ``setup_context`` form, which
  ``register_autograd`` does not generate; the same ``setup_context`` / ``backward`` serve both, and
  eager calls take a lighter ``autograd.Function`` with them too (see :class:`FusedOp`).

Loss kernels compute the input gradient in the forward pass and their backward only scales it, so they
cannot be differentiated twice. When a graph of their backward is being built (``create_graph=True``,
``torch.func`` transforms), the gradients they return therefore pass through a node whose own backward
raises a ``RuntimeError`` naming the fix (``backend='torch'``): differentiating them fails loudly, never
with a silently wrong (dropped) second-order term. Ops that are linear in their differentiable input (FDS recolouring, whose backward is the same
op again) pass ``twice_differentiable=True``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

__all__ = ["ForwardGrad", "FusedOp", "grad_required", "register_fused_op"]


def grad_required(*tensors: torch.Tensor) -> bool:
    """Whether a fused forward must also produce its gradients: grad mode is on and an input requires grad,
    or a ``torch.func`` transform is active (the tensors it wraps do not report ``requires_grad`` although an
    outer autograd level may differentiate through them, e.g. ``vmap(loss)(x).sum().backward()``)."""
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in tensors):
        return True
    return torch._C._functorch.maybe_current_level() is not None


def _op_packet(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


class ForwardGrad:
    """Marks, among the tensors a ``setup_context`` returns, an output of the op that is a gradient the
    forward pass computed and the backward only scales (a loss kernel's d loss / d pred).

    The backward receives, in its place, a handle whose ``scaled(g, dtype=None)`` returns ``g * grad``
    (``g`` broadcast against the gradient, then cast to ``dtype``); call it once per backward. On the eager
    path that product is made in the forward's own buffer, which is then handed over (lent) as the returned
    gradient: no second [N] tensor and no pass at all when ``g`` is a CPU scalar equal to 1
    (``loss.backward()``). The buffer is kept on ``ctx`` (not saved for backward, whose unpacking would see
    the in-place product) until the first backward, which releases it in any case; the op's inputs are saved
    instead, as ``F.mse_loss`` saves its own, and a second backward of the same graph (``retain_graph=True``)
    recomputes the gradient with the op from them, since the lent buffer may have been accumulated into or
    modified since. ``torch.compile`` and ``torch.func`` use the out-of-place product, as does any call that
    builds a graph of the backward (``create_graph=True``).
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _SavedGrad:
    """Backward handle of a ForwardGrad saved for backward (torch.compile, torch.func): out of place."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def scaled(self, g: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out = g.to(self.tensor.dtype) * self.tensor
        return out if dtype is None else out.to(dtype)


def _is_cpu_one(g: torch.Tensor) -> bool:
    """g is a single CPU value equal to 1 (reading it is no device sync)."""
    return g.device.type == "cpu" and g.numel() == 1 and g.item() == 1


class _LentGrad:
    """Backward handle of a ForwardGrad on the eager path (see :class:`ForwardGrad`)."""

    __slots__ = ("ctx", "slot")

    def __init__(self, ctx, slot: int):
        self.ctx = ctx
        self.slot = slot

    def _take_buffer(self) -> torch.Tensor:
        """The forward's buffer (no longer held by ctx), or, once an earlier backward of this graph took it
        (retain_graph=True), the gradient recomputed from the saved inputs."""
        ctx = self.ctx
        buf = ctx.forward_grads[self.slot]
        if buf is not None:
            ctx.forward_grads[self.slot] = None
            return buf
        args = list(ctx.op_args)
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors[ctx.num_saved + ctx.num_anchors:]):
            args[position] = tensor.detach()
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            return ctx.op(*args)[ctx.forward_grad_outputs[self.slot]]

    def scaled(self, g: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        buf = self._take_buffer()
        if torch.is_grad_enabled() or (dtype is not None and dtype != buf.dtype):
            # a graph of the backward is being built, or a cast makes a new tensor anyway: out of place
            return _SavedGrad(buf).scaled(g, dtype)
        if not _is_cpu_one(g):
            buf.mul_(g.to(buf.dtype))   # g broadcasts to buf's shape (mul_ raises if it would have to grow)
        return buf


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients a fused backward returns; differentiating them raises ``message``.

    ``anchor`` is an input of the fused op that requires grad (at every ``torch.func`` level too), so the
    returned gradients are attached to this node whenever a graph of the backward is being built."""

    generate_vmap_rule = True

    @staticmethod
    def forward(anchor, message, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(ctx.message)


def _first_order_only(grads: tuple, anchor: torch.Tensor, qualname: str) -> tuple:
    message = (f"imbreg_fast: {qualname} cannot be differentiated twice: the fused kernels compute the "
               "gradient in the forward pass, and a gradient of that gradient (create_graph=True, a gradient "
               "penalty, torch.func.grad of a gradient, a Hessian) would be silently wrong. Use "
               "backend='torch' for higher-order derivatives.")
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    marked = _FirstOrderOnly.apply(anchor, message, *(grads[i] for i in present))
    out = list(grads)
    for i, g in zip(present, marked):
        out[i] = g
    return tuple(out)


class FusedOp:
    """A registered fused op; call it like ``torch.ops.imbreg_fast.<name>``.

    ``torch.compile`` and calls without autograd go to the op itself (under ``torch.compile``, its
    registered autograd). Eager calls that record a graph go through an ``autograd.Function`` that calls
    the op below the autograd dispatch key, with the same ``setup_context`` / ``backward``: what the
    registered autograd does, without its per-call Python (``torch.library`` re-derives the schema's
    defaults on every call, ~0.1 ms). Under a ``torch.func`` transform the call goes through an
    ``autograd.Function`` that dispatches the op normally (the transforms' own keys must see it; ``vmap``
    runs the op once per batch element unless the op has a batching rule).
    """

    def __init__(self, qualname: str, op, function: Optional[type], eager: Optional[type] = None):
        self.qualname = qualname
        self.op = op
        self._function = function
        self._eager = eager

    def __call__(self, *args):
        if self._function is not None:
            if torch._C._functorch.maybe_current_level() is not None:
                return self._function.apply(*args)
            if (not torch.compiler.is_compiling() and torch.is_grad_enabled()
                    and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
                return self._eager.apply(*args)
        return self.op(*args)

    def __repr__(self) -> str:
        return f"FusedOp({self.qualname})"


def register_fused_op(qualname: str, *, fake: Callable, setup_context: Optional[Callable] = None,
                      backward: Optional[Callable] = None, twice_differentiable: bool = False) -> FusedOp:
    """Register the fake kernel and autograd of the fused op ``qualname`` (e.g. ``"imbreg_fast::bmc_fwd"``).

    Args:
        fake: ``fake(args) -> outputs`` — ``args`` is a namespace of the op's inputs by schema name
            (``args.pred``, ``args.reduction``, ...); returns outputs with the right metadata.
        setup_context: ``setup_context(ctx, args, output) -> tensors`` — returns the tensors the backward
            needs (the helper saves them with ``ctx.save_for_backward``); other state goes on ``ctx``.
        backward: ``backward(ctx, saved, *grad_outputs) -> {input_name: grad}`` — ``saved`` the tensors
            ``setup_context`` returned; inputs not named get None; ``ctx.needs_grad[input_name]`` says which
            gradients are wanted.
            Without ``backward`` the op is registered as not differentiable (fake kernel only).
        twice_differentiable: the backward is itself differentiable (it calls differentiable ops on
            the incoming gradient only); otherwise differentiating the returned gradients raises.
    """
    packet = _op_packet(qualname)
    names = [a.name for a in packet.default._schema.arguments]

    def named(args) -> SimpleNamespace:
        return SimpleNamespace(**dict(zip(names, args)))

    torch.library.register_fake(qualname)(lambda *args: fake(named(args)))
    if backward is None:
        return FusedOp(qualname, packet, None)

    def setup(ctx, inputs, output, lend: bool):
        # The outputs after the first are non-differentiable (saved gradients, statistics): without this,
        # autograd would allocate and zero-fill a gradient of each ([N] or [n, n]) on every backward call.
        # An undefined gradient of the first output (gradcheck's check_undefined_grad) means zero: _backward
        # returns no gradient then.
        ctx.set_materialize_grads(False)
        saved = list(setup_context(ctx, named(inputs), output))
        ctx.forward_grad_slots = [i for i, t in enumerate(saved) if isinstance(t, ForwardGrad)]
        ctx.lends = lend and bool(ctx.forward_grad_slots)
        extra = ()
        if ctx.lends:
            # eager: the forward's gradients stay on ctx (detached: no reference cycle through their grad_fn)
            # to be lent by the first backward; the inputs are saved for a second one (see ForwardGrad)
            grads = [saved[i].tensor for i in ctx.forward_grad_slots]
            ctx.forward_grads = [t.detach() for t in grads]
            ctx.forward_grad_outputs = [next(j for j, o in enumerate(output) if o is t) for t in grads]
            ctx.op = packet.default
            ctx.tensor_positions = [j for j, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
            ctx.op_args = [None if isinstance(a, torch.Tensor) else a for a in inputs]
            extra = tuple(inputs[j] for j in ctx.tensor_positions)
            saved = [t for i, t in enumerate(saved) if i not in ctx.forward_grad_slots]
        else:
            saved = [t.tensor if isinstance(t, ForwardGrad) else t for t in saved]
        # an input that requires grad: the anchor of _FirstOrderOnly (saved, so torch.func levels see it)
        anchors = () if twice_differentiable else tuple(
            t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)[:1]
        ctx.num_saved = len(saved)
        ctx.num_anchors = len(anchors)
        ctx.save_for_backward(*saved, *anchors, *extra)

    def _setup_context(ctx, inputs, output):
        setup(ctx, inputs, output, lend=False)

    def _backward(ctx, *grad_outputs):
        if grad_outputs[0] is None:       # undefined = zero incoming gradient (materialize_grads is off)
            return (None,) * len(names)
        ctx.needs_grad = dict(zip(names, ctx.needs_input_grad))
        saved = ctx.saved_tensors
        family_saved = list(saved[:ctx.num_saved])
        for slot_index, slot in enumerate(ctx.forward_grad_slots):
            if ctx.lends:
                family_saved.insert(slot, _LentGrad(ctx, slot_index))
            else:
                family_saved[slot] = _SavedGrad(family_saved[slot])
        by_name = backward(ctx, tuple(family_saved), *grad_outputs)
        if ctx.lends:
            # what was not handed over is released now, as saved tensors are (a later backward recomputes)
            ctx.forward_grads = [None] * len(ctx.forward_grads)
        unknown = set(by_name) - set(names)
        if unknown:
            raise KeyError(f"{qualname}: backward returned gradients for unknown inputs {sorted(unknown)}")
        grads = tuple(by_name.get(name) for name in names)
        if torch.is_grad_enabled() and ctx.num_anchors:
            grads = _first_order_only(grads, saved[ctx.num_saved], qualname)
        return grads

    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)

    def functorch_forward(*args):
        return packet(*args)

    def eager_forward(ctx, *args):
        # the ctx form of forward: Function.apply binds a setup_context form's arguments with
        # inspect.signature on every call (tens of microseconds); torch.func needs that form, eager calls do not
        with torch._C._AutoDispatchBelowAutograd():
            output = packet(*args)
        setup(ctx, args, output, lend=True)
        return output

    def function(suffix: str, forward: Callable, setup: Optional[Callable], **attrs) -> type:
        # built with type() so that autograd's node class (created with the Function) carries the op's name,
        # e.g. "mixture_nll_fwd_eagerBackward" in a graph
        body = dict(forward=staticmethod(forward), backward=staticmethod(_backward), **attrs)
        if setup is not None:
            body["setup_context"] = staticmethod(setup)
        return type(f"{qualname.split('::')[1]}_{suffix}", (torch.autograd.Function,), body)

    functorch_form = function("functorch", functorch_forward, _setup_context, generate_vmap_rule=True)
    eager_form = function("eager", eager_forward, None)
    return FusedOp(qualname, packet, functorch_form, eager_form)
