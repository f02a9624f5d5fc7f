"""Data-parallel training: what the trainer does differently when torchrun starts N processes.

Global-batch semantics (the invariant the tests check to 1e-5): a run on W processes computes
the same losses and updates as one process with the same global batch ``train.batch_size``:

- Data: step s consumes the same G = batch_size images in every layout; rank r holds the
  global-batch positions r, r + W, r + 2W, ... (data/loader.py). Every loss here averages over
  the batch and is invariant to the order of its rows, so which rank holds which image is
  irrelevant.
- Views: every rank draws the augmentation parameters of all G positions from one generator
  seeded by (seed, step) and applies those of its own positions (``global_rows``), so an image
  gets the same crops whatever W is. Drawing G parameter rows costs microseconds.
- Losses: SwAV's Sinkhorn and NT-Xent's negatives span the global batch through the reductions
  passed to them (train/distributed.py); each rank returns the mean over its own rows, and DDP
  averages gradients, which gives the gradient of the global mean. The logged loss is the mean
  over ranks.
- BatchNorm: statistics over the batch of one process unless ``train.syncbn_group_size`` > 1
  (SEER: 64), which synchronises them over groups of that many processes (train/syncbn.py);
  with a group as large as the world, BN is that of one process with the whole batch.
- BYOL's and SimCLR's EMA networks are updated from parameters that are identical on every rank
  after each step, so they stay identical without communication.

Checkpoints are written by rank 0 only (``on_rank0``, which also makes every rank wait and raise
if the write failed). Model and optimizer states are replicated under DDP; FSDP's shards are
gathered first (``full_state``). The loader state is the same on every rank for map-style data
(a position in the global order), and merged over ranks for shard streams. A checkpoint
therefore resumes on any number of processes with the same global batch.
"""

from __future__ import annotations

import atexit
import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wildsight.backbones import Backbone
from wildsight.config import Config, ConfigError, TrainConfig
from wildsight.data import Batch, Loader, SkipLog, merge_states
from wildsight.methods.base import StepOutput
from wildsight.train import distributed
from wildsight.train.checkpoint import CheckpointError
from wildsight.train.syncbn import convert_sync_batchnorm

__all__ = [
    "NullLog",
    "StopSync",
    "check_config",
    "forward_backward",
    "full_state",
    "gather_skips",
    "global_rows",
    "loader_state",
    "local_batch_size",
    "on_rank0",
    "rank_file",
    "shard_optimizer_state",
    "shard_state_like",
    "start",
    "trim_batch",
    "wrap",
]

T = TypeVar("T")


# ------------------------------------------------------------------------------ set-up


def start(device: torch.device) -> None:
    """Join torchrun's process group (NCCL for a CUDA device, else gloo); no-op in one process
    or when a group exists. A group joined here is kept for later runs of this process and
    left at exit (re-joining at once would race with slower ranks still in the old group)."""
    if not distributed.is_distributed():
        distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
        if distributed.is_distributed():
            atexit.register(distributed.shutdown)


def check_config(cfg: Config) -> None:
    """Refuse combinations the parallel code cannot run exactly (one line each)."""
    t = cfg.train
    if t.accumulate_steps > 1 and getattr(cfg.method, "queue_length", 0) > 0:
        raise ConfigError(
            "train.accumulate_steps > 1 with method.queue_length > 0: SwAV's queue update "
            "cannot be split over micro-batches yet; use one of them"
        )
    if t.parallel == "fsdp" and t.init_from and distributed.world_size() > 1:
        raise ConfigError(
            "train.init_from with train.parallel 'fsdp' is not supported yet; initialise with ddp"
        )


def local_batch_size(global_batch: int, accumulate_steps: int = 1) -> int:
    """Images per process per step: the global batch split over the processes; it must also
    split into `accumulate_steps` micro-batches."""
    world = distributed.world_size()
    if global_batch % (world * accumulate_steps):
        raise ConfigError(
            f"train.batch_size {global_batch} is the global batch and must split evenly over "
            f"{world} processes x {accumulate_steps} accumulation steps; use a multiple of "
            f"{world * accumulate_steps}"
        )
    return global_batch // world


def wrap(method: nn.Module, t: TrainConfig, device: torch.device) -> nn.Module:
    """`method` ready for N processes: BN synchronised within groups of
    `t.syncbn_group_size`, then DDP (default) or FSDP. Returns what to call for the forward
    pass; `method` itself stays the module whose state is saved. Identity in one process."""
    world = distributed.world_size()
    if world == 1:
        return method
    group = _syncbn_group(t.syncbn_group_size)
    if group is not None:
        convert_sync_batchnorm(method, group, device)
    if t.parallel == "fsdp":
        _fully_shard(method, device)
        return method
    return nn.parallel.DistributedDataParallel(
        method,
        device_ids=[distributed.local_rank()] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # SwAV's queue is per process; SyncBN keeps BN stats equal
        find_unused_parameters=False,  # every trainable parameter is used at every step
        gradient_as_bucket_view=True,
    )


