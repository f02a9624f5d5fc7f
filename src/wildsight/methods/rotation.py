"""Rotation (Gidaris et al., 2018) as in "Revisiting" (Kolesnikov et al., 2019, §3).

Every view is shown in all four rotations (0, 90, 180, 270 degrees), as Revisiting trains it;
a classifier on the backbone's pre-logits predicts which. Revisiting's classifier is the
network's final linear layer (4 outputs); here it follows a BatchNorm of the pre-logits
(`feature_batchnorm`, see RotationConfig).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.heads import MLP
from wildsight.losses import classification_accuracy, pretext_classification_loss
from wildsight.methods.base import Method, StepOutput, multicrop_features
from wildsight.views import ViewSpec
from wildsight.views.pretext import NUM_ROTATIONS, memory_format_of, rotations, standardize


@dataclass(frozen=True)
class RotationConfig:
    """Rotation hyper-parameters. Defaults: Revisiting's linear 4-way classifier, after a
    BatchNorm of the pre-logits (ours, `feature_batchnorm`)."""

    name: Literal["rotation"] = "rotation"
    hidden_dims: tuple[int, ...] = ()  # () = one linear layer on the pre-logits, as Revisiting
    head_batchnorm: bool = True  # BN after each hidden layer (no effect without hidden layers)
    # BN without affine on the pre-logits before the classifier (ours). A linear head on raw
    # pre-logits diverged on Fashion-MNIST even at LR 0.1 per 256: a small-stem RegNetX-200MF
    # starts with features of norm ~36, mostly an offset shared by every image.
    feature_batchnorm: bool = True
    standardize: bool = False  # each view standardised on its own before rotating

    def __post_init__(self) -> None:
        if any(d < 1 for d in self.hidden_dims):
            raise ValueError(f"method.hidden_dims must be positive, got {self.hidden_dims}")


class Rotation(Method):
    name = "rotation"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: RotationConfig):
        super().__init__(backbone, views)
        self.cfg = cfg
        mlp = MLP(
            (backbone.feature_dim, *cfg.hidden_dims, NUM_ROTATIONS), batchnorm=cfg.head_batchnorm
        )
        norm = nn.BatchNorm1d(backbone.feature_dim, affine=False)
        self.classifier = nn.Sequential(norm, mlp) if cfg.feature_batchnorm else mlp

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        rotated, labels = [], []
        for view in views:  # [B, 3, s, s]
            if self.cfg.standardize:
                view = standardize(view)
            x, y = rotations(view)  # [4B, 3, s, s], [4B] rotation k in block k
            rotated.append(x.contiguous(memory_format=memory_format_of(view)))
            labels.append(y)
        feats = torch.cat(multicrop_features(self.backbone, rotated))  # [4 V B, D]
        logits = self.classifier(feats)  # [4 V B, 4]
        target = torch.cat(labels)  # [4 V B]
        loss = pretext_classification_loss(logits, target)
        return StepOutput(
            loss=loss, metrics={"pretext_accuracy": classification_accuracy(logits, target)}
        )
