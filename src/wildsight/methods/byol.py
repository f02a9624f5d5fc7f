"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent").

online: backbone -> projector -> predictor; target: EMA copy of backbone -> projector. Loss
2 - 2 cos(q(z_online(v1)), sg(z_target(v2))), symmetrised over the two views. The target's rate
tau rises from tau_base = 0.996 to 1 by a cosine over the run (§3.2). The two views differ in
augmentation (blur p 1.0 / 0.1, solarise p 0 / 0.2: `views.presets.BYOL_VIEWS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wildsight.backbones import Backbone
from wildsight.heads import MLP
from wildsight.losses import byol_loss
from wildsight.methods.base import Method, StepOutput, multicrop_features
from wildsight.methods.ema import ema_copy, ema_update_
from wildsight.train.schedules import cosine_ramp
from wildsight.views import ViewSpec


@dataclass(frozen=True)
class BYOLConfig:
    """BYOL hyper-parameters (§3.3): projector and predictor Linear 4096 -> BN -> ReLU -> Linear
    256; tau_base 0.996."""

    name: Literal["byol"] = "byol"
    hidden_dim: int = 4096
    out_dim: int = 256
    predictor_hidden_dim: int = 4096
    tau_base: float = 0.996
    predictor_lr_scale: float = 1.0  # the predictor's LR / the scheduled LR (1 in the paper)

    def __post_init__(self) -> None:
        if min(self.hidden_dim, self.out_dim, self.predictor_hidden_dim) < 1:
            raise ValueError(
                "method.hidden_dim, out_dim and predictor_hidden_dim must be >= 1, got "
                f"{self.hidden_dim}, {self.out_dim}, {self.predictor_hidden_dim}"
            )
        if not 0.0 <= self.tau_base <= 1.0:
            raise ValueError(f"method.tau_base must be in [0, 1], got {self.tau_base}")
        if not self.predictor_lr_scale > 0:
            raise ValueError(
                f"method.predictor_lr_scale must be > 0, got {self.predictor_lr_scale}"
            )


class BYOL(Method):
    name = "byol"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: BYOLConfig):
        super().__init__(backbone, views)
        self.cfg = cfg
        if views.num_views != 2:
            raise ValueError(f"BYOL needs exactly 2 views per image, got {views.num_views}")
        self.projector = MLP((backbone.feature_dim, cfg.hidden_dim, cfg.out_dim))
        self.predictor = MLP((cfg.out_dim, cfg.predictor_hidden_dim, cfg.out_dim))
        # target network xi: registered submodules without gradients, so in state_dict()
        self.target_backbone = ema_copy(backbone)
        self.target_projector = ema_copy(self.projector)

    def tau(self, step: int) -> float:
        """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, K = total steps (BYOL §3.2);
        tau_base while K is unknown (a time budget being calibrated)."""
        if self.total_steps is None:
            return self.cfg.tau_base
        return cosine_ramp(step, total_steps=self.total_steps, start=self.cfg.tau_base, end=1.0)

    def lr_scales(self) -> dict[str, float]:
        """A predictor that learns faster than the encoder (DirectPred, Tian et al. 2021: the
        predictor should track the encoder's feature correlations), when predictor_lr_scale != 1."""
        scale = self.cfg.predictor_lr_scale
        return {} if scale == 1.0 else {"predictor": scale}

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        z = self.projector(torch.cat(multicrop_features(self.backbone, views)))  # [2B, out_dim]
        p1, p2 = self.predictor(z).chunk(2)  # [B, out_dim] each, online predictions
        with torch.no_grad():
            t = self.target_projector(torch.cat(multicrop_features(self.target_backbone, views)))
            t1, t2 = t.chunk(2)  # [B, out_dim] each, target projections (stop-gradient)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)  # BYOL's L + L~, in [0, 8]
        with torch.no_grad():
            metrics = {
                "tau": torch.tensor(self.tau(step), dtype=torch.float64),
                "feature_std": F.normalize(z.float(), dim=1).std(dim=0).mean(),  # -> 0 on collapse
            }
        return StepOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def after_step(self, step: int, output: StepOutput) -> None:
        tau = self.tau(step)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
