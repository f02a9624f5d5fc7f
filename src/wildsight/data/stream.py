"""Shards as a stream: rank/worker splitting, block shuffling, endless mode, exact resume.

Slots. Rank r of R with W loader workers owns slots s = r * W + w of S = R * W. In epoch e the
shards are permuted by (seed, e) (the same permutation on every rank) and slot s reads shards
`perm_e[s::S]` in that order, so every shard, hence every sample, is read exactly once per
epoch by exactly one slot. When S does not divide the number of shards, slots s < n_shards % S
read one shard more than the others; in endless mode (the trainer's) slots simply run on into
the next epoch, so no rank ever waits for another at an epoch boundary. W is lowered to
n_shards // R when there are fewer shards than slots (never below 1); fewer shards than ranks
is an error.

Shuffling. A slot reads its samples in blocks of `block_size` consecutive samples (the shuffle
buffer, which may span shards) and yields each block in an order permuted by (seed, e, s,
block). Samples move at most one block away, as with WebDataset's shuffle buffer, and the order
is a pure function of the slot's position, which makes resume exact.

Position. A slot's state is {epoch, block, done, cursor, offset}: block `block` of epoch
`epoch` starts at sample `offset` of the slot's `cursor`-th shard, and `done` of its samples
are consumed. Resuming re-reads that one block (at most block_size samples, read but not
decoded or trained on again) and continues with sample `done + 1`: nothing is replayed.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wildsight.data.decode import Skip
from wildsight.data.shards import RawSample, ShardDataset
from wildsight.data.sources import DataError

DEFAULT_BLOCK_SIZE = 1000  # samples per shuffle block, per worker (WebDataset examples: 1000-5000)
_STATE_KEYS = ("epoch", "block", "done", "cursor", "offset")


class UnknownLengthError(DataError, TypeError):
    """len() of a stream without index.json; a TypeError too, so list(loader) still works."""


def seeded_permutation(n: int, *words: int) -> list[int]:
    """A permutation of range(n) that is a pure function of the integer words."""
    mixed = np.random.SeedSequence([0x5EED, *(w % 2**32 for w in words)]).generate_state(1)
    generator = torch.Generator().manual_seed(int(mixed[0]))
    return torch.randperm(n, generator=generator).tolist()


def slot_shards(
    num_shards: int, num_slots: int, slot: int, *, seed: int, epoch: int, shuffle: bool
) -> list[int]:
    """The shards slot `slot` reads in epoch `epoch`, in order: perm_e[slot::num_slots]."""
    order = seeded_permutation(num_shards, seed, epoch) if shuffle else list(range(num_shards))
    return order[slot::num_slots]


def fresh_state(epoch: int = 0) -> dict[str, int]:
    return dict.fromkeys(_STATE_KEYS, 0) | {"epoch": epoch}


@dataclass(frozen=True)
class SlotConfig:
    """Everything that fixes a slot's sample order (with the dataset)."""

    seed: int
    shuffle: bool
    num_slots: int
    block_size: int
    endless: bool
    whole: bool = False  # decode whole pictures with their aspect ratio (pretraining)


def _read_from(
    ds: ShardDataset, shards: list[int], cursor: int, offset: int
) -> Iterator[tuple[RawSample | Skip, int, int]]:
    """Samples from (cursor, offset) on, each with the position just after it."""
    for c in range(cursor, len(shards)):
        for item in ds.samples(shards[c], offset if c == cursor else 0):
            if isinstance(item, Skip):  # a damaged shard: the rest of it is gone
                yield item, c + 1, 0
            else:
                yield item, c, item.offset + 1


