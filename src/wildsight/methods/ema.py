"""Momentum (EMA) copies of a network: BYOL's target network, SimCLR v2's MoCo-style memory encoder."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(module: nn.Module) -> nn.Module:
    """A deep copy with `requires_grad=False`: the optimiser skips it (`param_groups`), and,
    registered as a submodule, it is in `state_dict()`, so a resumed run continues exactly."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau * xi + (1 - tau) * theta for every parameter (BYOL eq. 1; MoCo's key encoder).

    Buffers (BatchNorm running statistics) are not averaged: the target computes its own in
    its forward pass, as in BYOL and MoCo. tau = 1 leaves the target unchanged.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"EMA rate tau must be in [0, 1], got {tau}")
    xi = list(target.parameters())
    theta = [p.detach() for p in online.parameters()]
    if len(xi) != len(theta):
        raise ValueError(f"EMA target has {len(xi)} parameters, online has {len(theta)}")
    torch._foreach_mul_(xi, tau)
    torch._foreach_add_(xi, theta, alpha=1.0 - tau)
