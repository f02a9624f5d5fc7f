"""Self-training on unlabelled images with confident pseudo-labels (FixMatch; Sohn et al., 2020).

Sohn et al., 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", eq. (4): for each unlabelled image u_b of a batch of mu * B,

    l_u = 1 / (mu B) sum_b 1[max(q_b) >= threshold] H(argmax(q_b), p_m(y | A(u_b))),
    q_b = p_m(y | alpha(u_b)),

where alpha is a weak augmentation, A a strong one, H the cross-entropy and q_b is treated as a
constant (no gradient). The mean is over ALL mu B images, the masked ones counting as zero, so the
loss weight falls as the model's confidence does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pseudo_label_loss"]


def pseudo_label_loss(
    strong_logits: Tensor, weak_logits: Tensor, threshold: float = 0.95
) -> tuple[Tensor, Tensor]:
    """(loss, mask): FixMatch's unlabelled term and which images passed the threshold.

    strong_logits [B, K] (the model on strongly augmented views, with gradient), weak_logits
    [B, K] (the model on weak views of the same images; detached here). Returns the scalar loss,
    mean over the B images of mask * CE(strong_logits, argmax softmax(weak_logits)), and the float
    mask [B] (1 where max softmax(weak_logits) >= threshold). Computed in float32 (float64 for a
    float64 model) whatever the autocast dtype. A per-process mean: under data parallelism each
    process holds its own images and the gradient all-reduce averages the processes.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"pseudo-label threshold must be in [0, 1], got {threshold}")
    if strong_logits.ndim != 2 or strong_logits.shape != weak_logits.shape:
        raise ValueError(
            "pseudo_label_loss needs strong and weak logits of the same shape [B, K], got "
            f"{tuple(strong_logits.shape)} and {tuple(weak_logits.shape)}"
        )
    dtype = torch.float64 if strong_logits.dtype == torch.float64 else torch.float32
    probs = F.softmax(weak_logits.detach().to(dtype), dim=1)  # [B, K], q_b
    confidence, pseudo = probs.max(dim=1)  # [B], [B]
    mask = (confidence >= threshold).to(dtype)  # [B]
    per_image = F.cross_entropy(strong_logits.to(dtype), pseudo, reduction="none")  # [B]
    return (per_image * mask).mean(), mask
