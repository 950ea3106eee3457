"""The Balanced MSE losses computed the way the published code computes them (jiawei-ren/BalancedMSE).

Sources: ``imdb-wiki-dir/balanaced_mse.py`` and ``nyud2-dir/balanaced_mse.py`` (1-D BMC, GAI, BNI, as used
in the experiments), ``synthetic_benchmark/loss.py`` and the README (multi-dimensional BMC through
``MultivariateNormal``). The functions keep the published formulation: the same torch calls
(``F.mse_loss``, ``F.cross_entropy``, ``torch.logsumexp``, ``MVN.log_prob``), the same materialised
tensors (``[N, N]`` logits, ``[N, K]`` balancing terms built with ``expand`` / ``repeat``), the mean
reduction and the ``(2 * noise_var).detach()`` rescaling. They are

- the baselines of ``bench/bench_balanced_mse.py`` (eager, and the same functions under ``torch.compile``);
- a test oracle that is a different formulation from ours (``tests/test_balanced_mse.py``).

``bmc_loss_candidates_published`` is not in the published code: it is our candidates extension
(docs/methods.md §1.1) written in the same materialising style, the baseline of the dense BMC benchmark.

Deviations from the published code, none of which changes a value:

- Device: the published code hard-codes ``.cuda()`` (class labels ``torch.arange(N).cuda()``, the GMM and
  bucket tensors); here everything lives on ``pred``'s device.
- Dtype: the published GAI loads its GMM from a joblib file written by sklearn, i.e. numpy float64 arrays
  converted with ``torch.tensor``; ``pred - means`` then silently promotes the balancing term, the loss
  and the backward through the ``[N, K]`` tensors to float64 for an fp32 network. These functions cast the
  mixture / bin parameters to ``pred``'s dtype and so compute in the inputs' dtype; pass float64 inputs to
  reproduce the published numerics. Likewise the published multi-dimensional code builds
  ``torch.eye(d)`` in the default dtype; here it has ``pred``'s dtype.
- Shapes: the published functions take ``[N, 1]`` (``[N, d]`` for the MD version); a 1-D ``[N]`` input is
  viewed as ``[N, 1]`` here (with ``[N]`` the published ``pred - target.T`` would silently compute an
  element-wise difference). ``noise_var`` may be a float (the published code needs a tensor).
- BMC logits: the dataset code writes ``- 0.5 * (pred - target.T).pow(2) / noise_var`` and the README
  ``- (pred - target.T).pow(2) / (2 * noise_var)``; we follow the dataset code (same value to rounding).

At N = 1 the BMC loss is exactly 0 (one logit, the positive).

The formula lines follow the published code (MIT License, Copyright (c) 2022 Jiawei Ren) so that the
numerics and the memory traffic are those of the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal as MVN

__all__ = ["bmc_loss_published", "bmc_loss_md_published", "bmc_loss_candidates_published",
           "gai_loss_published", "bni_loss_published"]


def _column(x: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1]; [N, 1] unchanged."""
    if x.dim() == 1:
        return x.reshape(-1, 1)
    if x.dim() != 2 or x.shape[1] != 1:
        raise ValueError(f"expected a [N] or [N, 1] tensor (the published 1-D code), got {tuple(x.shape)}")
    return x


