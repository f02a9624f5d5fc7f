"""Pretext-task losses against explicit float64 loops (tests/reference/pretext_loops.py)."""

import math

import numpy as np
import pytest
import torch

from tests.reference.pretext_loops import exemplar_classification_reference, triplet_reference
from wildsight.losses import (
    classification_accuracy,
    exemplar_classification_loss,
    pretext_classification_loss,
    triplet_loss,
)


def _copies(num_images=5, num_copies=3, dim=6, spread=0.6, seed=0):
    """Embeddings [V B, D] of V noisy copies of B images, labels [V B] = image index."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_images, dim, generator=g, dtype=torch.float64)
    emb = centres.repeat(num_copies, 1) + spread * torch.randn(
        num_copies * num_images, dim, generator=g, dtype=torch.float64
    )
    return emb, torch.arange(num_images).repeat(num_copies)


@pytest.mark.parametrize("mining", ["semihard", "hard", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_loss_matches_explicit_loops(mining, seed):
    emb, labels = _copies(seed=seed)
    got = triplet_loss(emb, labels, margin=0.5, mining=mining)
    want = triplet_reference(emb.numpy(), labels.tolist(), margin=0.5, mining=mining)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_triplet_semihard_with_uneven_classes_and_fallback_negative():
    # 5, 3 and 4 copies of three images with wide noise: 32 (anchor, positive) pairs have a
    # negative farther than the positive and 6 have none (the farthest-negative fallback)
    emb, _ = _copies(num_images=3, num_copies=4, spread=1.5, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 0, 2, 2, 1, 0, 2])
    z = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    same = labels.numpy()[:, None] == labels.numpy()[None]
    arms = [
        (d[a][~same[a]] > d[a, p]).any()
        for a in range(12)
        for p in range(12)
        if p != a and same[a, p]
    ]
    assert (sum(arms), len(arms) - sum(arms)) == (32, 6)
    for margin in (0.0, 0.5, 2.0):
        got = triplet_loss(emb, labels, margin=margin, mining="semihard")
        want = triplet_reference(emb.numpy(), labels.tolist(), margin, "semihard")
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_triplet_loss_is_zero_for_well_separated_copies_and_scale_free():
    emb, labels = _copies(spread=1e-4)
    # copies coincide (d_ap ~ 0) and distinct random directions are far apart (d_an >> margin)
    assert triplet_loss(emb, labels, margin=0.1, mining="hard").item() == pytest.approx(
        0.0, abs=1e-6
    )
    emb, labels = _copies()
    a = triplet_loss(emb, labels, mining="semihard")
    b = triplet_loss(7.0 * emb, labels, mining="semihard")  # normalised inside
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_triplet_loss_gradient_flows_and_bad_input_fails():
    emb, labels = _copies()
    emb = emb.float().requires_grad_()
    triplet_loss(emb, labels, mining="semihard").backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="negative"):
        triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), mining="easy")


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_exemplar_classification_matches_explicit_loop(temperature):
    emb, _ = _copies(num_images=4, num_copies=3)
    emb = emb.view(3, 4, -1)  # [V, B, D]
    got = exemplar_classification_loss(emb, temperature=temperature)
    want = exemplar_classification_reference(emb.numpy(), temperature)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_exemplar_classification_needs_two_copies():
    with pytest.raises(ValueError, match="V >= 2"):
        exemplar_classification_loss(torch.randn(1, 4, 3))


def test_pretext_classification_loss_is_the_mean_negative_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    want = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        want += math.log(sum(math.exp(v) for v in row)) - row[y]
    got = pretext_classification_loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want / 6, rel=2e-2)  # bf16 logits
    assert pretext_classification_loss(logits, labels).item() == pytest.approx(want / 6, rel=1e-6)
    hits = np.mean(
        [int(np.argmax(r)) == y for r, y in zip(logits.tolist(), labels.tolist(), strict=True)]
    )
    assert classification_accuracy(logits, labels).item() == pytest.approx(hits)
