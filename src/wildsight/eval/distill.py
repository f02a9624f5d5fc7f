"""SimCLR v2 step 3: distil a fine-tuned teacher into a student on unlabelled images.

Chen et al., 2020, §2: "we use the fine-tuned network as a teacher to impute labels for training
a student network", minimising -sum_y P^T(y|x; tau) log P^S(y|x; tau) over the unlabelled images
(``wildsight.losses.distill_loss``), the teacher fixed; with labels, eq. (3) mixes in the
supervised cross-entropy with weight 1 - alpha. The student has the same or a smaller backbone.

Here the teacher labels each step's batch on the fly, on the same augmented view the student
sees (as SimCLR v2's code does), so no table of soft labels is stored. The optimiser, schedule,
augmentation and precision are the fine-tuning ones (``FinetuneConfig``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wildsight.eval.finetune import (
    Classifier,
    FinetuneConfig,
    InputSpec,
    batch_indices,
    fit,
    predict,
)
from wildsight.eval.report import top1_accuracy
from wildsight.losses.distill import distill_objective
from wildsight.train.trainer import pick_device, view_generator

# 1,500 steps of 64 = 96,000 images, 1.6 passes over Fashion-MNIST's 60,000 training images, at
# the LR measured for distillation (0.1 per 256, no warm-up), whatever fine-tuning's defaults
DISTILL_TRAINING = FinetuneConfig(steps=1500, lr=0.1, warmup_fraction=0.0)


@dataclass(frozen=True)
class DistillConfig:
    """temperature: tau of P(y|x; tau) for teacher and student alike. alpha: weight of the
    distillation term, 1 - alpha that of the labelled cross-entropy (eq. 3); 1 = distillation
    only, which needs no labels.

    teachers (`eval lowshot` only): how many models teach together, their probabilities averaged
    (`TeacherEnsemble`; Hinton et al. 2015 distilled an ensemble into one net): the run's last
    model and teachers - 1 more trained the same way on the same labels with other seeds.
    `wildsight distill` takes its teachers as folders instead, so it keeps 1 here.
    teacher_flip: the teacher's probabilities are the mean over the view and the view flipped
    left-right (for data whose labels a flip keeps, as the fine-tuning's own flips assume)."""

    temperature: float = 1.0
    alpha: float = 1.0
    teachers: int = 1
    teacher_flip: bool = False
    train: FinetuneConfig = field(default_factory=lambda: DISTILL_TRAINING)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if isinstance(self.teachers, bool) or not isinstance(self.teachers, int):
            raise ValueError(f"distillation teachers must be an int >= 1, got {self.teachers!r}")
        if self.teachers < 1:
            raise ValueError(f"distillation needs at least 1 teacher, got {self.teachers}")


DEFAULT_DISTILL = DistillConfig()

# seed of a lowshot run's extra teacher i >= 1: far from the run seeds 0 .. seeds-1
TEACHER_SEED_STRIDE = 1000


class TeacherEnsemble(nn.Module):
    """Fixed teachers as one: log of the mean of their class probabilities, over the members and,
    with flip, over the view and the view flipped left-right. Its softmax is that mean, so at
    temperature 1 the student learns the average prediction."""

    def __init__(self, members: Sequence[nn.Module], *, flip: bool = False):
        super().__init__()
        if not members:
            raise ValueError("a teacher ensemble needs at least one member")
        classes = {int(m.num_classes) for m in members}
        if len(classes) != 1:
            raise ValueError(f"the teachers predict different class counts {sorted(classes)}")
        self.members = nn.ModuleList(members)
        self.flip = flip
        self.num_classes = classes.pop()

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, s, s] -> [B, K] log-probabilities
        views = [x, x.flip(-1)] if self.flip else [x]
        prob = sum(m(v).float().softmax(-1) for m in self.members for v in views)
        prob = prob / (len(self.members) * len(views))  # [B, K]
        return prob.clamp_min(1e-12).log()


@dataclass(frozen=True)
class DistillResult:
    top1: float  # the student's test accuracy
    teacher_top1: float  # the teacher's, measured in the same call on the same test set
    agreement: float  # fraction of test images where student and teacher predict the same class
    num_unlabelled: int
    num_labelled: int
    num_test: int
    steps: int
    seconds: float
    images_per_s: float
    last_loss: float
    params: dict[str, Any]
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}


