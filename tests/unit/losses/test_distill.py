"""SimCLR v2 distillation loss against the formula, computed element by element in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wildsight.losses import distill_loss, distill_objective


def reference_distill(student: list[list[float]], teacher: list[list[float]], tau: float) -> float:
    """(1/B) sum_i -sum_y P^T(y|x_i; tau) log P^S(y|x_i; tau), with plain Python exp/log."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        t_exp = [math.exp(v / tau) for v in t_row]
        s_exp = [math.exp(v / tau) for v in s_row]
        t_sum, s_sum = sum(t_exp), sum(s_exp)
        total -= sum(te / t_sum * math.log(se / s_sum) for te, se in zip(t_exp, s_exp, strict=True))
    return total / len(student)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_matches_the_formula_without_a_tau_squared_factor(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    expected = reference_distill(student.tolist(), teacher.tolist(), tau)
    got = distill_loss(student, teacher, temperature=tau)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_float32_and_bf16_inputs_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    expected = reference_distill(student.tolist(), teacher.tolist(), 2.0)
    assert float(distill_loss(student, teacher, 2.0)) == pytest.approx(expected, rel=1e-5)
    low = distill_loss(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert low.dtype == torch.float32


def test_gradient_is_student_minus_teacher_probabilities() -> None:
    """d/ds of the mean loss = (P^S - P^T) / (tau B); the teacher gets no gradient."""
    g = torch.Generator().manual_seed(2)
    tau = 2.0
    student = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    distill_loss(student, teacher, tau).backward()
    expected = (F.softmax(student.detach() / tau, 1) - F.softmax(teacher.detach() / tau, 1)) / (
        tau * 6
    )
    assert torch.allclose(student.grad, expected, atol=1e-12)
    assert teacher.grad is None


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: distill_loss(s, teacher, 0.7), (student,))


def test_minimum_is_the_teacher_entropy_when_the_student_copies_the_teacher() -> None:
    """Gibbs' inequality: cross-entropy >= entropy of P^T, with equality at P^S = P^T."""
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(5, 6, generator=g, dtype=torch.float64)
    p = F.softmax(teacher / 1.5, dim=1)
    entropy = float(-(p * p.log()).sum(1).mean())
    assert float(distill_loss(teacher.clone(), teacher, 1.5)) == pytest.approx(entropy, rel=1e-12)
    # a constant shift of the logits changes no probability
    assert float(distill_loss(teacher + 3.0, teacher, 1.5)) == pytest.approx(entropy, rel=1e-12)
    for _ in range(5):
        other = torch.randn(5, 6, generator=g, dtype=torch.float64)
        assert float(distill_loss(other, teacher, 1.5)) > entropy


def test_objective_mixes_in_the_labelled_cross_entropy() -> None:
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labelled, labels = torch.randn(2, 3, generator=g), torch.tensor([2, 0])
    ce = -sum(math.log(math.exp(row[y]) / sum(math.exp(v) for v in row))
              for row, y in zip(labelled.tolist(), labels.tolist(), strict=True)) / 2  # fmt: skip
    dist = reference_distill(student.tolist(), teacher.tolist(), 2.0)
    got = distill_objective(student, teacher, temperature=2.0, alpha=0.3,
                            labelled_logits=labelled, labels=labels)  # fmt: skip
    assert float(got) == pytest.approx(0.3 * dist + 0.7 * ce, rel=1e-5)
    alone = distill_objective(student, teacher, temperature=2.0)  # alpha = 1: no labels needed
    assert float(alone) == pytest.approx(dist, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": 0.5}, "labelled"),
    ],  # fmt: skip
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        distill_objective(s, t, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4))