def slot_items(
    ds: ShardDataset, slot: int, cfg: SlotConfig, state: dict[str, int]
) -> Iterator[tuple[RawSample | Skip, dict[str, int]]]:
    """The slot's samples (or damaged-shard Skips) from `state` on, each with the state after it.

    Not endless: stops at the end of the state's epoch. The state after a block's last item is
    the next block's start (or the next epoch's), so a resume never re-reads a finished block.
    """
    epoch, block, done, cursor, offset = (int(state[k]) for k in _STATE_KEYS)
    while True:
        shards = slot_shards(
            len(ds.shards), cfg.num_slots, slot, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle
        )
        reader = _read_from(ds, shards, cursor, offset)
        pending = next(reader, None)
        empty_epoch = pending is None and (block, done, cursor, offset) == (0, 0, 0, 0)
        while pending is not None:
            items: list[RawSample | Skip] = []
            while pending is not None and len(items) < cfg.block_size:
                item, cursor_after, offset_after = pending
                items.append(item)
                pending = next(reader, None)
            order = (
                seeded_permutation(len(items), cfg.seed, epoch, slot, block)
                if cfg.shuffle
                else list(range(len(items)))
            )
            for n in range(done + 1, len(items) + 1):
                if n < len(items):
                    after = {"epoch": epoch, "block": block, "done": n, "cursor": cursor, "offset": offset}  # fmt: skip
                elif pending is None:
                    after = fresh_state(epoch + 1)
                else:
                    after = {"epoch": epoch, "block": block + 1, "done": 0, "cursor": cursor_after, "offset": offset_after}  # fmt: skip
                yield items[order[n - 1]], after
            block, done, cursor, offset = block + 1, 0, cursor_after, offset_after
        if empty_epoch and cfg.endless:
            raise DataError(f"slot {slot} of {ds.name} found no samples in a whole epoch")
        epoch, block, done, cursor, offset = epoch + 1, 0, 0, 0, 0
        if not cfg.endless:
            return


@dataclass
class StreamBatch:
    """A batch of one slot; `state` is the slot's state once the batch is consumed."""

    images: torch.Tensor  # uint8 [b, 3, S, S]
    indices: torch.Tensor  # int64 [b], ShardDataset.index(shard, offset)
    labels: torch.Tensor  # int64 [b], -1 where unknown
    aspects: torch.Tensor  # float32 [b], width / height of what each image shows
    skips: list[Skip]
    attempted: int  # samples (and damaged shards) consumed by this batch
    worker: int
    state: dict[str, int] = field(default_factory=dict)


def slot_batches(
    ds: ShardDataset,
    slot: int,
    cfg: SlotConfig,
    state: dict[str, int],
    *,
    batch_size: int,
    drop_last: bool,
    worker: int = 0,
) -> Iterator[StreamBatch]:
    """Decoded batches of `batch_size` images of one slot. Undecodable samples are replaced by
    the next ones (and listed in `skips`); the last partial batch of a finite epoch is kept
    unless drop_last (then it comes back empty, still carrying its skips and state)."""
    size = ds.image_size
    images: list[torch.Tensor] = []
    indices: list[int] = []
    labels: list[int] = []
    aspects: list[float] = []
    skips: list[Skip] = []
    attempted, good_in_epoch, epoch = 0, 0, int(state["epoch"])
    whole_epoch = state == fresh_state(epoch)
    after = dict(state)

    def batch(keep: bool) -> StreamBatch:
        kept = images if keep else []
        return StreamBatch(
            torch.stack(kept) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8),
            torch.tensor(indices if keep else [], dtype=torch.int64),
            torch.tensor(labels if keep else [], dtype=torch.int64),
            torch.tensor(aspects if keep else [], dtype=torch.float32),
            list(skips), attempted, worker, dict(after),
        )  # fmt: skip

    for item, after in slot_items(ds, slot, cfg, state):
        attempted += 1
        decoded = item if isinstance(item, Skip) else ds.decode_with_aspect(item, whole=cfg.whole)
        if isinstance(decoded, Skip):
            skips.append(decoded)
        else:
            assert isinstance(item, RawSample)
            images.append(decoded[0])
            indices.append(ds.index(item.shard, item.offset))
            labels.append(decoded[1])
            aspects.append(decoded[2])
            good_in_epoch += 1
        if after["epoch"] != epoch:  # this item closed the slot's epoch
            if cfg.endless and whole_epoch and good_in_epoch == 0:
                first = f" (first: {skips[0].key}: {skips[0].reason})" if skips else ""
                raise DataError(
                    f"no image of slot {slot} of {ds.name} could be decoded in a whole epoch"
                    f"{first}; fix the shards"
                )
            epoch, good_in_epoch, whole_epoch = after["epoch"], 0, True
        if len(images) == batch_size:
            yield batch(True)
            images, indices, labels, aspects, skips, attempted = [], [], [], [], [], 0
    if attempted:
        yield batch(not drop_last)