def distill(
    teacher: Classifier | Sequence[Classifier],
    student: Classifier,
    unlabelled_images: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    inputs: InputSpec,
    teacher_inputs: InputSpec | None = None,
    labelled: tuple[Tensor, Tensor] | None = None,
    cfg: DistillConfig = DEFAULT_DISTILL,
) -> DistillResult:
    """Train `student` (in place) to match the fixed `teacher` on uint8 unlabelled_images
    [N, 3, H, W]; then report both accuracies on the test images [M, 3, H, W] / labels [M].

    Each step draws one light random view of B unlabelled images (`inputs`, the student's
    input); the teacher, in eval mode and without gradients, scores that same view. Several
    teachers, or cfg.teacher_flip, teach as one `TeacherEnsemble` (teacher_top1 is its accuracy).
    teacher_inputs (default `inputs`) may differ only in memory format. labelled = (images
    [L, 3, H, W], labels [L]) is required when cfg.alpha < 1.
    """
    t = cfg.train
    teacher_inputs = teacher_inputs or inputs
    members = list(teacher) if isinstance(teacher, Sequence) else [teacher]
    if len(members) > 1 or cfg.teacher_flip:
        teacher = TeacherEnsemble(members, flip=cfg.teacher_flip)
    else:
        teacher = members[0]
    if (teacher_inputs.size, teacher_inputs.mean, teacher_inputs.std) != (
        inputs.size, inputs.mean, inputs.std,
    ):  # fmt: skip
        raise ValueError(
            f"teacher and student must take the same input (size, mean, std); got {teacher_inputs} "
            f"and {inputs}: pick a student pretrained at the teacher's image size"
        )
    if teacher.num_classes != student.num_classes:
        raise ValueError(
            f"teacher has {teacher.num_classes} classes, student {student.num_classes}"
        )
    if (
        unlabelled_images.dtype != torch.uint8
        or unlabelled_images.ndim != 4
        or not len(unlabelled_images)
    ):
        raise ValueError(f"distillation needs uint8 unlabelled images [N, C, H, W], got "
                         f"{unlabelled_images.dtype} {tuple(unlabelled_images.shape)}")  # fmt: skip
    if cfg.alpha < 1.0 and labelled is None:
        raise ValueError(
            f"distillation alpha={cfg.alpha} mixes in the labelled loss: give the labelled images "
            "(--train SOURCE --fraction F), or use alpha=1"
        )
    device = pick_device(t.device)
    teacher.to(device).eval()
    student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    fmt = torch.channels_last if teacher_inputs.channels_last else torch.contiguous_format
    total = t.total_steps(len(unlabelled_images))

    def batch_loss(step: int) -> tuple[Tensor, int]:
        idx = batch_indices(len(unlabelled_images), t.batch_size, t.seed, step)  # [B]
        view = inputs.train(unlabelled_images[idx].to(device), view_generator(t.seed, step, 0), t)
        with torch.no_grad():
            teacher_logits = teacher(view.contiguous(memory_format=fmt))  # [B, K], P^T source
        student_logits = student(view)  # [B, K]
        labelled_logits = labels = None
        if cfg.alpha < 1.0 and labelled is not None:
            lab_idx = batch_indices(len(labelled[1]), t.batch_size, t.seed + 1, step)  # [B_L]
            lab_view = inputs.train(labelled[0][lab_idx].to(device),
                                    view_generator(t.seed + 1, step, 0), t)  # fmt: skip
            labelled_logits, labels = student(lab_view), labelled[1][lab_idx].to(device)
        loss = distill_objective(student_logits, teacher_logits, temperature=cfg.temperature,
                                 alpha=cfg.alpha, labelled_logits=labelled_logits, labels=labels)  # fmt: skip
        return loss, len(idx)

    torch.manual_seed(t.seed)
    stats = fit(student, batch_loss, total_steps=total, cfg=t, device=device)
    kw = {"batch_size": t.eval_batch_size, "precision": t.precision, "device": device}
    student_pred = predict(student, test_images, inputs, **kw)  # [M]
    teacher_pred = predict(teacher, test_images, teacher_inputs, **kw)  # [M]
    test_labels = test_labels.cpu()
    return DistillResult(
        top1=top1_accuracy(student_pred, test_labels),
        teacher_top1=top1_accuracy(teacher_pred, test_labels),
        agreement=top1_accuracy(student_pred, teacher_pred),
        num_unlabelled=len(unlabelled_images), num_test=len(test_labels),
        num_labelled=0 if labelled is None else len(labelled[1]),
        steps=stats.steps, seconds=stats.seconds, images_per_s=stats.images_per_s,
        last_loss=stats.last_loss,
        params={"temperature": cfg.temperature, "alpha": cfg.alpha, "total_steps": total,
                "teachers": len(members), "teacher_flip": cfg.teacher_flip,
                **dataclasses.asdict(t)},
        model=student,
    )  # fmt: skip
