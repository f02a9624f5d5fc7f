"""Losses: small pure functions of tensors. Cross-process reductions are explicit arguments."""

from wildsight.losses.swav import sinkhorn, swav_loss

__all__ = ["sinkhorn", "swav_loss"]
