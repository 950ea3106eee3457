"""Plain-loop Rank-N-Contrast oracle (Python floats, fp64-exact enough for small n): the definition as written,
no sorting, no log-sum-exp tricks beyond a per-denominator max."""
import math


def rnc_anchor_losses_naive(features, labels, temperature):
    """features: list of n lists (d floats), labels: list of n lists (L floats) -> list of n per-anchor losses
    l_i = (1 / (n - 1)) sum_{k != i} -log(e^{s_ik} / sum_{j != i, d_ij >= d_ik} e^{s_ij})."""
    n = len(features)
    if n < 2:
        return [0.0] * n

    def s(i, j):
        return -math.sqrt(sum((a - b) ** 2 for a, b in zip(features[i], features[j]))) / temperature

    def dist(i, j):
        return sum(abs(a - b) for a, b in zip(labels[i], labels[j]))

    out = []
    for i in range(n):
        total = 0.0
        for k in range(n):
            if k == i:
                continue
            den = [s(i, j) for j in range(n) if j != i and dist(i, j) >= dist(i, k)]
            m = max(den)
            log_z = m + math.log(sum(math.exp(v - m) for v in den))
            total += log_z - s(i, k)
        out.append(total / (n - 1))
    return out


def rnc_loss_naive(features, labels, temperature, reduction):
    """features [n, d], labels [n, L] as tensors (flattened already) -> float or list."""
    per = rnc_anchor_losses_naive(features.double().tolist(), labels.double().reshape(len(labels), -1).tolist(),
                                  temperature)
    if reduction == "none":
        return per
    return sum(per) if reduction == "sum" else (sum(per) / len(per) if per else 0.0)
