"""NT-Xent, the contrastive loss of SimCLR (Chen et al., 2020a, eq. 1; SimCLR v2, Chen et al., 2020b).

A pure function of tensors. The only cross-process step is the `gather` passed in (pass
`train.distributed.gather_with_grad` and `rank=train.distributed.rank()` under torchrun); the
default is one process. An optional bank of extra negatives gives the MoCo-style variant that
SimCLR v2 uses ("a memory network ... whose output will be buffered as negative examples").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Gather = Callable[[Tensor], Tensor]


def nt_xent_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.1,
    *,
    gather: Gather | None = None,
    rank: int = 0,
    negatives: Tensor | None = None,
) -> Tensor:
    """Normalised temperature-scaled cross-entropy over the 2N views of N images.

    With sim(u, v) = u.v / (|u| |v|) and the 2N projections z = [z1; z2], SimCLR's eq. 1 is

        l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

    for each anchor i and its twin j (the other view of the same image), and the loss is the
    mean of l over all 2N anchors: each anchor's positive is its twin, its negatives are the
    2(N - 1) other views.

    z1, z2: [N, D] projections of the two views (row n of each is image n); L2-normalised here.
    gather: all-gathers [2N, D] -> [W * 2N, D] in rank order with gradients (as
        `distributed.gather_with_grad`); then the negatives are the views of the GLOBAL batch
        while the anchors stay this process's 2N rows, at offset `rank * 2N` of the gathered
        batch. Each process returns the mean over its own anchors; averaging parameter
        gradients over processes (DDP) then gives the gradient of the global mean.
    negatives: [M, D] optional extra negatives for every anchor (a memory bank of past
        projections from a momentum encoder); never differentiated. M = 0 is allowed.

    Computed in at least float32, even under bf16 autocast (logits are cosines / t, t ~ 0.1).
    Returns a scalar.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent_loss expects z1, z2 of the same shape [N, D], got {tuple(z1.shape)} "
            f"and {tuple(z2.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"nt_xent_loss temperature must be > 0, got {temperature}")
    if negatives is not None and (negatives.dim() != 2 or negatives.shape[1] != z1.shape[1]):
        raise ValueError(
            f"nt_xent_loss negatives must be [M, {z1.shape[1]}], got {tuple(negatives.shape)}"
        )
    n = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)  # float32 under bf16, float64 kept
    with torch.autocast(z1.device.type, enabled=False):  # bf16 logits would be ~1% off
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # [2N, D], this process's anchors
        keys = z if gather is None else gather(z)  # [W * 2N, D], rank-major
        if keys.shape[0] % (2 * n) != 0 or not 0 <= rank < keys.shape[0] // (2 * n):
            raise ValueError(
                f"gather returned {keys.shape[0]} rows for 2N = {2 * n} local rows at rank "
                f"{rank}; every process must pass the same batch size"
            )
        local = torch.arange(2 * n, device=z.device)  # [2N]
        self_index = rank * 2 * n + local  # [2N], where each anchor sits in `keys`
        twin_index = rank * 2 * n + (local + n) % (2 * n)  # [2N], its positive
        logits = z @ keys.t() / temperature  # [2N, W * 2N]
        logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float("-inf"))
        if negatives is not None:
            bank = F.normalize(negatives.detach().to(dtype), dim=1)  # [M, D]
            logits = torch.cat([logits, z @ bank.t() / temperature], dim=1)  # [2N, W*2N + M]
        return F.cross_entropy(logits, twin_index)
