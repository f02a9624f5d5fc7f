"""Distillation (SimCLR v2 step 3) end to end on a tiny task: the student learns the teacher's
function from unlabelled images alone; the teacher does not change. The loss itself is checked
against its formula in tests/unit/losses/test_distill.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.unit.eval.test_finetune import FAST, SPEC, brightness_task, small_classifier
from wildsight.eval.distill import DistillConfig, distill
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


@pytest.mark.parametrize(("kwargs", "match"), [({"temperature": 0.0}, "temperature"),
                                               ({"alpha": -0.1}, "alpha")])  # fmt: skip
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)
