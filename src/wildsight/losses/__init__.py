"""Losses: small pure functions of tensors. Cross-process reductions are explicit arguments."""

from wildsight.losses.byol import byol_loss
from wildsight.losses.contrastive import nt_xent_loss
from wildsight.losses.distill import distill_loss, distill_objective
from wildsight.losses.fixmatch import pseudo_label_loss
from wildsight.losses.pretext import (
    classification_accuracy,
    exemplar_classification_loss,
    pretext_classification_loss,
    triplet_loss,
)
from wildsight.losses.swav import sinkhorn, swav_loss

__all__ = [
    "byol_loss",
    "classification_accuracy",
    "distill_loss",
    "distill_objective",
    "exemplar_classification_loss",
    "nt_xent_loss",
    "pretext_classification_loss",
    "pseudo_label_loss",
    "sinkhorn",
    "swav_loss",
    "triplet_loss",
]
