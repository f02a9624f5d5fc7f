"""Independent float64 re-computations of the pretext-task losses, one explicit loop per
triplet or copy, written from the papers' definitions; they share no code with wildsight."""

import math

import numpy as np


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True))


def _sq_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum())


def triplet_reference(emb: np.ndarray, labels: list[int], margin: float, mining: str) -> float:
    """FaceNet semi-hard / Hermans batch-hard / batch-all triplet loss, squared distances of
    L2-normalised rows, by brute force over anchors, positives and negatives."""
    z = _normalise_rows(emb)
    n = len(labels)
    d = [[_sq_dist(z[i], z[j]) for j in range(n)] for i in range(n)]
    costs = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [m for m in range(n) if labels[m] != labels[a]]
        if not positives:
            continue
        if mining == "hard":
            worst_p = max(d[a][p] for p in positives)
            worst_n = min(d[a][m] for m in negatives)
            costs.append(max(0.0, worst_p - worst_n + margin))
            continue
        for p in positives:
            if mining == "all":
                costs.extend(max(0.0, d[a][p] - d[a][m] + margin) for m in negatives)
                continue
            farther = [d[a][m] for m in negatives if d[a][m] > d[a][p]]
            d_neg = min(farther) if farther else max(d[a][m] for m in negatives)
            costs.append(max(0.0, d[a][p] - d_neg + margin))
    return sum(costs) / len(costs)


def exemplar_classification_reference(emb: np.ndarray, temperature: float) -> float:
    """emb [V, B, D]: copy (v, i) against the mean direction of each image's copies, its own
    image's mean taken over the other V - 1 copies; softmax cross-entropy, mean over copies."""
    z = _normalise_rows(emb)
    copies, batch = z.shape[:2]
    total = 0.0
    for v in range(copies):
        for i in range(batch):
            logits = []
            for j in range(batch):
                members = [z[u, j] for u in range(copies) if not (j == i and u == v)]
                centre = sum(members) / len(members)
                cos = float(z[v, i] @ centre) / math.sqrt(float(centre @ centre))
                logits.append(cos / temperature)
            top = max(logits)
            log_norm = top + math.log(sum(math.exp(x - top) for x in logits))
            total += log_norm - logits[i]
    return total / (copies * batch)
