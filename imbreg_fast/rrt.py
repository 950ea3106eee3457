"""Regressor re-training (RRT; Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021, Sec. 5).

RRT is a two-stage recipe: first train the whole network as usual (e.g. plain MSE); then freeze the encoder,
re-initialise the regressor (the head, typically the last linear / 1x1-conv layer) and train only the head
with a re-weighted loss (e.g. LDS inverse re-weighting, :class:`imbreg_fast.lds.LabelWeights`)::

    model = train_stage_one(model)                         # any loss
    head_params = imbreg_fast.rrt.freeze_for_retraining(model, model.head)
    optimizer = torch.optim.Adam(head_params, lr=1e-3)     # the head only
    lw = imbreg_fast.lds.LabelWeights(100, range=(0, 10), scheme="inv", lds=True).fit(train_labels)
    for x, y in loader:
        model.train()
        loss = imbreg_fast.functional.weighted_mse_loss(model(x), y, lw.weights(y))
        optimizer.zero_grad(); loss.backward(); optimizer.step()

The published code (``--retrain_fc --pretrained ckpt``) loads the stage-one checkpoint without its last
layer (so that layer keeps a fresh initialisation), sets ``requires_grad = False`` on every other parameter
and optimises the remaining one or two tensors. :func:`freeze_for_retraining` does the same on a model in
memory: it re-initialises the head with the ``reset_parameters()`` of its submodules, freezes every other
parameter, and returns the head's parameters for the optimiser.

Normalisation layers in the frozen encoder. The published loop calls ``model.train()`` every epoch, so the
frozen encoder's BatchNorm layers keep normalising with batch statistics and keep updating their running
statistics during re-training: the encoder's eval-mode features drift away from the ones stage one
converged to, and the head is trained on train-mode features that differ from what it sees at test time.
We default to ``batchnorm="eval"``: those layers stay in eval mode (running statistics used and left
unchanged) whatever ``model.train()`` says, so the encoder is a fixed function, identical in training and
evaluation. ``batchnorm="train"`` reproduces the published behaviour.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

__all__ = ["BATCHNORM_MODES", "freeze_for_retraining", "frozen_normalization_layers"]

BATCHNORM_MODES = ("eval", "train")

_NORM_TYPES = (nn.modules.batchnorm._NormBase,)    # BatchNorm1d/2d/3d, SyncBatchNorm, Instance/LazyBatchNorm


def _keep_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen normalisation layer: run it in eval mode (running statistics, no update)."""
    if module.training:
        module.train(False)


def _is_hooked(module: nn.Module) -> bool:
    return any(hook is _keep_eval for hook in module._forward_pre_hooks.values())


def _submodules_outside(model: nn.Module, head: nn.Module) -> Iterator[nn.Module]:
    """Every submodule of ``model`` (itself included) that is neither ``head`` nor inside it."""
    inside = {id(m) for m in head.modules()}
    for module in model.modules():
        if id(module) not in inside:
            yield module


def frozen_normalization_layers(model: nn.Module) -> list[nn.Module]:
    """The normalisation layers of ``model`` held in eval mode by :func:`freeze_for_retraining`
    (``batchnorm="eval"``)."""
    return [m for m in model.modules() if _is_hooked(m)]


def freeze_for_retraining(model: nn.Module, head: nn.Module, *, reinit: bool = True,
                          batchnorm: str = "eval") -> list[nn.Parameter]:
    """Prepare ``model`` for regressor re-training: freeze everything but ``head``, re-initialise ``head``.

    Args:
        model: the stage-one model (modified in place; ``copy.deepcopy`` it first to keep stage one).
        head: the regressor, a submodule of ``model`` (not ``model`` itself), with at least one parameter.
        reinit: call ``reset_parameters()`` on every submodule of ``head`` that has one (``head`` included),
            as the published code's fresh last layer. Every parameter of ``head`` must then belong to such a
            module (otherwise ``ValueError``: it could not be re-initialised); pass ``reinit=False`` to keep
            the stage-one head as the starting point.
        batchnorm: what the frozen part's normalisation layers (BatchNorm, SyncBatchNorm, InstanceNorm
            with running statistics) do in training mode. ``"eval"`` (default): they are held in eval mode
            by a forward pre-hook (running statistics used and never updated), so the frozen encoder
            computes the same features in training and evaluation. ``"train"``: they follow
            ``model.train()`` as usual and keep updating their running statistics from the re-training
            batches, as the published code does. Normalisation layers inside ``head`` are never affected.

    Returns:
        The parameters of ``head`` (``requires_grad=True``), in ``head.parameters()`` order: give them, and
        only them, to the optimiser.

    Every parameter outside ``head`` gets ``requires_grad=False``. A parameter shared between ``head`` and
    another part of the model (tied weights) is refused with ``ValueError``: it cannot be both frozen and
    trained. Calling the function again on the same model is harmless (no duplicate hooks; ``batchnorm="train"``
    removes the hooks of an earlier ``"eval"`` call).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be a torch.nn.Module, got {type(head).__name__}")
    if not isinstance(reinit, bool):
        raise TypeError(f"reinit must be a bool, got {type(reinit).__name__}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    if head is model:
        raise ValueError("head is the whole model: nothing would stay frozen; pass the regressor submodule "
                         "(e.g. model.head or model.fc)")
    if not any(m is head for m in model.modules()):
        raise ValueError(f"head ({type(head).__name__}) is not a submodule of model ({type(model).__name__}); "
                         "pass the model's own regressor module, e.g. model.head")
    head_params = list(head.parameters())
    if not head_params:
        raise ValueError(f"head ({type(head).__name__}) has no parameters to re-train")
    head_ids = {id(p) for p in head_params}
    outside = list(_submodules_outside(model, head))
    for module in outside:
        for name, p in module.named_parameters(recurse=False):
            if p is not None and id(p) in head_ids:
                raise ValueError(f"parameter {name!r} of {type(module).__name__} is shared with the head (tied "
                                 "weights): it cannot be both frozen and re-trained")

    if reinit:
        resettable = [m for m in head.modules() if callable(getattr(m, "reset_parameters", None))]
        covered = {id(p) for m in resettable for p in m.parameters(recurse=False)}
        missing = [name for name, p in head.named_parameters() if id(p) not in covered]
        if missing:
            raise ValueError(f"cannot re-initialise head parameters {missing}: they belong to no module with "
                             "reset_parameters(); give those modules one, or pass reinit=False")
        with torch.no_grad():
            for m in resettable:
                m.reset_parameters()

    for p in model.parameters():
        p.requires_grad_(id(p) in head_ids)

    for module in outside:
        if batchnorm == "eval":
            if isinstance(module, _NORM_TYPES) and module.track_running_stats and not _is_hooked(module):
                module.register_forward_pre_hook(_keep_eval)
                module.train(False)
        else:                                 # an earlier call's hooks are removed
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _keep_eval]:
                del module._forward_pre_hooks[key]
    return head_params
