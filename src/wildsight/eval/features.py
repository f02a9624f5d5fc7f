"""Frozen features: run an encoder once over a uint8 image tensor and keep [N, D] on the CPU;
the same for several probe taps of a backbone at once (``extract_layers``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
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


def layer_names(backbone: Backbone) -> list[str]:
    """Probe taps of a backbone: "stage1" ... "stage{S-1}" (pooled output of each stage) and
    "pre_logits" (the pooled output of the last stage, what ``backbone(x)`` returns)."""
    num_stages = len(backbone.stage_dims)
    return [f"stage{i + 1}" for i in range(num_stages - 1)] + [PRE_LOGITS]


def resolve_layers(backbone: Backbone, requested: Sequence[str]) -> list[str]:
    """``["all"]`` -> every tap; otherwise the requested names, checked, in network order."""
    names = layer_names(backbone)
    if list(requested) == ["all"]:
        return names
    unknown = [r for r in requested if r not in names]
    if unknown or not requested:
        raise ValueError(
            f"unknown layer {unknown[0] if unknown else ''!r}; choose from {names} or 'all'"
        )
    return [n for n in names if n in requested]


class StageTaps(nn.Module):
    """Backbone -> pooled taps concatenated: images [B, 3, H, W] -> [B, sum_i C_i] for the chosen
    taps, in network order (split back with ``dims``)."""

    def __init__(self, backbone: Backbone, layers: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        names = layer_names(backbone)
        self.keep = [names.index(name) for name in layers]  # stage indices, network order
        self.dims = [backbone.stage_dims[i] for i in self.keep]

    def forward(self, x: Tensor) -> Tensor:
        taps = self.backbone.forward_stages(x)  # S tensors [B, C_i]
        return torch.cat([taps[i] for i in self.keep], dim=1)


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
    """{layer: float32 [N, C_layer]} for images uint8 [N, C, H, W], from ONE forward per batch.

    "pre_logits" equals ``extract_features(backbone, ...)``; "stage{i}" is the global average
    of stage i's output (Kolesnikov et al., 2019 probe "after each block").
    """
    taps = StageTaps(backbone, resolve_layers(backbone, layers))
    taps.train(backbone.training)  # extract_features gives the backbone back in this mode
    names = [layer_names(backbone)[i] for i in taps.keep]
    joined = extract_features(
        taps, images, transform=transform, batch_size=batch_size, device=device, precision=precision
    )  # [N, sum C_i]
    return {
        name: part.contiguous()
        for name, part in zip(names, joined.split(taps.dims, dim=1), strict=True)
    }
