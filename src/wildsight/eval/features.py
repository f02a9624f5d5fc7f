"""Frozen features: run an encoder once over a uint8 image tensor and keep [N, D] on the CPU;
the same for several probe taps of a backbone at once (``extract_layers``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.train.precision import PRECISIONS
from wildsight.train.precision import autocast as precision_autocast


def extract_features(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Tensor:
    """Features float32 [N, D] (CPU) of ``model(transform(batch))`` over images uint8 [N, C, H, W].

    Batches are moved to ``device`` as uint8 (4x less traffic than float) and ``transform``
    turns them into the model input there. Runs under ``torch.inference_mode()``; an
    ``nn.Module`` is put in eval mode and given back in the mode it came in, even on error.
    precision "bf16" (or "auto" where the hardware has bf16) runs the model under ``torch.autocast(device.type, torch.bfloat16)``; the
    result is float32 either way. The result is a normal tensor (not an inference tensor), so
    probes may use it with autograd.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"extract_features needs uint8 images [N, C, H, W], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("extract_features got no images")
    device = torch.device(device)
    autocast = precision_autocast(device, precision)
    was_training = model.training if isinstance(model, nn.Module) else None
    chunks: list[Tensor] = []
    try:
        if isinstance(model, nn.Module):
            model.eval()
        with torch.inference_mode(), autocast:
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                features = model(transform(batch))  # [B, D]
                if features.ndim != 2 or features.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"model must return features [B, D] for a batch of {batch.shape[0]}, "
                        f"got {tuple(features.shape)}"
                    )
                chunks.append(features.float().cpu())
    finally:
        if isinstance(model, nn.Module) and was_training is not None:
            model.train(was_training)
    return torch.cat(chunks).clone()  # [N, D], outside inference mode -> a normal tensor


PRE_LOGITS = "pre_logits"
GRID_SUFFIX = "_grid"
GRID_DIM_TARGET = (
    9216  # Goyal et al. 2019 (VISSL's linear benchmarks): conv taps pooled to ~9k dims
)


def layer_names(backbone: Backbone) -> list[str]:
    """Pooled probe taps of a backbone: "stage1" ... "stage{S-1}" (global average of each stage)
    and "pre_logits" (that of the last stage, what ``backbone(x)`` returns)."""
    num_stages = len(backbone.stage_dims)
    return [f"stage{i + 1}" for i in range(num_stages - 1)] + [PRE_LOGITS]


def grid_layer_names(backbone: Backbone) -> list[str]:
    """Spatial probe taps "stage1_grid" ... "stage{S}_grid": each stage's map average-pooled to
    the finest s x s grid with at most GRID_DIM_TARGET values (``grid_side``)."""
    return [f"stage{i + 1}{GRID_SUFFIX}" for i in range(len(backbone.stage_dims))]


def grid_side(channels: int, height: int, width: int, target: int = GRID_DIM_TARGET) -> int:
    """Largest s <= min(height, width) with channels * s^2 <= target (at least 1).

    This reproduces the feature sizes of Goyal et al. (2019)'s linear benchmark of ResNet-50 at
    224 px: res2 6x6x256 = 9216, res3 4x4x512 = 8192, res4 3x3x1024 = 9216, res5 2x2x2048 = 8192.
    """
    side = max(1, math.isqrt(target // max(channels, 1)))
    return max(1, min(side, height, width))


def resolve_layers(backbone: Backbone, requested: Sequence[str]) -> list[str]:
    """Requested tap names, checked, in network order (a stage's pooled tap before its grid
    tap); "all" stands for every pooled tap and "grids" for every grid tap."""
    pooled, grids = layer_names(backbone), grid_layer_names(backbone)
    expanded = [n for r in requested for n in {"all": pooled, "grids": grids}.get(r, [r])]
    order = [name for pair in zip(pooled, grids, strict=True) for name in pair]
    unknown = [r for r in expanded if r not in order]
    if unknown or not expanded:
        raise ValueError(
            f"unknown layer {unknown[0] if unknown else ''!r}; choose from {pooled}, {grids}, "
            "'all' or 'grids'"
        )
    return [n for n in order if n in expanded]


class StageTaps(nn.Module):
    """Backbone -> taps concatenated: images [B, 3, H, W] -> [B, sum_i D_i] for the chosen taps,
    in network order (split back with ``dims``, known after the first forward: a grid tap's
    size depends on the input size)."""

    def __init__(self, backbone: Backbone, layers: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        pooled, grids = layer_names(backbone), grid_layer_names(backbone)
        self.layers = resolve_layers(backbone, layers)
        # (stage index, grid?) per tap
        self.keep = [(pooled.index(n), False) if n in pooled else (grids.index(n), True)
                     for n in self.layers]  # fmt: skip
        self.dims: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        maps = self.backbone.forward_maps(x)  # S maps [B, C_i, H_i, W_i]
        taps = []
        for stage, grid in self.keep:
            fmap = maps[stage]
            if grid:
                side = grid_side(*fmap.shape[1:])
                taps.append(F.adaptive_avg_pool2d(fmap, side).flatten(1))  # [B, C_i * side^2]
            else:
                taps.append(fmap.mean(dim=(2, 3)))  # [B, C_i]
        self.dims = [t.shape[1] for t in taps]
        return torch.cat(taps, dim=1)


def extract_layers(
    backbone: Backbone,
    images: Tensor,
    layers: Sequence[str],
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """{layer: float32 [N, D_layer]} for images uint8 [N, C, H, W], from ONE forward per batch.

    "pre_logits" equals ``extract_features(backbone, ...)``; "stage{i}" is the global average
    of stage i's output (Kolesnikov et al., 2019 probe "after each block"); "stage{i}_grid" is
    stage i's map average-pooled to a grid of at most ~9k values (Goyal et al., 2019).
    """
    taps = StageTaps(backbone, layers)
    taps.train(backbone.training)  # extract_features gives the backbone back in this mode
    names = taps.layers
    joined = extract_features(
        taps, images, transform=transform, batch_size=batch_size, device=device, precision=precision
    )  # [N, sum C_i]
    return {
        name: part.contiguous()
        for name, part in zip(names, joined.split(taps.dims, dim=1), strict=True)
    }
