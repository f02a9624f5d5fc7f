"""The only place that talks to ``torch.distributed``; every helper is a no-op in one process.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
``init_from_env()`` joins the group. Losses receive ``all_reduce_sum_`` / ``gather_with_grad``
as explicit arguments (STYLE rule 1), so they never ask for the world size themselves.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_sum_",
    "barrier",
    "gather_with_grad",
    "init_from_env",
    "is_distributed",
    "local_rank",
    "rank",
    "shutdown",
    "unwrap",
    "world_size",
]

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True once a process group is initialised (also for a group of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (torchrun's LOCAL_RANK); 0 in one process."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def init_from_env(backend: str | None = None) -> None:
    """Join the process group described by torchrun's environment variables.

    No-op when WORLD_SIZE is unset or 1, or when a group is already initialised. The
    backend defaults to "nccl" when CUDA is available (and then binds this process to
    ``cuda:LOCAL_RANK``), else "gloo".
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or is_distributed():
        return
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} unset; launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=size,
        **kwargs,
    )


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes, in place; returns ``t``. No-op in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: Tensor) -> Tensor:
    """Element-wise max of ``t`` over all processes, in place; returns ``t``. No-op in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # t: [B, ...]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)  # [world*B, ...]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # grad: [world*B, ...]
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd owns `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        b = grad.shape[0] // dist.get_world_size()
        return grad.narrow(0, dist.get_rank() * b, b)  # this rank's slice: [B, ...]


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` [B, ...] from all ranks in rank order -> [world*B, ...].

    Every rank must pass the same shape. Gradients flow back to each rank's own slice and
    are SUMMED over ranks: if rank r computes a loss L_r on the gathered batch, each slice
    receives d(sum_r L_r)/d(slice), which is the gradient of one process computing
    sum_r L_r over the concatenated batch. (With DDP, which averages parameter gradients,
    each rank should therefore compute its own share of the global loss, e.g. the loss
    of its local rows against the gathered batch.) Identity in one process.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    out: Tensor = _GatherWithGrad.apply(t)  # type: ignore[no-untyped-call]
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (one level); ``model`` otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        inner: nn.Module = model.module
        return inner
    return model


def barrier() -> None:
    """Wait for every process; no-op in one process."""
    if is_distributed():
        dist.barrier()
