"""Relative patch location (Doersch et al., 2015) as in "Revisiting" (Kolesnikov et al., 2019).

Each view is cut into 3 x 3 tiles with gaps and jitter (as Jigsaw cuts them); the backbone
embeds the tiles, and an MLP on the concatenated embeddings of (centre, neighbour) predicts
where the neighbour sits among the 8 positions around the centre. Revisiting forms all 8
pairs of every image (`all_neighbours`); Doersch draws one neighbour per image, which runs
the backbone on 2 tiles per image instead of 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.heads import PatchClassifier
from wildsight.losses import classification_accuracy, pretext_classification_loss
from wildsight.methods.base import Method, StepOutput
from wildsight.methods.jigsaw import _check_head, _check_tiling, patch_tiling
from wildsight.views import ViewSpec
from wildsight.views.pretext import (
    RPL_CENTRE,
    RPL_NEIGHBOURS,
    grid_tiles,
    memory_format_of,
    relative_patches,
)


@dataclass(frozen=True)
class RPLConfig:
    """Relative patch location hyper-parameters. Defaults: Revisiting's."""

    name: Literal["rpl"] = "rpl"
    all_neighbours: bool = True  # Revisiting: all 8 pairs per image; False: one (Doersch)
    gap_fraction: float = 0.25  # of the cell side: Revisiting cuts 64 px tiles from 85 px cells
    jitter_fraction: float = 0.125  # largest shift per axis, fraction of the cell, <= gap / 2
    standardize_tiles: bool = True
    embed_dim: int = 1000  # per-tile embedding (Revisiting: the network's 1000-unit logits)
    hidden_dim: int = 4096
    dropout: float = 0.5

    def __post_init__(self) -> None:
        _check_tiling(self.gap_fraction, self.jitter_fraction)
        _check_head(self.embed_dim, self.hidden_dim, self.dropout)


class RelativePatchLocation(Method):
    name = "rpl"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: RPLConfig):
        super().__init__(backbone, views)
        self.cfg = cfg
        self.gap, self.jitter = patch_tiling(views, 3, cfg.gap_fraction, cfg.jitter_fraction, "rpl")
        self.embed = nn.Linear(backbone.feature_dim, cfg.embed_dim)
        self.classifier = PatchClassifier(
            2 * cfg.embed_dim, cfg.hidden_dim, len(RPL_NEIGHBOURS), cfg.dropout
        )

    def _embed(self, tiles: Tensor, like: Tensor) -> Tensor:
        """tiles [N, T, 3, t, t] -> embeddings [N, T, E], one backbone call."""
        n, count = tiles.shape[:2]
        feats = self.backbone(tiles.flatten(0, 1).contiguous(memory_format=memory_format_of(like)))
        return self.embed(feats).view(n, count, -1)

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        x = torch.cat(list(views))  # [N, 3, S, S], N = V B
        std = self.cfg.standardize_tiles
        if self.cfg.all_neighbours:
            emb = self._embed(grid_tiles(x, 3, self.gap, self.jitter, None, std), x)  # [N, 9, E]
            n, e = emb.shape[0], emb.shape[-1]
            centre = emb[:, RPL_CENTRE, None].expand(n, len(RPL_NEIGHBOURS), e)  # [N, 8, E]
            pairs = torch.cat([centre, emb[:, list(RPL_NEIGHBOURS)]], dim=-1)  # [N, 8, 2E]
            labels = torch.arange(len(RPL_NEIGHBOURS), device=x.device).repeat(n)  # [8 N]
            pairs = pairs.reshape(n * len(RPL_NEIGHBOURS), 2 * e)
        else:
            centre_tile, neighbour_tile, labels = relative_patches(
                x, self.gap, self.jitter, None, std
            )  # [N, 3, t, t] x 2, [N]
            emb = self._embed(torch.stack([centre_tile, neighbour_tile], dim=1), x)  # [N, 2, E]
            pairs = emb.flatten(1)  # [N, 2E] (centre, neighbour)
        logits = self.classifier(pairs)  # [M, 8]
        loss = pretext_classification_loss(logits, labels)
        return StepOutput(
            loss=loss, metrics={"pretext_accuracy": classification_accuracy(logits, labels)}
        )
