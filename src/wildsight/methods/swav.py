"""SwAV (Caron et al., 2020) and its SEER configuration (Goyal et al., 2021).

backbone -> MLP head -> L2-normalise -> prototypes (no bias, normalised) -> swav_loss.
Codes come from Sinkhorn over the global batch (plus an optional queue of past features).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.heads import MLP, Prototypes
from wildsight.losses import swav_loss
from wildsight.methods.base import Method, StepOutput, multicrop_features
from wildsight.train import distributed
from wildsight.views import ViewSpec


@dataclass(frozen=True)
class SwAVConfig:
    """SwAV hyper-parameters. Defaults: SwAV ResNet-50 (2048 -> 2048 -> 128, 3000 prototypes)."""

    name: Literal["swav"] = "swav"
    hidden_dims: tuple[int, ...] = (2048,)
    out_dim: int = 128
    head_batchnorm: bool = True
    num_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 313  # SwAV: the first epoch at batch 4096
    queue_length: int = 0  # SwAV: 3840 features per process for small batches; 0 = no queue
    queue_start_step: int = 0

    def __post_init__(self) -> None:
        if self.num_prototypes < 2:
            raise ValueError(f"method.num_prototypes must be >= 2, got {self.num_prototypes}")
        if not (self.temperature > 0 and self.epsilon > 0 and self.sinkhorn_iterations >= 1):
            raise ValueError(
                "method.temperature and method.epsilon must be > 0 and method.sinkhorn_iterations >= 1, "
                f"got {self.temperature}, {self.epsilon}, {self.sinkhorn_iterations}"
            )
        if self.queue_length < 0 or self.freeze_prototypes_steps < 0 or self.queue_start_step < 0:
            raise ValueError(
                "method.queue_length, freeze_prototypes_steps and queue_start_step must be >= 0"
            )


class SwAV(Method):
    name = "swav"

    def __init__(self, backbone: Backbone, views: ViewSpec, cfg: SwAVConfig):
        super().__init__(backbone, views)
        self.cfg = cfg
        self.num_global = views.num_global
        if views.num_views < 2 or self.num_global < 1:
            raise ValueError(
                f"SwAV needs at least 2 views with >= 1 global crop, got {views.num_views}"
            )
        dims = (backbone.feature_dim, *cfg.hidden_dims, cfg.out_dim)
        self.projector = MLP(dims, batchnorm=cfg.head_batchnorm)
        self.prototypes = Prototypes(cfg.out_dim, cfg.num_prototypes)
        # Queue of past normalised features of the global crops: [num_global, L, out_dim].
        # `queue_size` counts valid rows (newest first). Both persistent: they survive resume.
        self.register_buffer("queue", torch.zeros(self.num_global, cfg.queue_length, cfg.out_dim))
        self.register_buffer("queue_size", torch.zeros((), dtype=torch.long))

    def before_step(self, step: int) -> None:
        self.prototypes.normalize_()

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:
        batch = views[0].shape[0]
        feats = torch.cat(multicrop_features(self.backbone, views))  # [V * B, D]
        z = F.normalize(self.projector(feats), dim=1)  # [V * B, out_dim]
        scores = self.prototypes(z).chunk(len(views))  # V x [B, K]
        queue_scores = None
        if self._queue_ready(step):
            # every process holds the whole (global) queue; each scores its own strided share, so
            # Sinkhorn's all-reduced sums count every queued feature once, as in one process
            share = slice(distributed.rank(), None, distributed.world_size())
            queue_scores = [
                self.prototypes(self.queue[i, share].to(z.dtype)) for i in range(self.num_global)
            ]
        loss = swav_loss(
            scores,
            num_global=self.num_global,
            temperature=self.cfg.temperature,
            epsilon=self.cfg.epsilon,
            iterations=self.cfg.sinkhorn_iterations,
            queue_scores=queue_scores,
            all_reduce_sum=distributed.all_reduce_sum_,
            all_reduce_max=distributed.all_reduce_max_,
        )
        with torch.no_grad():
            # cheap collapse signals: entropy of the mean assignment (ln K when prototypes are all
            # used evenly, 0 when every sample picks the same one) and per-dimension feature std
            assign = F.softmax(scores[0].float() / self.cfg.temperature, dim=1).mean(0)  # [K]
            entropy = -(assign * assign.clamp_min(1e-12).log()).sum()
            feature_std = (  # undefined for one image: NaN, which the collapse monitor skips
                z[:batch].float().std(dim=0).mean() if batch > 1 else z.new_full((), math.nan)
            )
            # entropy of the hard assignments / ln min(B, K): 0 when every image picks the same
            # prototype, even if the soft codes are uniform (loss stuck at ln K); read by the
            # trainer's collapse warning (train/guards.py)
            k = self.cfg.num_prototypes
            used = torch.bincount(scores[0].argmax(dim=1), minlength=k).float() / batch  # [K]
            code_entropy_norm = -(used * used.clamp_min(1e-12).log()).sum() / math.log(
                max(2, min(batch, k))
            )
        return StepOutput(
            loss=loss,
            metrics={
                "code_entropy": entropy,
                "code_entropy_norm": code_entropy_norm,
                "feature_std": feature_std,
            },
            aux={"global_z": z[: self.num_global * batch].detach()},
        )

    def _queue_ready(self, step: int) -> bool:
        return self.cfg.queue_length > 0 and int(self.queue_size) >= self.cfg.queue_length

    def frozen_parameters(self, step: int) -> Iterable[nn.Parameter]:
        return (self.prototypes.weight,) if step < self.cfg.freeze_prototypes_steps else ()

    @torch.no_grad()
    def after_step(self, step: int, output: StepOutput) -> None:
        length = self.cfg.queue_length
        if length == 0 or step < self.cfg.queue_start_step:  # used once full, as SwAV
            return
        z = output.aux["global_z"].float().view(self.num_global, -1, self.cfg.out_dim)  # [G, B, D]
        # the queue holds features of the GLOBAL batch, in rank order, so it is the same on every
        # process: a checkpoint (written by rank 0) resumes exactly on any number of processes,
        # and W processes keep the queue of one process with the same global batch
        g, b, d = z.shape
        z = distributed.gather_with_grad(z.transpose(0, 1).reshape(b, g * d))  # [W * B, G * D]
        # rank r holds global positions r, r + W, ... (train/parallel.py: global_rows), so the
        # rank-major gather [W, B] is put back in global-batch order [B, W] -> [W * B]
        w = z.shape[0] // b
        z = z.view(w, b, g, d).transpose(0, 1).reshape(w * b, g, d).transpose(0, 1)  # [G, W*B, D]
        batch = min(z.shape[1], length)
        self.queue[:, batch:] = self.queue[:, :-batch].clone()  # shift older entries back
        self.queue[:, :batch] = z[:, :batch]
        self.queue_size.fill_(min(length, int(self.queue_size) + batch))
