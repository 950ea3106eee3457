"""Independent oracle for the Balanced MSE family (docs/methods.md §1): BMC, GAI, BNI.

Plain Python loops over rows and candidates/components on Python floats (``math``), never the code under
test. Each loss comes with its analytic gradients w.r.t. pred and sigma^2, written from the formulas of
docs/methods.md, so the tests can compare values and gradients of every backend to it.

Layouts follow the public API: pred/target ``[N]``, ``[N, d]`` or dense ``[B, 1, H, W]`` (rows = pixels);
mask of the target's shape (per row, ``[N]``, for ``[N, d]``). Reductions: 'mean' over kept rows (0 when
no row is kept), 'sum', 'none' (one value per row, 0 on dropped rows).

Every function returns a :class:`NaiveResult` for the reduced loss multiplied by an upstream gradient
``grad_output`` (a float for 'mean'/'sum', one float per row for 'none'), i.e. the gradients are those of
``sum(grad_output * loss)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["NaiveResult", "bmc_naive", "gai_naive", "bni_naive", "to_rows"]


@dataclass
class NaiveResult:
    loss: float | list          # reduced loss (float) or per-row losses ('none', flattened rows)
    grad_pred: list             # [N][d]: d sum(g * loss) / d pred
    grad_var: float             # d sum(g * loss) / d sigma^2


def to_rows(x):
    """Tensor [N] | [N, d] | [B, 1, H, W] -> list of N rows (lists of d Python floats)."""
    if x.dim() == 2:
        n, d = x.shape
    else:
        n, d = x.numel(), 1
    flat = x.detach().cpu().double().reshape(-1).tolist()
    return [flat[i * d:(i + 1) * d] for i in range(n)]


def _mask_rows(mask, n):
    if mask is None:
        return [True] * n
    flags = mask.detach().cpu().reshape(-1).tolist()
    assert len(flags) == n
    return [bool(f) for f in flags]


def _sqdist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def _logsumexp_softmax(logits):
    m = max(logits)
    exps = [math.exp(v - m) for v in logits]
    z = sum(exps)
    return m + math.log(z), [e / z for e in exps]


# ----------------------------------------------------------------------------------------------------
# Per-row losses: (L_i, dL_i/dpred_i [d], dL_i/dsigma^2), L_i including the sg(2 sigma^2) factor.
# ----------------------------------------------------------------------------------------------------


def _bmc_row(p, y_pos, cands, pos_index, s2):
    # l_j = -|p - y_j|^2 / (2 s2);  L = 2 s2 (-l_pos + LSE_j l_j)
    # dL/dp = 2 (sum_j s_j y_j - y_pos);  dL/ds2 = 2 (l_pos - sum_j s_j l_j)
    logits = [-_sqdist(p, c) / (2.0 * s2) for c in cands]
    lse, soft = _logsumexp_softmax(logits)
    loss = 2.0 * s2 * (-logits[pos_index] + lse)
    d = len(p)
    grad_p = [2.0 * (sum(soft[j] * cands[j][c] for j in range(len(cands))) - y_pos[c]) for c in range(d)]
    grad_s2 = 2.0 * (logits[pos_index] - sum(s * l for s, l in zip(soft, logits)))
    return loss, grad_p, grad_s2


def _gai_row_1d(p, y, s2, phis, mus, vs):
    # L = 2 s2 [ (p-y)^2/(2 s2) + 1/2 log s2 + LSE_k(log phi_k - 1/2 log(v_k+s2) - (p-mu_k)^2/(2(v_k+s2))) ]
    # dL/dp  = 2 s2 [ (p-y)/s2 - sum_k r_k (p-mu_k)/s_k ]
    # dL/ds2 = 2 s2 [ -(p-y)^2/(2 s2^2) + 1/(2 s2) + sum_k r_k ((p-mu_k)^2/(2 s_k^2) - 1/(2 s_k)) ]
    sks = [v + s2 for v in vs]
    logits = [math.log(phi) - 0.5 * math.log(sk) - (p - mu) ** 2 / (2.0 * sk) for phi, mu, sk in zip(phis, mus, sks)]
    lse, r = _logsumexp_softmax(logits)
    loss = 2.0 * s2 * ((p - y) ** 2 / (2.0 * s2) + 0.5 * math.log(s2) + lse)
    grad_p = 2.0 * s2 * ((p - y) / s2 - sum(rk * (p - mu) / sk for rk, mu, sk in zip(r, mus, sks)))
    grad_s2 = 2.0 * s2 * (-(p - y) ** 2 / (2.0 * s2 * s2) + 1.0 / (2.0 * s2)
                          + sum(rk * ((p - mu) ** 2 / (2.0 * sk * sk) - 1.0 / (2.0 * sk))
                                for rk, mu, sk in zip(r, mus, sks)))
    return loss, [grad_p], grad_s2


def _cholesky(a):
    n = len(a)
    low = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = a[i][j] - sum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                assert s > 0, "matrix is not positive definite"
                low[i][j] = math.sqrt(s)
            else:
                low[i][j] = s / low[j][j]
    return low


def _spd_inverse_logdet(a):
    """Inverse and log-determinant of a small SPD matrix (Cholesky, then solve column by column)."""
    n = len(a)
    low = _cholesky(a)
    logdet = 2.0 * sum(math.log(low[i][i]) for i in range(n))
    inv_cols = []
    for col in range(n):
        e = [1.0 if i == col else 0.0 for i in range(n)]
        z = [0.0] * n                                    # L z = e
        for i in range(n):
            z[i] = (e[i] - sum(low[i][k] * z[k] for k in range(i))) / low[i][i]
        x = [0.0] * n                                    # L^T x = z
        for i in reversed(range(n)):
            x[i] = (z[i] - sum(low[k][i] * x[k] for k in range(i + 1, n))) / low[i][i]
        inv_cols.append(x)
    inv = [[inv_cols[j][i] for j in range(n)] for i in range(n)]
    return inv, logdet


def _gai_row_md(p, y, s2, phis, mus, covs):
    # L = 2 s2 [ -log N(y; p, s2 I) + LSE_k(log phi_k + log N(p; mu_k, S_k)) ],  S_k = Sigma_k + s2 I, P_k = S_k^-1
    # -log N(y; p, s2 I) = |p-y|^2/(2 s2) + d/2 log(2 pi s2)
    # log N(p; mu, S)    = -1/2 delta^T P delta - 1/2 logdet S - d/2 log(2 pi),  delta = p - mu
    # dL/dp  = 2 (p - y) - 2 s2 sum_k r_k P_k delta_k
    # dL/ds2 = 2 s2 [ -|p-y|^2/(2 s2^2) + d/(2 s2) + sum_k r_k (1/2 |P_k delta_k|^2 - 1/2 tr P_k) ]
    d = len(p)
    logits, alphas, traces = [], [], []
    for phi, mu, cov in zip(phis, mus, covs):
        s = [[cov[i][j] + (s2 if i == j else 0.0) for j in range(d)] for i in range(d)]
        prec, logdet = _spd_inverse_logdet(s)
        delta = [p[i] - mu[i] for i in range(d)]
        alpha = [sum(prec[i][j] * delta[j] for j in range(d)) for i in range(d)]
        maha = sum(delta[i] * alpha[i] for i in range(d))
        logits.append(math.log(phi) - 0.5 * maha - 0.5 * logdet - 0.5 * d * math.log(2.0 * math.pi))
        alphas.append(alpha)
        traces.append(sum(prec[i][i] for i in range(d)))
    lse, r = _logsumexp_softmax(logits)
    e = _sqdist(p, y)
    loss = 2.0 * s2 * (e / (2.0 * s2) + 0.5 * d * math.log(2.0 * math.pi * s2) + lse)
    grad_p = [2.0 * (p[c] - y[c]) - 2.0 * s2 * sum(rk * a[c] for rk, a in zip(r, alphas)) for c in range(d)]
    grad_s2 = 2.0 * s2 * (-e / (2.0 * s2 * s2) + d / (2.0 * s2)
                          + sum(rk * (0.5 * sum(v * v for v in a) - 0.5 * tr) for rk, a, tr in zip(r, alphas, traces)))
    return loss, grad_p, grad_s2


def _bni_row(p, y, s2, phis, centers):
    # L = 2 s2 [ |p-y|^2/(2 s2) + LSE_k(log phi_k - |p-c_k|^2/(2 s2)) ]
    # dL/dp  = 2 (p - y) - 2 sum_k r_k (p - c_k)
    # dL/ds2 = -|p-y|^2/s2 + sum_k r_k |p-c_k|^2/s2
    # an empty bin (phi = 0) has no term
    centers = [c for phi, c in zip(phis, centers) if phi > 0]
    logits = [math.log(phi) - _sqdist(p, c) / (2.0 * s2) for phi, c in zip([f for f in phis if f > 0], centers)]
    lse, r = _logsumexp_softmax(logits)
    e = _sqdist(p, y)
    loss = 2.0 * s2 * (e / (2.0 * s2) + lse)
    d = len(p)
    grad_p = [2.0 * (p[c] - y[c]) - 2.0 * sum(rk * (p[c] - ck[c]) for rk, ck in zip(r, centers)) for c in range(d)]
    grad_s2 = -e / s2 + sum(rk * _sqdist(p, ck) for rk, ck in zip(r, centers)) / s2
    return loss, grad_p, grad_s2


# ----------------------------------------------------------------------------------------------------
# Reduction and upstream gradient
# ----------------------------------------------------------------------------------------------------


def _reduce(per_row, kept, d, reduction, grad_output):
    """per_row: {i: (L_i, dL_i/dp_i, dL_i/ds2)} over kept rows i."""
    n = len(kept)
    count = sum(kept)
    grad_pred = [[0.0] * d for _ in range(n)]
    if reduction == "none":
        g = list(grad_output) if isinstance(grad_output, (list, tuple)) else [float(grad_output)] * n
        assert len(g) == n
        weights = g
    elif reduction in ("mean", "sum"):
        g = float(grad_output)
        w = (1.0 / count if count else 0.0) if reduction == "mean" else 1.0
        weights = [g * w] * n
    else:
        raise ValueError(reduction)
    grad_var = 0.0
    for i, (_, gp, gv) in per_row.items():
        grad_pred[i] = [weights[i] * v for v in gp]
        grad_var += weights[i] * gv
    if reduction == "none":
        loss = [per_row[i][0] if kept[i] else 0.0 for i in range(n)]
    else:
        unit = (1.0 / count if count else 0.0) if reduction == "mean" else 1.0
        loss = sum(unit * v[0] for v in per_row.values())
    return NaiveResult(loss, grad_pred, grad_var)


def _float(x):
    return float(x.detach().double()) if hasattr(x, "detach") else float(x)


def bmc_naive(pred, target, noise_var, *, candidates=None, mask=None, reduction="mean", grad_output=1.0):
    """BMC (docs/methods.md §1.1): candidates = the kept targets, or {target_i} U candidates ([M, d] or [M])."""
    p_rows, t_rows = to_rows(pred), to_rows(target)
    n, d = len(p_rows), len(p_rows[0]) if p_rows else 1
    kept = _mask_rows(mask, n)
    s2 = _float(noise_var)
    kept_idx = [i for i in range(n) if kept[i]]
    extra = None
    if candidates is not None:
        extra = [candidates.detach().double().reshape(-1, d)[j].tolist() for j in range(candidates.numel() // d)]
    per_row = {}
    for i in kept_idx:
        if extra is None:
            cands = [t_rows[j] for j in kept_idx]
            pos = kept_idx.index(i)
        else:
            cands = [t_rows[i]] + extra
            pos = 0
        per_row[i] = _bmc_row(p_rows[i], t_rows[i], cands, pos, s2)
    return _reduce(per_row, kept, d, reduction, grad_output)


def gai_naive(pred, target, noise_var, weights, means, covariances, *, mask=None, reduction="mean",
              grad_output=1.0):
    """GAI (docs/methods.md §1.2): d = 1 form without the 2 pi constants, full MVN form for d > 1.

    ``weights [K]``, ``means [K, d]`` (or ``[K]``), ``covariances [K, d, d]`` (or variances ``[K]`` for d = 1).
    """
    p_rows, t_rows = to_rows(pred), to_rows(target)
    n, d = len(p_rows), len(p_rows[0]) if p_rows else 1
    kept = _mask_rows(mask, n)
    s2 = _float(noise_var)
    k = weights.numel()
    phis = weights.detach().double().reshape(-1).tolist()
    mus = means.detach().double().reshape(k, d).tolist()
    covs = covariances.detach().double().reshape(k, d, d).tolist()
    per_row = {}
    for i in range(n):
        if not kept[i]:
            continue
        if d == 1:
            per_row[i] = _gai_row_1d(p_rows[i][0], t_rows[i][0], s2, phis, [m[0] for m in mus],
                                     [c[0][0] for c in covs])
        else:
            per_row[i] = _gai_row_md(p_rows[i], t_rows[i], s2, phis, mus, covs)
    return _reduce(per_row, kept, d, reduction, grad_output)


def bni_naive(pred, target, noise_var, bin_centers, bin_weights, *, mask=None, reduction="mean", grad_output=1.0):
    """BNI (docs/methods.md §1.3): ``bin_centers [K, d]`` (or ``[K]``), ``bin_weights [K]``."""
    p_rows, t_rows = to_rows(pred), to_rows(target)
    n, d = len(p_rows), len(p_rows[0]) if p_rows else 1
    kept = _mask_rows(mask, n)
    s2 = _float(noise_var)
    k = bin_weights.numel()
    phis = bin_weights.detach().double().reshape(-1).tolist()
    centers = bin_centers.detach().double().reshape(k, d).tolist()
    per_row = {i: _bni_row(p_rows[i], t_rows[i], s2, phis, centers) for i in range(n) if kept[i]}
    return _reduce(per_row, kept, d, reduction, grad_output)
