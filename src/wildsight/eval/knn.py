"""Weighted k-NN probe on frozen features (Wu et al., 2018, InstDisc; the DINO protocol).

"We use the cosine similarity ... each of the top k nearest neighbours votes for its class
with weight exp(s_i / tau)" -- predicted class = argmax_c sum_{i in top-k, y_i = c} exp(s_i / T).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wildsight.eval.linear import check_probe_inputs
from wildsight.eval.report import ProbeResult, top1_accuracy


def nearest_neighbours(
    bank_x: Tensor, query_x: Tensor, *, k: int, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Cosine top-k of each query: (similarities [M, k] descending, bank indices int64 [M, k]).

    bank_x [N, D] and query_x [M, D] are L2-normalised here; at most [chunk_size, N] scores
    exist at once. float64 inputs stay float64, anything else runs in float32.
    """
    dtype = torch.float64 if bank_x.dtype == torch.float64 else torch.float32
    bank = F.normalize(bank_x.to(dtype), dim=1)  # [N, D], unit rows
    sims_parts, idx_parts = [], []
    for start in range(0, query_x.shape[0], chunk_size):
        query = F.normalize(query_x[start : start + chunk_size].to(bank.device, dtype), dim=1)
        top_sims, top_idx = (query @ bank.T).topk(k, dim=1)  # [C, k] each, sorted descending
        sims_parts.append(top_sims)
        idx_parts.append(top_idx)
    return torch.cat(sims_parts), torch.cat(idx_parts)


def knn_predict_many(
    train_x: Tensor,
    train_y: Tensor,
    query_x: Tensor,
    *,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """{k: class predictions int64 [M]} for every k in ks, from ONE top-max(ks) search.

    The top-k of a query are the first k of its top-max(ks) (sorted by similarity), so each k
    gets exactly the vote it would get alone. Ties between classes go to the lowest index.
    """
    top_sims, top_idx = nearest_neighbours(
        train_x, query_x, k=max(ks), chunk_size=chunk_size
    )  # [M, k_max] each
    weights = (top_sims / temperature).exp()  # [M, k_max], exp(s_i / T)
    top_labels = train_y.to(device=top_idx.device, dtype=torch.long)[top_idx]  # [M, k_max]
    out = {}
    for k in ks:
        votes = torch.zeros(
            weights.shape[0], num_classes, dtype=weights.dtype, device=weights.device
        )
        votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])  # [M, num_classes]
        out[k] = votes.argmax(dim=1)  # [M]
    return out


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
    return knn_predict_many(
        train_x, train_y, query_x, ks=[k], temperature=temperature,
        num_classes=num_classes, chunk_size=chunk_size,
    )[k]  # fmt: skip


def knn_probes(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    ks: Sequence[int] = (10, 20, 100),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> list[ProbeResult]:
    """Weighted k-NN accuracy of test_x [M, D] against the bank train_x [N, D], one result per k.

    One similarity search serves every k (see ``knn_predict_many``). k and the temperature are
    given, not chosen, so there is no validation accuracy: val_top1 is NaN (``to_dict`` writes
    it as null). A k larger than N is cut to N and the k used is recorded in params.
    ``device`` (default: where train_x lives) runs the search.
    """
    train_x, train_y, test_x, test_y = check_probe_inputs(
        "k-NN probe", train_x, train_y, test_x, test_y
    )
    if not ks or min(ks) < 1:
        raise ValueError(f"k-NN probe needs every k >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"k-NN probe needs temperature > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"k-NN probe needs chunk_size >= 1, got {chunk_size}")
    top_label = int(train_y.max())
    if num_classes is None:
        num_classes = top_label + 1
    elif top_label >= num_classes:
        raise ValueError(f"k-NN probe got training label {top_label} but num_classes={num_classes}")
    used = list(dict.fromkeys(min(int(k), int(train_x.shape[0])) for k in ks))  # ordered, unique
    if device is not None:
        train_x = train_x.to(device)
    predictions = knn_predict_many(
        train_x, train_y, test_x, ks=used, temperature=temperature,
        num_classes=num_classes, chunk_size=chunk_size,
    )  # fmt: skip
    results = []
    for k in used:
        predicted = predictions[k].cpu()  # [M]
        results.append(
            ProbeResult(
                top1=top1_accuracy(predicted, test_y),
                val_top1=float("nan"),
                params={"k": k, "temperature": float(temperature)},
                num_train=int(train_x.shape[0]),
                num_test=int(test_x.shape[0]),
                feature_dim=int(train_x.shape[1]),
                predictions=predicted,
            )
        )
    return results


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
    """Weighted k-NN accuracy for one k (``knn_probes`` with ks=[k])."""
    if k < 1:
        raise ValueError(f"k-NN probe needs k >= 1, got {k}")
    return knn_probes(
        train_x, train_y, test_x, test_y, ks=[k], temperature=temperature,
        num_classes=num_classes, chunk_size=chunk_size, device=device,
    )[0]  # fmt: skip
