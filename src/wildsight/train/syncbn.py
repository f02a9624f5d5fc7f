"""SyncBatchNorm inside groups of processes, on any device.

SEER (Goyal et al., 2021, §3.2) "synchronize BatchNorm across groups of 64 GPUs": the batch
statistics of a BN layer are those of the images of the whole group, not of one process. torch's
``nn.SyncBatchNorm`` does this with fused CUDA kernels but refuses CPU tensors, so on the CPU
(gloo) wildsight uses ``GroupSyncBatchNorm`` below; on CUDA it uses torch's. Both keep the state
dict of ``nn.BatchNorm*d`` (weight, bias, running_mean, running_var, num_batches_tracked), so a
checkpoint moves freely between a SyncBN run and a one-process run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GroupSyncBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group's processes of x, on every process; backward sums the gradients
    the same way (d(sum_r L_r)/dx_r = sum_r dL_r/dy: every process's loss depends on y)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd owns `grad`
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sum_over_group(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out: Tensor = _AllReduceSum.apply(x, group)  # type: ignore[no-untyped-call]
    return out


class GroupSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the concatenated batches of `group`.

    x [N, C, *] -> (x - mu) / sqrt(var + eps) * gamma + beta, with mu and the biased var taken
    over the N * prod(*) positions of EVERY process of the group: one all-reduce of the [2C + 1]
    sums (sum x, sum x^2, count), accumulated in float64 (as torch's CPU BatchNorm accumulates
    its statistics), so var = E[x^2] - mu^2 loses nothing to cancellation for float32 data.
    Gradients flow through the all-reduce, so the backward is that of one process holding the
    whole group's batch. Running statistics get the unbiased var (factor n / (n - 1), n counted
    over the group), as ``nn.BatchNorm``. Normalises in float32, returns x's dtype. Processes
    may hold different batch sizes. Evaluation mode uses the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        group: dist.ProcessGroup,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GroupSyncBatchNorm expects [N, C, ...], got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)
        local = torch.cat(
            [xf.sum(dims, dtype=torch.float64), xf.square().sum(dims, dtype=torch.float64), count]
        )  # [2C + 1]
        sums = _sum_over_group(local, self.group)
        n = sums[-1]  # positions per channel over the group
        mean = sums[:c] / n  # [C], float64
        var = (sums[c : 2 * c] / n - mean.square()).clamp_min(0.0)  # [C], biased
        invstd = torch.rsqrt(var + self.eps)
        y = (xf - mean.float().view(shape)) * invstd.float().view(shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(
    module: nn.Module, group: dist.ProcessGroup, device: torch.device
) -> nn.Module:
    """Every BatchNorm{1,2,3}d in `module` becomes a SyncBatchNorm over `group`, sharing its
    parameters and buffers (an optimiser built before stays valid). torch's ``nn.SyncBatchNorm``
    on CUDA, ``GroupSyncBatchNorm`` elsewhere. Returns `module` (replaced if it is a BN)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
    if isinstance(module, _BatchNorm) and not isinstance(module, GroupSyncBatchNorm):
        new = GroupSyncBatchNorm(
            module.num_features, group, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        for key, value in vars(module).items():  # plain attributes such as `final_bn`
            if not key.startswith("_") and key not in vars(new):
                setattr(new, key, value)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, group, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