def _syncbn_group(group_size: int) -> dist.ProcessGroup | None:
    """This process's SyncBN group: ranks [k * g, (k + 1) * g) with g = min(group_size, world)."""
    world = distributed.world_size()
    size = min(group_size, world)
    if size <= 1:
        return None
    if world % size:
        raise ConfigError(
            f"train.syncbn_group_size {group_size} does not divide the {world} processes; "
            "use a divisor of the world size (or 0 for per-process BatchNorm)"
        )
    group, _ = dist.new_subgroups(group_size=size)  # every rank creates every group
    return group


def _fully_shard(method: nn.Module, device: torch.device) -> None:
    """FSDP2 (``fully_shard``): each block of every backbone (the online one and EMA copies)
    is a unit, then each backbone, then the method (heads, prototypes). Parameters become
    DTensors sharded on dim 0 over all processes; parameters of a unit are gathered for its
    forward and backward and freed after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    for backbone in [m for m in method.modules() if isinstance(m, Backbone)]:
        for stage in backbone.stage_modules():
            for block in stage.children():
                fully_shard(block, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
    fully_shard(method, mesh=mesh)


# --------------------------------------------------------------------------- each step


def global_rows(n: int) -> Tensor:
    """int64 [n]: positions in the global batch of this rank's n images (r, r + W, ...)."""
    return torch.arange(n) * distributed.world_size() + distributed.rank()


def trim_batch(batch: Batch) -> Batch:
    """Cut every rank's batch to the smallest one (images dropped as undecodable make them
    differ), so that collectives over batch rows (NT-Xent's gather) see equal shapes."""
    if distributed.world_size() == 1:
        return batch
    n = _reduce(torch.tensor([float(len(batch.images))]), dist.ReduceOp.MIN)
    m = int(n.item())
    if m == len(batch.images):
        return batch
    aspects = None if batch.aspects is None else batch.aspects[:m]
    return Batch(batch.images[:m], batch.indices[:m], batch.labels[:m], aspects)


