"""SwAV: swapped prediction of Sinkhorn-Knopp codes (Caron et al., 2020; SEER, Goyal et al., 2021).

Both functions are pure functions of tensors. The only cross-process communication is the pair
of reductions passed in as arguments; their defaults are the single-process no-ops, so the same
call is correct in one process and under torchrun (pass `train.distributed.all_reduce_sum_` and
`all_reduce_max_`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def _local(t: Tensor) -> Tensor:
    return t


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    all_reduce_sum: Reduce = _local,
    all_reduce_max: Reduce = _local,
) -> Tensor:
    """Soft cluster codes from prototype scores by Sinkhorn-Knopp, as in SwAV's `distributed_sinkhorn`.

    Q = exp(scores / epsilon)^T is alternately normalised so that "the total weight per prototype
    is 1/K" and "the total weight per sample is 1/B", B being the GLOBAL batch: the sums are
    all-reduced over processes. The result is returned transposed back and scaled by B so that
    each sample's code sums to 1.

    scores: [B, K] local scores (any dtype). Returns [B, K] float32 codes, rows summing to 1.
    Always float32 even under bf16/fp16 autocast, and the global max score is subtracted before the
    exponential (exp(1 / 0.05) = e^20 overflows fp16; a smaller epsilon overflows float32 too). A
    constant shift cancels in the first normalisation, so the codes are unchanged by it.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape [B, K], got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(
            f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}"
        )
    scores = scores.float()
    shift = all_reduce_max(scores.max().reshape(1).clone())  # [1], global max score
    q = torch.exp((scores - shift) / epsilon).t()  # [K, B_local]
    num_prototypes = q.shape[0]
    batch = all_reduce_sum(torch.tensor([float(q.shape[1])], device=q.device))  # [1], global B
    q /= all_reduce_sum(q.sum().reshape(1))
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # [K, 1]: each prototype gets 1/K
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)  # [1, B]: each sample gets 1/B (column sums are local)
        q /= batch
    return (q * batch).t()  # [B, K], rows sum to 1


def swav_loss(
    scores: Sequence[Tensor],
    num_global: int = 2,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    queue_scores: Sequence[Tensor] | None = None,
    all_reduce_sum: Reduce = _local,
    all_reduce_max: Reduce = _local,
) -> Tensor:
    """SwAV swapped-prediction loss over multi-crop views.

    scores: one [B, K] tensor per crop (z_v . c_k with z and the prototypes c L2-normalised),
    the `num_global` large crops first. For each large crop i, codes q_i = sinkhorn(scores_i)
    (no gradient) are predicted from every other crop v:
        l(i, v) = - sum_k q_ik log softmax(scores_v / temperature)_k,
    averaged over the batch and the V - 1 other crops, then over the large crops.
    queue_scores: optional [L, K] scores of queued past features, one per large crop; they join
    the Sinkhorn batch (so small batches still spread over K prototypes) but get no loss.
    """
    if not 1 <= num_global <= len(scores) or len(scores) < 2:
        raise ValueError(
            f"swav_loss needs at least 2 crops and 1 <= num_global <= crops, "
            f"got {len(scores)} crops and num_global={num_global}"
        )
    batch = scores[0].shape[0]
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]  # V x [B, K]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for i in range(num_global):
        pool = scores[i].detach()
        if queue_scores is not None:
            pool = torch.cat([pool.float(), queue_scores[i].detach().float()])  # [B + L, K]
        codes = sinkhorn(
            pool, epsilon, iterations, all_reduce_sum=all_reduce_sum, all_reduce_max=all_reduce_max
        )[:batch]  # [B, K]
        crop_losses = [
            -(codes * log_probs[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i
        ]
        total = total + torch.stack(crop_losses).mean()
    return total / num_global