@dataclass(frozen=True)
class _WorkerDone:
    worker: int
    error: str = ""  # a DataError's one-line message, re-raised in the main process


class _Slots(IterableDataset):
    """In loader worker w: the batches of slot rank * W + w."""

    def __init__(self, stream: ShardStream, states: dict[int, dict[str, int]]):
        self.stream, self.states = stream, states

    def __iter__(self) -> Iterator[StreamBatch | _WorkerDone]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            yield from self.stream.worker_batches(worker, self.states)
        except DataError as err:  # re-raised as is by round_robin (torch would add a traceback)
            yield _WorkerDone(worker, str(err))
            return
        yield _WorkerDone(worker)


def _whole(item: Any) -> Any:
    return item


def round_robin(
    items: Iterator[StreamBatch | _WorkerDone], workers: int, first: int
) -> Iterator[StreamBatch]:
    """Batches of `workers` workers, taken in turn from worker `first` on, whatever order they
    arrive in (so a resumed run continues with the worker that was next)."""
    queues: list[deque[StreamBatch]] = [deque() for _ in range(workers)]
    finished = [False] * workers
    w = first % workers
    while not all(finished[k] and not queues[k] for k in range(workers)):
        while not queues[w] and not finished[w]:
            item = next(items, None)
            if item is None:  # the source ended: every worker is finished
                finished = [True] * workers
            elif isinstance(item, _WorkerDone):
                if item.error:
                    raise DataError(item.error)
                finished[item.worker] = True
            else:
                queues[item.worker].append(item)
        if queues[w]:
            yield queues[w].popleft()
        w = (w + 1) % workers


