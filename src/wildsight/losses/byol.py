"""BYOL's regression loss (Grill et al., 2020, eq. 2): a pure function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Mean over rows of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z).

    p: [B, D] online predictions q(z_online) of one view; z: [B, D] target projections of the
    OTHER view. The caller detaches `z` (the target is a stop-gradient) and symmetrises,
    BYOL's L + L~ = byol_loss(p1, z2) + byol_loss(p2, z1). Each term lies in [0, 4].
    Computed in at least float32, even under bf16 autocast. Returns a scalar.
    """
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(
            f"byol_loss expects p, z of the same shape [B, D], got {tuple(p.shape)} and "
            f"{tuple(z.shape)}"
        )
    dtype = torch.promote_types(p.dtype, torch.float32)  # float32 under bf16, float64 kept
    cos = (F.normalize(p.to(dtype), dim=1) * F.normalize(z.to(dtype), dim=1)).sum(dim=1)  # [B]
    return (2 - 2 * cos).mean()
