"""Jigsaw puzzles (Noroozi & Favaro, 2016) as in "Revisiting" (Kolesnikov et al., 2019, §3).

Each view is cut into 3 x 3 tiles with gaps and jitter, each tile standardised on its own;
the backbone embeds every tile (Revisiting: a linear layer of 1000 units on the pre-logits),
the embeddings are concatenated in the order of one of 100 permutations chosen for maximal
Hamming distance, and an MLP (4096 hidden, BN, ReLU, dropout 0.5) predicts which permutation.
The backbone runs once per tile; each image then yields `permutations_per_image` puzzles
(Revisiting: 8) from the same tile embeddings, which costs only the small head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.heads import PatchClassifier
from wildsight.losses import classification_accuracy, pretext_classification_loss
from wildsight.methods.base import Method, StepOutput
from wildsight.views import ViewSpec
from wildsight.views.pretext import (
    grid_tiles,
    memory_format_of,
    permutation_set,
    shuffle_tiles,
    tile_gap_jitter,
)

MIN_TILE_PX = 4  # a small-stem RegNet keeps 1 px of a 4 px tile after its second stage


@dataclass(frozen=True)
class JigsawConfig:
    """Jigsaw hyper-parameters. Defaults: Revisiting's (3 x 3 tiles, 100 permutations)."""

    name: Literal["jigsaw"] = "jigsaw"
    grid_size: int = 3  # tiles per side
    num_permutations: int = 100  # Noroozi & Favaro's best trade-off; Revisiting's set
    permutation_seed: int = 0  # the greedy set starts from a permutation drawn from it
    permutations_per_image: int = 8  # Revisiting's perm_subset_size; distinct per image
    gap_fraction: float = 0.25  # of the cell side: Revisiting cuts 64 px tiles from 85 px cells
    jitter_fraction: float = 0.125  # largest shift per axis, fraction of the cell, <= gap / 2
    standardize_tiles: bool = True  # per-tile mean/std (Noroozi §3.2), Revisiting's pipeline
    embed_dim: int = 1000  # per-tile embedding (Revisiting: the network's 1000-unit logits)
    hidden_dim: int = 4096
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if not 2 <= self.grid_size <= 3:
            raise ValueError(f"method.grid_size must be 2 or 3, got {self.grid_size}")
        count = self.grid_size**2
        if not 2 <= self.num_permutations <= math.factorial(count):
            raise ValueError(
                f"method.num_permutations must be in [2, {math.factorial(count)}] for a "
                f"{self.grid_size} x {self.grid_size} grid, got {self.num_permutations}"
            )
        if not 1 <= self.permutations_per_image <= self.num_permutations:
            raise ValueError(
                "method.permutations_per_image must be in [1, num_permutations], got "
                f"{self.permutations_per_image}"
            )
        _check_tiling(self.gap_fraction, self.jitter_fraction)
        _check_head(self.embed_dim, self.hidden_dim, self.dropout)


def _check_tiling(gap_fraction: float, jitter_fraction: float) -> None:
    if not 0.0 <= gap_fraction < 1.0 or not 0.0 <= jitter_fraction <= gap_fraction / 2:
        raise ValueError(
            "method.gap_fraction must be in [0, 1) and jitter_fraction in [0, gap_fraction / 2], "
            f"got {gap_fraction}, {jitter_fraction}"
        )


def _check_head(embed_dim: int, hidden_dim: int, dropout: float) -> None:
    if embed_dim < 1 or hidden_dim < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(
            "method.embed_dim and hidden_dim must be >= 1 and dropout in [0, 1), got "
            f"{embed_dim}, {hidden_dim}, {dropout}"
        )


def patch_tiling(
    views: ViewSpec, grid: int, gap_fraction: float, jitter_fraction: float, method: str
) -> tuple[int, int]:
    """(gap, jitter) in pixels for the one crop size of `views` (all groups must share it);
    refuses tiles under MIN_TILE_PX, which hold too little of the image to be placed."""
    sizes = sorted({group.size for group in views.groups})
    if len(sizes) != 1:
        raise ValueError(f"{method} cuts tiles from views of one size, got sizes {sizes}")
    side = sizes[0]
    try:
        gap, jitter = tile_gap_jitter(side, grid, gap_fraction, jitter_fraction)
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None
    if side // grid - gap < MIN_TILE_PX:
        raise ValueError(
            f"{method}: a {side} px crop cut {grid} x {grid} gives {side // grid - gap} px tiles; "
            f"use larger crops (views size; 48 px for 28 px images) for tiles of >= {MIN_TILE_PX} px"
        )
    return gap, jitter


class Jigsaw(Method):
    name = "jigsaw"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: JigsawConfig):
        super().__init__(backbone, views)
        self.cfg = cfg
        self.num_tiles = cfg.grid_size**2
        self.gap, self.jitter = patch_tiling(
            views, cfg.grid_size, cfg.gap_fraction, cfg.jitter_fraction, "jigsaw"
        )
        # the permutation set is state: a checkpoint carries the exact classes it was trained on
        perms = permutation_set(cfg.num_permutations, self.num_tiles, cfg.permutation_seed)
        self.register_buffer("permutations", perms)  # [P, T] int64
        self.embed = nn.Linear(backbone.feature_dim, cfg.embed_dim)
        self.classifier = PatchClassifier(
            self.num_tiles * cfg.embed_dim, cfg.hidden_dim, cfg.num_permutations, cfg.dropout
        )

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        x = torch.cat(list(views))  # [N, 3, S, S], N = V B
        tiles = grid_tiles(
            x, self.cfg.grid_size, self.gap, self.jitter, None, self.cfg.standardize_tiles
        )  # [N, T, 3, t, t] raster order
        n, count = tiles.shape[:2]
        feats = self.backbone(tiles.flatten(0, 1).contiguous(memory_format=memory_format_of(x)))
        emb = self.embed(feats).view(n, count, -1)  # [N, T, E]
        # K distinct permutations per image, from the global RNG (checkpointed by the trainer)
        k = self.cfg.permutations_per_image
        labels = torch.rand(n, self.cfg.num_permutations).argsort(dim=1)[:, :k]  # [N, K] CPU
        labels = labels.to(x.device)
        puzzles = shuffle_tiles(emb, self.permutations, labels)  # [N, K, T, E]
        logits = self.classifier(puzzles.reshape(n * k, -1))  # [N K, P]
        target = labels.reshape(-1)  # [N K]
        loss = pretext_classification_loss(logits, target)
        return StepOutput(
            loss=loss, metrics={"pretext_accuracy": classification_accuracy(logits, target)}
        )
