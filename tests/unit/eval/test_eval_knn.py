"""Weighted k-NN probe against a brute-force double loop (the InstDisc/DINO vote), one k or
several from one search."""

from __future__ import annotations

import math

import pytest
import torch

from wildsight.eval import knn_predict, knn_probe, knn_probes, nearest_neighbours
from wildsight.eval.knn import knn_predict_many


def brute_force_knn(train_x, train_y, test_x, k: int, temperature: float, num_classes: int):
    """Plain Python loops in float64: cosine similarity, top-k, sum exp(s / T) per class."""
    train = [[float(v) for v in row] for row in train_x]
    labels = [int(v) for v in train_y]

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))

    predictions = []
    for row in test_x:
        query = [float(v) for v in row]
        sims = sorted(((cosine(query, t), i) for i, t in enumerate(train)), reverse=True)
        votes = [0.0] * num_classes
        for s, i in sims[:k]:
            votes[labels[i]] += math.exp(s / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return predictions


@pytest.mark.parametrize(
    "k, temperature, chunk_size", [(7, 0.1, 16), (1, 0.07, 1000), (20, 0.5, 7)]
)
def test_knn_matches_brute_force(k: int, temperature: float, chunk_size: int) -> None:
    g = torch.Generator().manual_seed(k)
    train_x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, 5, (300,), generator=g)
    test_x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    test_y = torch.randint(0, 5, (60,), generator=g)
    expected = brute_force_knn(train_x, train_y, test_x, k, temperature, 5)
    got = knn_predict(
        train_x, train_y, test_x, k=k, temperature=temperature, num_classes=5, chunk_size=chunk_size
    )
    assert got.tolist() == expected
    result = knn_probe(
        train_x, train_y, test_x, test_y, k=k, temperature=temperature, chunk_size=chunk_size
    )
    expected_top1 = sum(p == t for p, t in zip(expected, test_y.tolist(), strict=True)) / 60
    assert result.top1 == pytest.approx(expected_top1)
    assert result.params == {"k": k, "temperature": temperature}
    assert (result.num_train, result.num_test, result.feature_dim) == (300, 60, 8)
    assert math.isnan(result.val_top1) and result.to_dict()["val_top1"] is None


def test_knn_separated_clusters_are_perfect() -> None:
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(16)[:4] * 10  # 4 orthogonal class directions
    train_y = torch.arange(4).repeat(50)  # [200]
    test_y = torch.arange(4).repeat(25)  # [100]
    train_x = directions[train_y] + torch.randn(200, 16, generator=g)
    test_x = directions[test_y] + torch.randn(100, 16, generator=g)
    result = knn_probe(train_x, train_y, test_x, test_y, chunk_size=33)
    assert result.top1 == 1.0


def test_knn_float32_agrees_with_float64_and_k_is_cut_to_the_bank() -> None:
    g = torch.Generator().manual_seed(1)
    train_x, train_y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    test_x, test_y = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
    result = knn_probe(train_x, train_y, test_x, test_y, k=50, num_classes=3)
    assert result.params["k"] == 12
    assert result.top1 == knn_probe(train_x.double(), train_y, test_x.double(), test_y, k=12).top1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_y=torch.tensor([0, 1, -1, 1])), "every training image; 1 have none"),
        (dict(test_y=torch.tensor([0, -1])), "every test image; 1 have none"),
        (dict(test_y=torch.tensor([0, 1, 1])), "2 rows but labels have shape"),
        (dict(train_y=torch.tensor([1, 1, 1, 1])), "at least 2 classes"),
        (dict(test_x=torch.zeros(0, 3), test_y=torch.zeros(0, dtype=torch.long)), "empty test"),
        (dict(k=0), "k >= 1"),
        (dict(num_classes=1), "num_classes=1"),
    ],
)
def test_knn_rejects_bad_inputs(change: dict, message: str) -> None:
    inputs = dict(
        train_x=torch.randn(4, 3),
        train_y=torch.tensor([0, 1, 0, 1]),
        test_x=torch.randn(2, 3),
        test_y=torch.tensor([0, 1]),
    )
    with pytest.raises(ValueError, match=message):
        knn_probe(**{**inputs, **change})


def test_several_k_from_one_search_match_brute_force_for_each_k() -> None:
    g = torch.Generator().manual_seed(11)
    train_x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, 4, (200,), generator=g)
    test_x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    test_y = torch.randint(0, 4, (40,), generator=g)
    ks = [1, 5, 20, 500]  # 500 > N: cut to the whole bank
    results = knn_probes(train_x, train_y, test_x, test_y, ks=ks, temperature=0.1, chunk_size=9)
    assert [r.params["k"] for r in results] == [1, 5, 20, 200]
    many = knn_predict_many(train_x, train_y, test_x, ks=[1, 5, 20], temperature=0.1, num_classes=4)
    for result in results:
        k = result.params["k"]
        expected = brute_force_knn(train_x, train_y, test_x, k, 0.1, 4)
        assert result.predictions.tolist() == expected
        if k in many:
            assert many[k].tolist() == expected
        top1 = sum(p == t for p, t in zip(expected, test_y.tolist(), strict=True)) / 40
        assert result.top1 == pytest.approx(top1)
    # the single-k entry point agrees with the many-k one
    assert knn_probe(train_x, train_y, test_x, test_y, k=5, temperature=0.1).top1 == results[1].top1


def test_nearest_neighbours_are_the_brute_force_cosine_top_k() -> None:
    g = torch.Generator().manual_seed(12)
    bank, queries = torch.randn(50, 5, generator=g), torch.randn(7, 5, generator=g)
    sims, idx = nearest_neighbours(bank, queries, k=8, chunk_size=3)
    for q in range(7):
        cos = [
            float(torch.dot(queries[q], b) / (queries[q].norm() * b.norm())) for b in bank
        ]  # plain cosine per bank row
        order = sorted(range(50), key=lambda i: -cos[i])[:8]
        assert idx[q].tolist() == order
        torch.testing.assert_close(sims[q], torch.tensor([cos[i] for i in order]))
