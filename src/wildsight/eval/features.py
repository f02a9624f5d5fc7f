"""Frozen features: run an encoder once over a uint8 image tensor and keep [N, D] on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

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
