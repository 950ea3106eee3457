"""Independent oracle for the weighted regression losses (docs/methods.md §2; reference code
YyzHarry/imbalanced-regression ``loss.py``): MSE, L1, Huber, focal MSE, focal L1.

Plain Python loops over elements on Python floats (``math``), never the code under test. The gradients are
written by hand from the reference's definitions (the focal factor differentiated in its own sigmoid /
tanh form, not through the kernels' tanh(beta/2 x) identity).

Conventions: elements are flattened; ``weight`` is a list (already expanded) or None (ones); ``mask`` a
list of bools or None. Reductions: 'mean' = sum_kept w l / kept count, 'weighted_mean' = sum_kept w l /
sum_kept w (0 when that is 0), 'sum', 'none' (w l per element, 0 on dropped ones). The result is for
``sum(grad_output * loss)``: grad_output a float (reduced) or a list (per element, 'none').

The published formulation (tensor code, the benchmarks' baseline) is in :mod:`imbreg_fast.experiments.published`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["NaiveWeighted", "weighted_loss_naive", "element_loss", "flat"]


@dataclass
class NaiveWeighted:
    loss: float | list        # reduced loss, or the per-element list ('none')
    grad_pred: list           # d sum(g * loss) / d pred, per element
    loss_scale: float         # sum of |w l| over kept elements (an error scale for the reduced value)


def flat(x):
    """Tensor -> flat list of Python floats (or bools)."""
    return x.detach().cpu().reshape(-1).tolist()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _base(e: float, kind: str, beta: float):
    """(l, dl/de) of the unweighted, non-focal part."""
    a = abs(e)
    sign = 1.0 if e > 0 else (-1.0 if e < 0 else 0.0)
    if kind in ("mse", "focal_mse"):
        return e * e, 2.0 * e
    if kind in ("l1", "focal_l1"):
        return a, sign
    # Huber: 0.5 a^2 / beta if a < beta else a - 0.5 beta
    if a < beta:
        return 0.5 * a * a / beta, e / beta
    return a - 0.5 * beta, sign


def _focal(a: float, beta: float, gamma: float, activation: str):
    """(f, df/da): f = (2 sigmoid(beta a) - 1)^gamma or tanh(beta a)^gamma."""
    if activation == "sigmoid":
        sg = _sigmoid(beta * a)
        s = 2.0 * sg - 1.0
        ds = 2.0 * beta * sg * (1.0 - sg)
    else:
        s = math.tanh(beta * a)
        ds = beta * (1.0 - s * s)
    if s <= 0.0:
        # a = 0: f = 0^gamma (1 for gamma = 0); df/da multiplies l(0) = 0 in the loss' derivative: use 0.
        return (1.0 if gamma == 0 else 0.0), 0.0
    return s ** gamma, gamma * s ** (gamma - 1.0) * ds


def element_loss(e: float, kind: str, beta: float, gamma: float, activation: str):
    """(L, dL/de) of one unweighted element."""
    l, dl = _base(e, kind, beta)
    if kind not in ("focal_mse", "focal_l1"):
        return l, dl
    a = abs(e)
    sign = 1.0 if e > 0 else (-1.0 if e < 0 else 0.0)
    f, dfda = _focal(a, beta, gamma, activation)
    # d(l f)/de = dl/de f + l df/da sign(e)
    return l * f, dl * f + l * dfda * sign


def weighted_loss_naive(pred, target, weight, mask, kind, reduction, grad_output, *, beta=1.0, gamma=1.0,
                        activation="sigmoid") -> NaiveWeighted:
    n = len(pred)
    w = [1.0] * n if weight is None else list(weight)
    keep = [True] * n if mask is None else [bool(m) for m in mask]
    per = [0.0] * n
    dper = [0.0] * n
    kept, wsum, total, scale = 0, 0.0, 0.0, 0.0
    for i in range(n):
        if not keep[i]:
            continue
        l, dl = element_loss(pred[i] - target[i], kind, beta, gamma, activation)
        per[i] = w[i] * l
        dper[i] = w[i] * dl
        kept += 1
        wsum += w[i]
        total += per[i]
        scale += abs(per[i])
    if reduction == "none":
        return NaiveWeighted(per, [grad_output[i] * dper[i] for i in range(n)], scale)
    if reduction == "sum":
        c = 1.0
    elif reduction == "mean":
        c = 1.0 / kept if kept else 0.0
    else:
        c = 1.0 / wsum if wsum > 0 else 0.0
    return NaiveWeighted(total * c, [grad_output * c * d for d in dper], scale * c)
