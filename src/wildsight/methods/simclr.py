"""SimCLR v2 (Chen et al., 2020b, "Big Self-Supervised Models are Strong Semi-Supervised Learners").

backbone -> projection head (3 layers with BN in v2, 2 in v1) -> NT-Xent over the global batch,
optionally with a MoCo-style memory: a momentum (EMA) copy of backbone + head whose projections
are "buffered as negative examples" in a queue of `memory` rows (v2 §2: ~+1% linear eval).
For fine-tuning, v2 keeps the first head layer: `keep_head_layers=1` makes `encoder()` return
backbone + that layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.heads import MLP
from wildsight.losses import nt_xent_loss
from wildsight.methods.base import Method, StepOutput, multicrop_features
from wildsight.methods.ema import ema_copy, ema_update_
from wildsight.train import distributed
from wildsight.views import ViewSpec


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR v2 hyper-parameters (v2 §4): 3-layer head with BN, hidden width = the backbone's,
    128-d output, temperature 0.1, memory of 65,536 negatives from an encoder with EMA 0.999."""

    name: Literal["simclr"] = "simclr"
    head_layers: int = 3  # linear layers in the projection head; SimCLR v1: 2
    hidden_dim: int = 0  # 0 = the backbone's feature dim, as SimCLR's code
    out_dim: int = 128
    temperature: float = 0.1
    memory: int = 0  # MoCo-style queue of negatives (rows); SimCLR v2: 65536; 0 = off
    memory_momentum: float = 0.999  # EMA rate of the memory encoder (MoCo, He et al., 2020)
    keep_head_layers: int = 0  # 1 = encoder() is backbone + first head layer (v2 fine-tuning)

    def __post_init__(self) -> None:
        if self.head_layers < 1 or self.hidden_dim < 0 or self.out_dim < 1:
            raise ValueError(
                "method.head_layers and method.out_dim must be >= 1 and method.hidden_dim >= 0 "
                f"(0 = backbone width), got {self.head_layers}, {self.out_dim}, {self.hidden_dim}"
            )
        if not self.temperature > 0:
            raise ValueError(f"method.temperature must be > 0, got {self.temperature}")
        if self.memory < 0 or not 0.0 <= self.memory_momentum <= 1.0:
            raise ValueError(
                "method.memory must be >= 0 and method.memory_momentum in [0, 1], "
                f"got {self.memory}, {self.memory_momentum}"
            )
        if self.keep_head_layers not in (0, 1) or self.keep_head_layers >= self.head_layers:
            raise ValueError(
                "method.keep_head_layers must be 0 or 1 and less than method.head_layers, "
                f"got {self.keep_head_layers} with {self.head_layers} head layers"
            )


class SimCLR(Method):
    name = "simclr"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: SimCLRConfig):
        super().__init__(backbone, views)
        self.cfg = cfg
        if views.num_views != 2:
            raise ValueError(f"SimCLR needs exactly 2 views per image, got {views.num_views}")
        hidden = cfg.hidden_dim or backbone.feature_dim
        dims = (backbone.feature_dim, *[hidden] * (cfg.head_layers - 1), cfg.out_dim)
        # SimCLR's code ends the head with BN as well (no bias, no shift)
        self.projector = MLP(dims, batchnorm=True, last_batchnorm=True)
        if cfg.memory > 0:
            # memory encoder: EMA of backbone + head; queue [M, out_dim] of its normalised
            # projections (a ring: `memory_ptr` is the next row to write, `memory_size` the
            # number of valid rows). Submodules and persistent buffers: they survive resume.
            self.memory_backbone = ema_copy(backbone)
            self.memory_projector = ema_copy(self.projector)
            self.register_buffer("memory_bank", torch.zeros(cfg.memory, cfg.out_dim))
            self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("memory_size", torch.zeros((), dtype=torch.long))

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        feats = torch.cat(multicrop_features(self.backbone, views))  # [2B, D]
        z1, z2 = self.projector(feats).chunk(2)  # [B, out_dim] each
        negatives, aux = None, {}
        if self.cfg.memory > 0:
            size = int(self.memory_size)
            negatives = self.memory_bank[:size] if size > 0 else None  # [size, out_dim]
            with torch.no_grad():
                keys = self.memory_projector(
                    torch.cat(multicrop_features(self.memory_backbone, views))
                )  # [2B, out_dim]
            aux["keys"] = F.normalize(keys.float(), dim=1)
        loss = nt_xent_loss(
            z1, z2, self.cfg.temperature, gather=distributed.gather_with_grad,
            rank=distributed.rank(), negatives=negatives,
        )  # fmt: skip
        with torch.no_grad():
            u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            metrics = {
                "positive_cosine": (u1 * u2).sum(dim=1).mean(),  # -> 1 as views agree
                "feature_std": u1.std(dim=0).mean(),  # -> 0 on collapse
            }
        return StepOutput(loss=loss, metrics=metrics, aux=aux)

    @torch.no_grad()
    def after_step(self, step: int, output: StepOutput) -> None:
        if self.cfg.memory == 0:
            return
        ema_update_(self.memory_backbone, self.backbone, self.cfg.memory_momentum)
        ema_update_(self.memory_projector, self.projector, self.cfg.memory_momentum)
        self.enqueue_(distributed.gather_with_grad(output.aux["keys"]))  # keys of every process

    @torch.no_grad()
    def enqueue_(self, keys: Tensor) -> None:
        """Write keys [K, out_dim] over the oldest rows of the ring (the newest M if K > M)."""
        length = self.cfg.memory
        keys = keys[-length:]
        start = int(self.memory_ptr)
        rows = (start + torch.arange(keys.shape[0], device=keys.device)) % length  # [K]
        self.memory_bank[rows] = keys.to(self.memory_bank.dtype)
        self.memory_ptr.fill_((start + keys.shape[0]) % length)
        self.memory_size.fill_(min(length, int(self.memory_size) + keys.shape[0]))

    def encoder(self) -> nn.Module:
        """The backbone, or with `keep_head_layers=1` backbone + first head layer (Linear, BN,
        ReLU), from which SimCLR v2 fine-tunes (v2 §2: "fine-tune from a middle layer")."""
        if self.cfg.keep_head_layers == 0:
            return self.backbone
        first = list(self.projector)[:3]  # Linear, BatchNorm1d, ReLU
        encoder = nn.Sequential(self.backbone, *first)
        encoder.feature_dim = first[0].out_features  # type: ignore[assignment]
        return encoder
