"""Plain-loop reference of ConR (Python floats, fp64): value and d loss / d features.

Independent of the library: the definitions of docs/methods.md (ConR section) written out element by
element; the gradient from its own derivation (S_ij = z_i . z_j / tau, z = f / max(|f|, eps)).
"""
import math

EPS = 1e-12


def _rows(x):
    return [list(map(float, r)) for r in x.tolist()]


def conr_naive(features, targets, preds, weights=None, window=1.0, temperature=0.07, pushing=0.01,
               published_denominator=True, reduction="mean", grad_rows=None):
    """-> (loss: float or list ('none'), grad: list of rows) ; grad_rows: the incoming gradient per anchor for
    'none' (default all ones)."""
    f = _rows(features)
    y = [float(v) for v in targets.reshape(-1).tolist()]
    p = [float(v) for v in preds.reshape(-1).tolist()]
    n = len(f)
    d = len(f[0]) if n else 0
    om = [1.0] * n if weights is None else [float(v) for v in weights.reshape(-1).tolist()]
    norms = [math.sqrt(sum(v * v for v in r)) for r in f]
    z = [[v / max(nr, EPS) for v in r] for r, nr in zip(f, norms)]
    s = [[sum(z[i][c] * z[j][c] for c in range(d)) / temperature for j in range(n)] for i in range(n)]

    def is_pos(i, j):
        return j != i and abs(y[i] - y[j]) <= window

    def is_neg(i, j):
        return abs(y[i] - y[j]) > window and abs(p[i] - p[j]) <= window

    def a(i, j):
        if is_pos(i, j):
            return 1.0
        if is_neg(i, j):
            return om[i] * math.exp(pushing * abs(y[i] - y[j]))
        return 0.0

    rows, dens, npos, valid = [], [], [], []
    for i in range(n):
        P = [j for j in range(n) if is_pos(i, j)]
        N = [j for j in range(n) if is_neg(i, j)]
        ok = len(P) > 0 and len(N) > 0
        D = sum(a(i, j) * math.exp(s[i][j]) for j in range(n)) + ((n - len(P)) if published_denominator else 0)
        l = (math.log(D) - sum(s[i][j] for j in P) / len(P)) if ok else 0.0
        rows.append(om[i] * l)
        dens.append(D)
        npos.append(len(P))
        valid.append(ok)
    if reduction == "none":
        loss, c = rows, [om[i] * (1.0 if grad_rows is None else float(grad_rows[i])) for i in range(n)]
    elif reduction == "sum":
        loss, c = sum(rows), list(om)
    else:
        loss, c = sum(rows) / max(n, 1), [w / n for w in om]
    c = [ci if valid[i] else 0.0 for i, ci in enumerate(c)]

    def G(i, j):   # d l_i / d S_ij
        if not valid[i]:
            return 0.0
        return a(i, j) * math.exp(s[i][j]) / dens[i] - (1.0 / npos[i] if is_pos(i, j) else 0.0)

    grad = []
    for k in range(n):
        gz = [0.0] * d
        for j in range(n):
            h = c[k] * G(k, j) + c[j] * G(j, k)
            for q in range(d):
                gz[q] += h * z[j][q] / temperature
        if norms[k] > EPS:
            dot = sum(z[k][q] * gz[q] for q in range(d))
            grad.append([(gz[q] - z[k][q] * dot) / norms[k] for q in range(d)])
        else:
            grad.append([g / EPS for g in gz])
    return loss, grad
