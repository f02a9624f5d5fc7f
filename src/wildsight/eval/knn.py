"""Weighted k-NN probe on frozen features (Wu et al., 2018, InstDisc; the DINO protocol).

"We use the cosine similarity ... each of the top k nearest neighbours votes for its class
with weight exp(s_i / tau)" -- predicted class = argmax_c sum_{i in top-k, y_i = c} exp(s_i / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wildsight.eval.linear import check_probe_inputs
from wildsight.eval.report import ProbeResult


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    query_x: Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> Tensor:
    """Class predictions int64 [M] for query_x [M, D] from the bank train_x [N, D], train_y [N].

    Both sides are L2-normalised; similarities are computed ``chunk_size`` queries at a time, so
    at most [chunk_size, N] scores exist at once. float64 inputs stay float64, anything else
    runs in float32. Ties between classes go to the lowest class index.
    """
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    bank = F.normalize(train_x.to(dtype), dim=1)  # [N, D], unit rows
    labels = train_y.to(device=bank.device, dtype=torch.long)  # [N]
    predictions = []
    for start in range(0, query_x.shape[0], chunk_size):
        query = F.normalize(query_x[start : start + chunk_size].to(bank.device, dtype), dim=1)
        sims = query @ bank.T  # [C, N], cosine similarities in [-1, 1]
        top_sims, top_idx = sims.topk(k, dim=1)  # [C, k] each
        weights = (top_sims / temperature).exp()  # [C, k]
        votes = torch.zeros(query.shape[0], num_classes, dtype=dtype, device=bank.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # [C, num_classes]
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)  # [M]


def knn_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Weighted k-NN accuracy of test_x [M, D] against the labelled bank train_x [N, D].

    k and the temperature are given, not chosen, so there is no validation accuracy:
    val_top1 is NaN (``to_dict`` writes it as null). A k larger than N is cut to N and the k
    used is recorded in params. ``device`` (default: where train_x lives) runs the search.
    """
    train_x, train_y, test_x, test_y = check_probe_inputs(
        "k-NN probe", train_x, train_y, test_x, test_y
    )
    if k < 1:
        raise ValueError(f"k-NN probe needs k >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"k-NN probe needs temperature > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"k-NN probe needs chunk_size >= 1, got {chunk_size}")
    top_label = int(train_y.max())
    if num_classes is None:
        num_classes = top_label + 1
    elif top_label >= num_classes:
        raise ValueError(f"k-NN probe got training label {top_label} but num_classes={num_classes}")
    k = min(k, int(train_x.shape[0]))
    if device is not None:
        train_x = train_x.to(device)
    predictions = knn_predict(
        train_x,
        train_y,
        test_x,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    return ProbeResult(
        top1=float((predictions.cpu() == test_y.cpu()).double().mean()),
        val_top1=float("nan"),
        params={"k": k, "temperature": float(temperature)},
        num_train=int(train_x.shape[0]),
        num_test=int(test_x.shape[0]),
        feature_dim=int(train_x.shape[1]),
    )
