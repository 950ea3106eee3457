"""Plain-loop reference of RankSim (Python floats, small m): value and blackbox gradient.

Written from the definitions (docs/methods.md, RankSim), independent of the library:
- z_i = x_i / max(|x_i|, 1e-12), S_ij = z_i . z_j;
- rank(v)_j = (r_j + 1) / m, r_j = #{k: v_k > v_j} + #{k > j: v_k == v_j} (counted, no sort);
- L_i = mean_j (rank(S_i)_j - rank(-|y_i - y|)_j)^2; loss = sum / mean / per row;
- backward with incoming gradient g_i per row: G_ij = 2 g_i (R_f - R_y)_ij / m,
  dS_i = (rank(S_i + lam G_i) - rank(S_i)) / lam, dz_i = sum_j (dS_ij + dS_ji) z_j,
  dx_i = (dz_i - z_i (z_i . dz_i)) / |x_i| (|x_i| >= 1e-12; else dz_i / 1e-12).
"""
import math

EPS = 1e-12


def naive_rank(v):
    m = len(v)
    out = []
    for j in range(m):
        r = sum(1 for k in range(m) if v[k] > v[j]) + sum(1 for k in range(j + 1, m) if v[k] == v[j])
        out.append((r + 1) / m)
    return out


def ranksim_naive(x, y, lam, reduction="sum", grad_out=1.0):
    """x: list of m lists (d floats); y: list of m floats. Returns (loss, grad_x as a list of lists).

    grad_out: a float (the incoming gradient of the reduced loss) or, for 'none', a list of m floats."""
    m = len(x)
    d = len(x[0]) if m else 0
    norms = [math.sqrt(sum(v * v for v in row)) for row in x]
    z = [[v / max(n, EPS) for v in row] for row, n in zip(x, norms)]
    s = [[sum(z[i][k] * z[j][k] for k in range(d)) for j in range(m)] for i in range(m)]
    rf = [naive_rank(s[i]) for i in range(m)]
    ry = [naive_rank([-abs(y[i] - y[j]) for j in range(m)]) for i in range(m)]
    rows = [sum((rf[i][j] - ry[i][j]) ** 2 for j in range(m)) / m for i in range(m)]
    if reduction == "none":
        loss, g = rows, list(grad_out)
    elif reduction == "sum":
        loss, g = sum(rows), [grad_out] * m
    else:
        loss, g = (sum(rows) / m if m else 0.0), [grad_out / m] * m
    ds = []
    for i in range(m):
        # the definition's order of operations (ties of the perturbed row depend on its rounding)
        pert = [s[i][j] + lam * ((g[i] / m) * (2 * (rf[i][j] - ry[i][j]))) for j in range(m)]
        rp = naive_rank(pert)
        ds.append([(rp[j] - rf[i][j]) / lam for j in range(m)])
    gx = []
    for i in range(m):
        dz = [sum((ds[i][j] + ds[j][i]) * z[j][k] for j in range(m)) for k in range(d)]
        if norms[i] >= EPS:
            proj = sum(z[i][k] * dz[k] for k in range(d))
            gx.append([(dz[k] - z[i][k] * proj) / norms[i] for k in range(d)])
        else:
            gx.append([dz[k] / EPS for k in range(d)])
    return loss, gx
