"""Independent float64 NumPy re-computations of SwAV's Sinkhorn and swapped-prediction loss.

Written from the paper's equations with explicit loops, sharing no code with wildsight.
"""

import numpy as np


def sinkhorn_reference(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Alternating normalisation of Q = exp(scores/eps)^T [K, B] (SwAV Algorithm / Cuturi 2013)."""
    q = np.exp(scores.astype(np.float64) / epsilon).T  # [K, B]
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row, :] = q[row, :] / q[row, :].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    return (q * b).T  # [B, K]


def swav_loss_reference(
    scores: list[np.ndarray], num_global: int, temperature: float, epsilon: float, iterations: int
) -> float:
    total = 0.0
    for i in range(num_global):
        codes = sinkhorn_reference(scores[i], epsilon, iterations)
        per_crop = []
        for v, s in enumerate(scores):
            if v == i:
                continue
            z = s.astype(np.float64) / temperature
            log_p = (
                z
                - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
                - z.max(1, keepdims=True)
            )
            per_crop.append(np.mean([-np.dot(codes[b], log_p[b]) for b in range(s.shape[0])]))
        total += float(np.mean(per_crop))
    return total / num_global
