"""Distillation of a fine-tuned teacher into a student on unlabelled images (SimCLR v2, step 3).

Chen et al., 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners", §2, eq. (2):

    L_distill = - sum_{x_i in D} [ sum_y P^T(y | x_i; tau) log P^S(y | x_i; tau) ],
    P(y | x_i; tau) = exp(f(x_i)[y] / tau) / sum_y' exp(f(x_i)[y'] / tau),

with the teacher fixed. Unlike Hinton et al. (2015) there is no tau^2 factor. With labels, eq. (3)
mixes in the supervised term: L = -(1 - alpha) sum_{(x_i, y_i) in D^L} log P^S(y_i | x_i)
+ alpha L_distill (``distill_objective``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distill_loss", "distill_objective"]


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Mean over the batch of -sum_y P^T(y|x; tau) log P^S(y|x; tau) (SimCLR v2 eq. 2, no tau^2).

    student_logits, teacher_logits: [B, K]. The teacher is a fixed target: its logits are
    detached here, so only the student receives a gradient. Computed in float32 (or float64 if
    the student is float64) whatever the autocast dtype: a log-softmax over bf16 logits loses
    the small probabilities that carry the teacher's "dark knowledge".
    The gradient w.r.t. the student logits is (P^S - P^T) / (tau B).
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "distill_loss needs student and teacher logits of the same shape [B, K], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    target = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)  # [B, K], P^T
    log_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)  # [B, K]
    return -(target * log_student).sum(dim=1).mean()


def distill_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    labelled_logits: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """SimCLR v2 eq. (3): alpha * distill_loss + (1 - alpha) * CE(labelled_logits, labels).

    student_logits, teacher_logits: [B, K] on unlabelled images; labelled_logits [B_L, K] and
    labels int64 [B_L] on labelled ones (needed only when alpha < 1). The supervised term is the
    plain cross-entropy at temperature 1, as in the paper. alpha = 1 is distillation alone.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    loss = alpha * distill_loss(student_logits, teacher_logits, temperature)
    if alpha < 1.0:
        if labelled_logits is None or labels is None:
            raise ValueError(
                f"distillation alpha={alpha} < 1 mixes in the labelled loss; pass labelled_logits "
                "and labels (or set alpha=1)"
            )
        loss = loss + (1.0 - alpha) * F.cross_entropy(labelled_logits.float(), labels)
    return loss