def _noise_var(noise_var, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(noise_var, torch.Tensor):
        return noise_var
    return torch.tensor(float(noise_var), dtype=ref.dtype, device=ref.device)


def bmc_loss_published(pred, target, noise_var):
    """Published 1-D BMC: ``[N, 1]`` pred/target, ``[N, N]`` logits, cross-entropy with labels arange(N)."""
    pred, target = _column(pred), _column(target)
    noise_var = _noise_var(noise_var, pred)
    logits = - 0.5 * (pred - target.T).pow(2) / noise_var                       # [N, N]
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def bmc_loss_md_published(pred, target, noise_var):
    """Published multi-dimensional BMC: ``[N, d]``; logits = MVN(pred_i, noise_var I).log_prob(target_j),
    evaluated over a broadcast ``[N, N, d]`` batch."""
    noise_var = _noise_var(noise_var, pred)
    I = torch.eye(pred.shape[-1], dtype=pred.dtype, device=pred.device)
    logits = MVN(pred.unsqueeze(1), noise_var * I).log_prob(target.unsqueeze(0))  # [N, N]
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def bmc_loss_candidates_published(pred, target, candidates, noise_var):
    """BMC against a separate candidate set, materialising style: row i's logits ``[1 + M]`` are its own
    target (class 0) followed by the M candidates; cross-entropy with labels zeros(N).

    d = 1: pred/target ``[N]`` or ``[N, 1]``, candidates ``[M]`` or ``[M, 1]`` (logits as the published 1-D
    BMC). d > 1: pred/target ``[N, d]``, candidates ``[M, d]``, logits from ``MVN.log_prob`` as the published
    multi-dimensional BMC (its normalising constant is the same for every logit and cancels).
    """
    noise_var = _noise_var(noise_var, pred)
    n = pred.shape[0]
    if pred.dim() == 1 or pred.shape[-1] == 1:
        pred, target, candidates = _column(pred), _column(target), _column(candidates)
        positive = - 0.5 * (pred - target).pow(2) / noise_var                    # [N, 1]
        negative = - 0.5 * (pred - candidates.T).pow(2) / noise_var              # [N, M]
    else:
        I = torch.eye(pred.shape[-1], dtype=pred.dtype, device=pred.device)
        positive = MVN(pred, noise_var * I).log_prob(target).unsqueeze(1)        # [N, 1]
        negative = MVN(pred.unsqueeze(1), noise_var * I).log_prob(candidates.unsqueeze(0))  # [N, M]
    logits = torch.cat([positive, negative], dim=1)                              # [N, 1 + M]
    loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def gai_loss_published(pred, target, noise_var, gmm_weights, gmm_means, gmm_vars):
    """Published 1-D GAI: ``[N, 1]`` pred/target, mixture ``weights``, ``means``, ``variances`` of K
    components (any shape with K elements, e.g. sklearn's ``[K]``, ``[K, 1]``, ``[K, 1, 1]``), expanded to
    ``[N, K]``. Computes in pred's dtype (the published code runs in float64: see the module docstring)."""
    pred, target = _column(pred), _column(target)
    noise_var = _noise_var(noise_var, pred)
    gmm = {"weights": gmm_weights, "means": gmm_means, "variances": gmm_vars}
    gmm = {k: v.to(dtype=pred.dtype, device=pred.device) for k, v in gmm.items()}
    gmm = {k: gmm[k].reshape(1, -1).expand(pred.shape[0], -1) for k in gmm}     # [N, K]
    mse_term = F.mse_loss(pred, target, reduction='none') / 2 / noise_var + 0.5 * noise_var.log()
    sum_var = gmm['variances'] + noise_var
    balancing_term = - 0.5 * sum_var.log() - 0.5 * (pred - gmm['means']).pow(2) / sum_var + gmm['weights'].log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()
    return loss.mean()


def bni_loss_published(pred, target, noise_var, bin_centers, bin_weights):
    """Published BNI: ``[N, 1]`` pred/target, bucket centres and weights ``[K]`` repeated to ``[N, K]``."""
    pred, target = _column(pred), _column(target)
    noise_var = _noise_var(noise_var, pred)
    bucket_centers = bin_centers.to(dtype=pred.dtype, device=pred.device).reshape(-1)
    bucket_weights = bin_weights.to(dtype=pred.dtype, device=pred.device).reshape(-1)
    mse_term = F.mse_loss(pred, target, reduction='none') / 2 / noise_var

    num_bucket = bucket_centers.shape[0]
    bucket_center = bucket_centers.unsqueeze(0).repeat(pred.shape[0], 1)        # [N, K]
    bucket_weights = bucket_weights.unsqueeze(0).repeat(pred.shape[0], 1)       # [N, K]

    balancing_term = - 0.5 * (pred.expand(-1, num_bucket) - bucket_center).pow(2) / noise_var + bucket_weights.log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()
    return loss.mean()
