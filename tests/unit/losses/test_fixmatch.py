"""FixMatch's unlabelled loss against its formula (Sohn et al., 2020, eq. 4), element by element."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wildsight.losses import pseudo_label_loss


def reference(strong: list[list[float]], weak: list[list[float]], tau: float) -> tuple[float, list]:
    """(1 / B) sum_b 1[max q_b >= tau] (-log p_strong(argmax q_b)), plain Python exp/log."""
    total, mask = 0.0, []
    for s_row, w_row in zip(strong, weak, strict=True):
        w_exp = [math.exp(v) for v in w_row]
        q = [e / sum(w_exp) for e in w_exp]
        label = q.index(max(q))
        keep = max(q) >= tau
        mask.append(1.0 if keep else 0.0)
        if keep:
            total -= s_row[label] - math.log(sum(math.exp(v) for v in s_row))
    return total / len(strong), mask


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8, 0.95])
def test_matches_the_formula(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    strong = torch.randn(9, 4, generator=g, dtype=torch.float64) * 2
    weak = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3  # some rows confident
    expected, mask = reference(strong.tolist(), weak.tolist(), tau)
    loss, got_mask = pseudo_label_loss(strong, weak, tau)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert got_mask.tolist() == mask
    if tau == 0.8:
        assert 0 < sum(mask) < len(mask)  # the case exercises both branches


def test_threshold_zero_is_cross_entropy_on_the_argmax_and_one_keeps_only_certainty() -> None:
    g = torch.Generator().manual_seed(1)
    strong, weak = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    loss, mask = pseudo_label_loss(strong, weak, 0.0)
    assert float(loss) == pytest.approx(float(F.cross_entropy(strong, weak.argmax(1))), rel=1e-6)
    assert mask.sum() == 5
    loss, mask = pseudo_label_loss(strong, weak, 1.0)
    assert float(loss) == 0.0 and mask.sum() == 0


def test_only_the_strong_view_gets_a_gradient_and_masked_images_none() -> None:
    weak = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)  # confident, not
    strong = torch.zeros(2, 3, requires_grad=True)
    loss, mask = pseudo_label_loss(strong, weak, 0.9)
    loss.backward()
    assert mask.tolist() == [1.0, 0.0]
    assert weak.grad is None
    # d/ds of CE(s, 0) / B at s = 0: (softmax(s) - onehot(0)) / 2 for the kept row, zero otherwise
    expected = torch.tensor([[(1 / 3 - 1) / 2, 1 / 6, 1 / 6], [0.0, 0.0, 0.0]])
    assert torch.allclose(strong.grad, expected, atol=1e-7)


def test_bf16_logits_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(2)
    strong, weak = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 4
    expected, _ = reference(
        strong.bfloat16().float().tolist(), weak.bfloat16().float().tolist(), 0.5
    )
    loss, _ = pseudo_label_loss(strong.bfloat16(), weak.bfloat16(), 0.5)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("strong", "weak", "tau", "match"),
    [((2, 3), (2, 3), 1.5, "threshold"), ((2, 3), (2, 4), 0.5, "same shape"),
     ((6,), (6,), 0.5, "same shape")],
)  # fmt: skip
def test_bad_input(strong: tuple, weak: tuple, tau: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pseudo_label_loss(torch.zeros(strong), torch.zeros(weak), tau)
