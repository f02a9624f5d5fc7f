"""Distillation (SimCLR v2 step 3) end to end on a tiny task: the student learns the teacher's
function from unlabelled images alone; the teacher does not change. The loss itself is checked
against its formula in tests/unit/losses/test_distill.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.unit.eval.test_finetune import FAST, SPEC, brightness_task, small_classifier
from wildsight.eval.distill import DistillConfig, TeacherEnsemble, distill
from wildsight.eval.finetune import FinetuneConfig, InputSpec, finetune

TRAIN = FinetuneConfig(steps=60, batch_size=16, lr=0.4, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def teacher():  # noqa: ANN201
    x, y = brightness_task(16, seed=0)
    model = small_classifier(seed=0)
    result = finetune(model, x, y, x, y, inputs=SPEC, cfg=FAST)
    assert result.top1 >= 0.9
    return model


def test_student_learns_the_teacher_from_unlabelled_images(teacher) -> None:  # noqa: ANN001
    unlabelled, _ = brightness_task(30, seed=5)  # labels dropped
    test_x, test_y = brightness_task(20, seed=6)
    before = copy.deepcopy(teacher.state_dict())
    student = small_classifier(seed=1)
    cfg = DistillConfig(temperature=2.0, train=TRAIN)
    result = distill(teacher, student, unlabelled, test_x, test_y, inputs=SPEC, cfg=cfg)
    assert result.teacher_top1 >= 0.9
    assert result.top1 >= result.teacher_top1 - 0.05  # chance is 1/3
    assert result.agreement >= 0.9
    assert result.num_unlabelled == 90 and result.num_labelled == 0
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_labelled_mixing_needs_labelled_images(teacher) -> None:  # noqa: ANN001
    x, y = brightness_task(4, seed=0)
    cfg = DistillConfig(alpha=0.5, train=dataclasses.replace(TRAIN, steps=2))
    with pytest.raises(ValueError, match="labelled"):
        distill(teacher, small_classifier(), x, x, y, inputs=SPEC, cfg=cfg)
    result = distill(teacher, small_classifier(), x, x, y, inputs=SPEC, cfg=cfg, labelled=(x, y))
    assert result.num_labelled == len(y) and result.steps == 2


def test_teacher_and_student_must_share_their_input(teacher) -> None:  # noqa: ANN001
    x, y = brightness_task(2, seed=0)
    other = InputSpec(20, SPEC.mean, SPEC.std)
    with pytest.raises(ValueError, match="same input"):
        distill(teacher, small_classifier(), x, x, y, inputs=other, teacher_inputs=SPEC)


def test_ensemble_teaches_the_mean_of_its_members_probabilities() -> None:
    members = [small_classifier(seed=s).eval() for s in (2, 3)]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        out = TeacherEnsemble(members)(x)  # [5, 3] log-probabilities
        expected = (members[0](x).softmax(-1) + members[1](x).softmax(-1)) / 2
        flipped = TeacherEnsemble(members, flip=True)
        both = flipped(x)
        views = [m(v).softmax(-1) for m in members for v in (x, torch.flip(x, dims=[3]))]
    torch.testing.assert_close(out.exp(), expected)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(both.exp(), torch.stack(views).mean(0))
    # with the flip, a mirrored image gets the same soft label
    with torch.no_grad():
        torch.testing.assert_close(flipped(x.flip(-1)), both)
    assert TeacherEnsemble(members).num_classes == 3


def test_teachers_must_predict_the_same_classes() -> None:
    torch.manual_seed(0)
    other = small_classifier(seed=1)
    other.num_classes = 4
    with pytest.raises(ValueError, match="class counts"):
        TeacherEnsemble([small_classifier(seed=0), other])
    with pytest.raises(ValueError, match="at least one"):
        TeacherEnsemble([])


def test_two_copies_of_a_teacher_teach_what_it_teaches_alone(teacher) -> None:  # noqa: ANN001
    unlabelled, _ = brightness_task(10, seed=5)
    test_x, test_y = brightness_task(20, seed=6)
    cfg = DistillConfig(temperature=2.0, train=dataclasses.replace(TRAIN, steps=4))
    alone = distill(teacher, small_classifier(seed=1), unlabelled, test_x, test_y, inputs=SPEC,
                    cfg=cfg)  # fmt: skip
    pair = distill([teacher, copy.deepcopy(teacher)], small_classifier(seed=1), unlabelled,
                   test_x, test_y, inputs=SPEC, cfg=cfg)  # fmt: skip
    assert pair.teacher_top1 == alone.teacher_top1  # argmax of log(mean p) = argmax of p
    assert pair.params["teachers"] == 2 and alone.params["teachers"] == 1
    assert pair.last_loss == pytest.approx(alone.last_loss, rel=1e-4)  # same soft labels
    flip = distill(teacher, small_classifier(seed=1), unlabelled, test_x, test_y, inputs=SPEC,
                   cfg=dataclasses.replace(cfg, teacher_flip=True))  # fmt: skip
    assert flip.params["teacher_flip"] is True and flip.params["teachers"] == 1


@pytest.mark.parametrize(("kwargs", "match"), [({"temperature": 0.0}, "temperature"),
                                               ({"alpha": -0.1}, "alpha"),
                                               ({"teachers": 0}, "at least 1 teacher"),
                                               ({"teachers": 1.5}, "teachers"),
                                               ({"teachers": True}, "teachers")])  # fmt: skip
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)
