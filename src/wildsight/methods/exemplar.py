"""Exemplar (Dosovitskiy et al., 2014) as in "Revisiting" (Kolesnikov et al., 2019, §3).

Several heavily augmented copies of each image (the views: Revisiting takes 8 Inception
crops, grayscale with p 0.66) share a label, the image. The backbone's pre-logits go through
a linear embedding (Revisiting: 1000 units) and a triplet loss with semi-hard negatives
(margin 0.5) pulls the copies of an image together and pushes other images away; or, with
`loss: classification`, each copy is classified among the batch's images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.losses import exemplar_classification_loss, triplet_loss
from wildsight.losses.pretext import pairwise_sq_distances
from wildsight.methods.base import Method, StepOutput, multicrop_features
from wildsight.views import ViewSpec
from wildsight.views.pretext import standardize


@dataclass(frozen=True)
class ExemplarConfig:
    """Exemplar hyper-parameters. Defaults: Revisiting's (triplet, semi-hard, margin 0.5)."""

    name: Literal["exemplar"] = "exemplar"
    loss: Literal["triplet", "classification"] = "triplet"
    embed_dim: int = 1000
    margin: float = 0.5  # triplet margin on squared distances of normalised embeddings
    mining: Literal["semihard", "hard", "all"] = "semihard"
    temperature: float = 0.1  # the classification form's softmax temperature
    standardize: bool = True  # each copy standardised on its own (Revisiting's pipeline)

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.margin < 0 or self.temperature <= 0:
            raise ValueError(
                "method.embed_dim must be >= 1, margin >= 0 and temperature > 0, got "
                f"{self.embed_dim}, {self.margin}, {self.temperature}"
            )


class Exemplar(Method):
    name = "exemplar"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: ExemplarConfig):
        super().__init__(backbone, views)
        if views.num_views < 2:
            raise ValueError(
                f"exemplar needs >= 2 copies of each image (views count), got {views.num_views}"
            )
        self.cfg = cfg
        self.embed = nn.Linear(backbone.feature_dim, cfg.embed_dim)

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        copies = [standardize(v) for v in views] if self.cfg.standardize else list(views)
        feats = torch.cat(multicrop_features(self.backbone, copies))  # [V B, D]
        z = self.embed(feats)  # [V B, E]
        num_copies, batch = len(views), views[0].shape[0]
        labels = torch.arange(batch, device=z.device).repeat(num_copies)  # [V B] image index
        if self.cfg.loss == "triplet":
            loss = triplet_loss(z, labels, margin=self.cfg.margin, mining=self.cfg.mining)
        else:
            loss = exemplar_classification_loss(
                z.view(num_copies, batch, -1), temperature=self.cfg.temperature
            )
        return StepOutput(loss=loss, metrics={"copy_retrieval_accuracy": _retrieval(z, labels)})


@torch.no_grad()
def _retrieval(z: Tensor, labels: Tensor) -> Tensor:
    """Fraction of copies whose nearest other copy (cosine) comes from the same image."""
    dist = pairwise_sq_distances(F.normalize(z.float(), dim=1))  # [M, M]
    dist.fill_diagonal_(float("inf"))
    return (labels[dist.argmin(dim=1)] == labels).float().mean()
