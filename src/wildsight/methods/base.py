"""What every method is to the trainer, and the multi-crop backbone call they share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.views import ViewSpec


@dataclass
class StepOutput:
    """loss: scalar to minimise. metrics: detached scalars to log. aux: tensors `after_step` needs."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    aux: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A self-supervised objective around a backbone. The trainer calls, per step, in order:

    `set_total_steps(total)`; `before_step(step)`; `out = self(views, step)` under autocast;
    backward; grads of `frozen_parameters(step)` set to None; optimizer step;
    `after_step(step, out)`.

    Invariant: everything that affects the next step (queues, EMA targets, counters) is a
    parameter, a persistent buffer or a submodule registered in `__init__`, so it is in
    `state_dict()` and a resumed run continues exactly.
    """

    name: ClassVar[str]

    def __init__(self, backbone: Backbone, views: ViewSpec):
        super().__init__()
        self.backbone = backbone
        self.views = views
        self.total_steps: int | None = None  # the run's length, from `set_total_steps`

    def set_total_steps(self, total_steps: int | None) -> None:
        """The trainer tells the run's length before every step (None while a time budget is
        still being calibrated). Not state: the trainer re-derives it on resume. BYOL's tau
        schedule reads it."""
        self.total_steps = total_steps

    def before_step(self, step: int) -> None:
        """Called before the forward pass (e.g. SwAV normalises its prototypes)."""

    def forward(self, views: Sequence[Tensor], step: int) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def frozen_parameters(self, step: int) -> Iterable[nn.Parameter]:
        """Parameters whose gradient the trainer drops at this step (SwAV: prototypes, epoch 1)."""
        return ()

    def lr_scales(self) -> dict[str, float]:
        """Submodule name -> multiplier of the scheduled LR for its parameters (BYOL: a faster
        predictor). Read once, when the optimiser is built."""
        return {}

    def after_step(self, step: int, output: StepOutput) -> None:
        """Called after the optimizer step (e.g. queue update, EMA update)."""

    def encoder(self) -> nn.Module:
        """The module whose output users evaluate, embed and export."""
        return self.backbone


def multicrop_features(backbone: nn.Module, views: Sequence[Tensor]) -> list[Tensor]:
    """Backbone features of every view, one backbone call per run of equal-resolution views.

    As DINO's MultiCropWrapper: [2 x 224, 6 x 96] costs two forward passes, not eight, and
    BatchNorm sees all views of one resolution together. Returns one [B, D] tensor per view.
    """
    features: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out = backbone(torch.cat(list(views[start:end])))  # [(end - start) * B, D]
        features.extend(out.chunk(end - start))
        start = end
    return features