class ShardStream:
    """One rank's share of a ShardDataset as StreamBatches; `state_dict()` resumes exactly."""

    def __init__(
        self,
        ds: ShardDataset,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        endless: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        worker_init_fn: Callable[[int], None] | None = None,
        whole_images: bool = False,
    ):
        if len(ds.shards) < world_size:
            raise DataError(
                f"{ds.name} has {len(ds.shards)} shards for {world_size} ranks: every rank needs "
                "one; re-pack with a smaller --shard-size"
            )
        if block_size < 1:
            raise DataError(f"block_size (the shuffle buffer) must be >= 1, got {block_size}")
        self.ds, self.batch_size, self.drop_last = ds, batch_size, drop_last
        self.rank, self.world_size, self.processes = rank, world_size, num_workers > 0
        self.workers = max(1, min(num_workers, len(ds.shards) // world_size))  # slots per rank
        self.cfg = SlotConfig(seed, shuffle, world_size * self.workers, block_size, endless,
                              whole_images)  # fmt: skip
        self.states = {self.slot(w): fresh_state() for w in range(self.workers)}
        self.next_worker = 0
        self.worker_init_fn = worker_init_fn

    def slot(self, worker: int) -> int:
        return self.rank * self.workers + worker

    @property
    def epoch(self) -> int:
        """The epoch of this rank's slowest slot."""
        return min(int(s["epoch"]) for s in self.states.values())

    def worker_batches(
        self, worker: int, states: dict[int, dict[str, int]] | None = None
    ) -> Iterator[StreamBatch]:
        """Worker `worker`'s batches from `states` (default: the current ones), in order."""
        slot = self.slot(worker)
        state = (states or self.states)[slot]
        return slot_batches(
            self.ds, slot, self.cfg, state, batch_size=self.batch_size,
            drop_last=self.drop_last, worker=worker,
        )  # fmt: skip

    def __iter__(self) -> Iterator[StreamBatch]:
        """Workers' batches in turn; not endless: until every slot finished its epoch."""
        if not self.processes:
            source: Iterator[StreamBatch] = self.worker_batches(0)
        else:
            loader = DataLoader(
                _Slots(self, dict(self.states)), batch_size=None, num_workers=self.workers,
                collate_fn=_whole, worker_init_fn=self.worker_init_fn,
            )  # fmt: skip
            source = round_robin(iter(loader), self.workers, self.next_worker)
        for batch in source:
            self.states[self.slot(batch.worker)] = batch.state
            self.next_worker = (batch.worker + 1) % self.workers
            yield batch

    def batches_per_epoch(self) -> int:
        """Approximate batches per epoch for this rank (slots' shares differ by a shard)."""
        total = self.ds.num_images
        if total is None:
            raise UnknownLengthError(
                f"{self.ds.name} has no index.json, so its epoch length is unknown; "
                "give --steps or --time-budget instead of --epochs"
            )
        per_rank = total / self.world_size
        return (
            int(per_rank // self.batch_size)
            if self.drop_last
            else -int(-per_rank // self.batch_size)
        )

    def _identity(self) -> dict[str, Any]:
        names = "\n".join(p.rsplit("/", 1)[-1] for p in self.ds.shards)
        return {
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "num_shards": len(self.ds.shards),
            "shards_sha1": hashlib.sha1(names.encode()).hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able. Holds this rank's slots only: save `merge_states` of every rank's."""
        return {
            "kind": "shards",
            **self._identity(),
            "num_slots": self.cfg.num_slots,
            "workers_per_rank": self.workers,
            "block_size": self.cfg.block_size,
            "slots": {str(s): dict(v) for s, v in self.states.items()},
            "next_worker": {str(self.rank): self.next_worker},
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` stopped; with another layout (ranks x workers or
        block size), start the next epoch afresh instead (warns; nothing is replayed)."""
        if state.get("kind") != "shards" or not isinstance(state.get("slots"), dict):
            raise DataError("loader state is not from a shard stream; resume with the same --data")
        for name, mine in self._identity().items():
            if state.get(name) != mine:
                raise DataError(
                    f"loader state has {name}={state.get(name)!r} but this stream has {mine!r}; "
                    "resume with the same shards and seed"
                )
        saved = {int(s): v for s, v in state["slots"].items()}
        same_layout = (state.get("num_slots"), state.get("block_size")) == (
            self.cfg.num_slots,
            self.cfg.block_size,
        )
        if not same_layout:
            epoch = max(
                int(v["epoch"]) + (v != fresh_state(int(v["epoch"]))) for v in saved.values()
            )
            warnings.warn(
                f"shard stream layout changed ({state.get('num_slots')} -> {self.cfg.num_slots} "
                f"slots); continuing at the start of epoch {epoch}",
                stacklevel=2,
            )
            self.states = {s: fresh_state(epoch) for s in self.states}
            self.next_worker = 0
            return
        missing = [s for s in self.states if s not in saved]
        if missing:
            raise DataError(
                f"loader state lacks slot {missing[0]} (rank {self.rank}); save the merged "
                "state_dict() of every rank"
            )
        for s in self.states:
            if set(saved[s]) != set(_STATE_KEYS):
                raise DataError(f"loader state of slot {s} is malformed: {saved[s]}")
            self.states[s] = {k: int(saved[s][k]) for k in _STATE_KEYS}
        self.next_worker = int(state.get("next_worker", {}).get(str(self.rank), 0)) % self.workers


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The state_dict()s of all ranks (e.g. from all_gather_object) -> one that every rank of
    the same layout resumes from; skip counters are summed."""
    merged = dict(states[0], slots={}, next_worker={})
    for state in states:
        if state.get("kind") != "shards":
            raise DataError("merge_states takes shard stream states only")
        for name in ("shards_sha1", "seed", "num_slots", "block_size"):
            if state.get(name) != merged.get(name):
                raise DataError(f"cannot merge stream states with different {name}")
        merged["slots"] |= state["slots"]
        merged["next_worker"] |= state["next_worker"]
    for name in ("attempted", "skipped"):
        if name in merged:
            merged[name] = sum(int(state.get(name, 0)) for state in states)
    merged["epoch"] = min(int(v["epoch"]) for v in merged["slots"].values())
    return merged