def forward_backward(
    model: nn.Module,
    views: Sequence[Tensor],
    step: int,
    *,
    accumulate_steps: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[StepOutput, float]:
    """Forward and backward of one step, as `accumulate_steps` micro-batches.

    views: one [B, 3, s, s] tensor per view; micro-batch i is rows i, i + k, i + 2k, ... (k =
    `accumulate_steps`), i.e. global positions r + W i + W k j: the micro-batches of W processes
    are exactly the batches of W k processes, so with per-process BatchNorm and a per-sample
    loss (BYOL) accumulation over k equals k times more processes.
    Returns (output, loss) where loss is the mean over micro-batches and processes, a float.
    The backward of a micro-batch runs only if its loss is finite on every process (the
    decision must be the same on all of them, or DDP waits forever); a non-finite loss is
    returned at once, with no further micro-batch. Each micro-batch's loss is divided by their
    number, so gradients are their mean. DDP all-reduces only in the last backward. The output
    averages metrics and concatenates aux tensors along dim 0 over the micro-batches.
    """
    parts = max(1, min(accumulate_steps, int(views[0].shape[0])))
    micro = [[view[i::parts] for view in views] for i in range(parts)] if parts > 1 else [views]
    outputs: list[StepOutput] = []
    losses: list[float] = []
    for i, micro_views in enumerate(micro):
        last = i == parts - 1
        no_sync = isinstance(model, nn.parallel.DistributedDataParallel) and not last
        with model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with autocast():
                out = model(micro_views, step)
            loss = _mean_over_ranks(out.loss)
            if not math.isfinite(loss):
                return out, loss
            (out.loss / parts if parts > 1 else out.loss).backward()
        outputs.append(out)
        losses.append(loss)
    if parts == 1:
        return outputs[0], losses[0]
    merged = StepOutput(
        loss=torch.tensor(sum(losses) / parts),
        metrics={
            k: torch.stack([o.metrics[k].float() for o in outputs]).mean() for k in out.metrics
        },
        aux={k: torch.cat([o.aux[k] for o in outputs]) for k in out.aux},
    )
    return merged, sum(losses) / parts


def _mean_over_ranks(loss: Tensor) -> float:
    if distributed.world_size() == 1:
        return float(loss.item())
    total = _reduce(loss.detach().float().reshape(1).clone(), dist.ReduceOp.SUM)
    return float(total.item()) / distributed.world_size()


def _reduce(t: Tensor, op: dist.ReduceOp) -> Tensor:
    """all_reduce of a small CPU tensor, through the device NCCL needs."""
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(device)
    dist.all_reduce(t, op=op)
    return t.cpu()


class StopSync:
    """Every process must stop at the same step, or the others wait forever in a collective.

    `agree` is called once per step at the same point on every rank: ranks agree on the
    largest elapsed time (so the time-budget schedule, hence the LR, is the same everywhere)
    and on whether any rank received SIGTERM/SIGINT. `received` then returns that agreed
    signal, never one that arrived on this rank after the agreement. One process: pass-through.
    """

    _CODES = {None: 0.0, "SIGINT": 1.0, "SIGTERM": 2.0}

    def __init__(self) -> None:
        self.signal: str | None = None

    def agree(self, received: str | None, elapsed_s: float) -> float:
        """Returns the agreed elapsed seconds."""
        if distributed.world_size() == 1:
            return elapsed_s
        both = torch.tensor([self._CODES.get(received, 2.0), elapsed_s], dtype=torch.float64)
        code, elapsed = _reduce(both, dist.ReduceOp.MAX).tolist()
        self.signal = {v: k for k, v in self._CODES.items()}[code]
        return float(elapsed)

    def received(self, live: str | None) -> str | None:
        return live if distributed.world_size() == 1 else self.signal


# ------------------------------------------------------------------------- checkpoints


def on_rank0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run `fn` on rank 0 only; every rank waits for it, and if it raised, every rank raises
    (the others a CheckpointError or RuntimeError naming rank 0's error). One process: fn()."""
    if distributed.world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if distributed.rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # re-raised below, after the other ranks have heard of it
            error = err
    box: list[Any] = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        kind, message = box[0]
        cls = CheckpointError if kind == "CheckpointError" else RuntimeError
        raise cls(f"rank 0: {message}")
    return result


def loader_state(loader: Loader) -> dict[str, Any]:
    """The loader state to checkpoint, the same on every rank (a collective: call on all).

    Shard streams: every rank's slots merged (data/stream.py `merge_states`). Map-style data:
    (epoch, position) counts images consumed by all ranks, so every rank holds the same one
    (the furthest is kept if a rank ran ahead after a wholly undecodable batch); skip counters
    are summed. It resumes on any number of processes with the same global batch exactly.
    """
    state = loader.state_dict()
    if distributed.world_size() == 1:
        return state
    states: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(states, state)
    if state.get("kind") == "shards":
        return merge_states(states)
    merged = dict(max(states, key=lambda s: (int(s["epoch"]), int(s["position"]))))
    for name in ("attempted", "skipped"):
        merged[name] = sum(int(s.get(name, 0)) for s in states)
    return merged


def gather_skips(skips: SkipLog) -> SkipLog:
    """Every rank's skipped images in one SkipLog (a collective: call on all ranks)."""
    if distributed.world_size() == 1:
        return skips
    logs: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(logs, skips.reasons)
    merged = SkipLog()
    for reasons in logs:
        for key, reason in reasons.items():
            merged.add(key, reason)
    return merged


def full_state(tree: Any) -> Any:
    """A state_dict (nested) with every FSDP-sharded DTensor gathered into a full tensor; other
    values unchanged. A collective under FSDP: call on every rank in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: full_state(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(full_state(v) for v in tree)
    return tree


def shard_state_like(reference: Any, full: Any) -> Any:
    """`full` (as `full_state` returned) sharded as `reference` (this rank's state_dict): every
    value whose reference is a DTensor becomes this rank's shard of it. Identity without FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and isinstance(full, Tensor):
        value = full.to(reference.device, reference.dtype)
        return distribute_tensor(value, reference.device_mesh, reference.placements)
    if isinstance(reference, dict) and isinstance(full, dict):
        return {k: shard_state_like(reference.get(k), v) for k, v in full.items()}
    if isinstance(reference, list | tuple) and isinstance(full, list | tuple):
        if len(reference) == len(full):
            return type(full)(shard_state_like(r, v) for r, v in zip(reference, full, strict=True))
    return full


def shard_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> dict:
    """`full` (a `full_state` of ``optimizer.state_dict()``) with every per-parameter tensor of
    an FSDP parameter's shape (momentum, Adam moments) sharded like that parameter. Identity
    without FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict ids
    if not any(isinstance(p, DTensor) for p in params):
        return full
    state = {}
    for idx, entry in full["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if isinstance(p, DTensor) and isinstance(v, Tensor) and v.shape == p.shape
            else v
            for k, v in entry.items()
        }
    return {**full, "state": state}


# ----------------------------------------------------------------------------- logging


def rank_file(name: str) -> str:
    """`name` on rank 0, `stem.rankR.suffix` elsewhere (files each rank writes on its own)."""
    r = distributed.rank()
    if r == 0:
        return name
    path = Path(name)
    return f"{path.stem}.rank{r}{path.suffix}"


class NullLog:
    """RunLog's interface, writing nothing: ranks other than 0 log nothing (rank 0 logs the
    global loss, which every rank knows)."""

    def set_total(self, total_steps: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def write(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
