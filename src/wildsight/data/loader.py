"""Batches in a resumable, shardable, deterministic order.

Order of epoch e: `perm_e = randperm(N)` from a torch.Generator seeded by (seed, e).
A global step consumes G = batch_size * world_size consecutive items of perm_e;
rank r takes the strided slice `perm_e[p + r : p + G : world_size]`, so ranks are
disjoint and nothing repeats within an epoch. `position` = p counts items already
consumed in the epoch by ALL ranks (yielded or skipped), hence (epoch, position) is
the whole state: a fresh Loader given it yields exactly the next batch.

In-memory datasets (IDX) are batched by tensor indexing in this process. File
datasets are decoded in torch DataLoader workers: the Loader precomputes this
rank's batches of indices and the DataLoader hands whole batches to workers in
turn (worker w gets batches w, w + W, ...), so workers are disjoint as well.
Undecodable images are dropped from their batch and named once in the SkipLog.

Tar shards (a `ShardDataset`) have no random access: the Loader hands them to a `ShardStream`
(data/stream.py), which splits shards over ranks and workers, shuffles in blocks and keeps a
per-slot position; the Loader's interface, skip accounting and Batch are the same.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wildsight.data.decode import Skip
from wildsight.data.shards import REST_UNKNOWN, ShardDataset
from wildsight.data.sources import DataError, ImageDataset
from wildsight.data.stream import DEFAULT_BLOCK_SIZE, ShardStream
from wildsight.fileio import write_atomically

MIN_ATTEMPTS_BEFORE_FAILING = 64


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # uint8 [B, 3, S, S]
    indices: torch.Tensor  # int64 [B], index into the dataset
    labels: torch.Tensor  # int64 [B], -1 where unknown
    # float32 [B]: width / height of what each image shows (the whole picture, squashed to
    # S x S, when the loader decodes whole images); None: every image shows a square
    aspects: torch.Tensor | None = None


class SkipLog:
    """Skipped items, each counted and named once however many epochs meet it again.

    An item is one image, except the rest of a damaged tar shard whose index.json does not say
    how many samples it held (its reason ends with shards.REST_UNKNOWN): `count` counts it as
    one, `summary()` says "the rest of N shards (count unknown)" instead of a number."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # key -> first reason, in order of discovery
        self.by_reason: dict[str, int] = {}  # reason -> number of distinct keys

    @property
    def count(self) -> int:
        return len(self.reasons)

    @property
    def uncounted(self) -> list[str]:
        """Keys of damaged shards whose lost images are not counted (no index.json count)."""
        return [key for key, reason in self.reasons.items() if reason.endswith(REST_UNKNOWN)]

    def summary(self) -> str:
        """What was left out, for a warning: '3 images', '1 image and the rest of shard
        'a.tar' (count unknown)', 'the rest of 2 shards (count unknown)'."""
        shards = self.uncounted
        known = self.count - len(shards)
        images = f"{known} image{'s' if known != 1 else ''}"
        if not shards:
            return images
        rest = f"shard {shards[0]!r}" if len(shards) == 1 else f"{len(shards)} shards"
        rest = f"the rest of {rest} (count unknown)"
        return f"{images} and {rest}" if known else rest

    def add(self, key: str, reason: str) -> None:
        if key not in self.reasons:
            self.reasons[key] = reason
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def write(self, path: Path | str) -> None:
        """TSV `key<TAB>reason`, a line per key; temp file, fsync, rename: never half-written."""
        lines = "".join(f"{tsv_field(k)}\t{tsv_field(r)}\n" for k, r in self.reasons.items())
        write_atomically(path, lines)


def tsv_field(text: str) -> str:
    """A key or reason on one TSV field: backslash, tab and newlines escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """int64 [N]: the order of epoch `epoch`, a pure function of (seed, epoch)."""
    words = [seed % 2**64 & 0xFFFFFFFF, seed % 2**64 >> 32, epoch]
    mixed = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)  # [1]
    generator = torch.Generator().manual_seed(int(mixed[0]))
    return torch.randperm(num_items, generator=generator)


@dataclass(frozen=True)
class _Decoded:
    images: torch.Tensor  # uint8 [b, 3, S, S], b <= len(task)
    indices: torch.Tensor  # int64 [b]
    aspects: torch.Tensor | None  # float32 [b] with whole images, else None
    skips: list[Skip]
    attempted: int
    end_position: int  # epoch position once this batch is consumed
    by_source: dict[int, tuple[int, list[Skip]]] | None = None  # source -> (attempted, skips)


class _Tasks(Dataset[_Decoded]):
    """Batch k of this rank's epoch = decode the precomputed indices `tasks[k]` (in a worker)."""

    def __init__(
        self, dataset: ImageDataset, tasks: list[tuple[torch.Tensor, int]], whole: bool = False
    ):
        self.dataset, self.tasks, self.whole = dataset, tasks, whole

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, k: int) -> _Decoded:
        indices, end_position = self.tasks[k]
        kept: list[torch.Tensor] = []
        kept_indices: list[int] = []
        aspects: list[float] = []
        skips: list[Skip] = []
        by_source: dict[int, tuple[int, list[Skip]]] = {}
        for i, k in zip(indices.tolist(), self.dataset.source_ids(indices).tolist(), strict=True):
            item = self.dataset.load_whole(i) if self.whole else self.dataset.load(i)
            tried, failed = by_source.get(k, (0, []))
            by_source[k] = (tried + 1, failed + [item] if isinstance(item, Skip) else failed)
            if isinstance(item, Skip):
                skips.append(item)
            else:  # load_whole gives (whole image, its aspect ratio)
                image, aspect = item if isinstance(item, tuple) else (item, 1.0)
                kept.append(image)
                aspects.append(aspect)
                kept_indices.append(i)
        size = self.dataset.image_size
        images = torch.stack(kept) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8)
        picked = torch.tensor(kept_indices, dtype=torch.int64)
        shown = torch.tensor(aspects, dtype=torch.float32) if self.whole else None
        return _Decoded(images, picked, shown, skips, len(indices), end_position, by_source)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM (Ctrl-C reaches the whole process group): the
    main process decides when to stop, saves a checkpoint first, then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _whole(item: _Decoded) -> _Decoded:
    """DataLoader collate for batch_size=None: the worker already built the batch."""
    return item


class Loader:
    """Iterable of Batch over `dataset` for one rank; `state_dict()` resumes mid-epoch exactly."""

    def __init__(
        self,
        dataset: ImageDataset | ShardDataset,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        endless: bool = False,
        max_skip_fraction: float = 0.5,
        skip_log: SkipLog | None = None,
        shuffle_block_size: int = DEFAULT_BLOCK_SIZE,
        whole_images: bool = False,
    ):
        """`shuffle_block_size`: shard streams only, samples per shuffle block per worker.
        `whole_images`: batches show whole pictures squashed to S x S, with `Batch.aspects`
        (pretraining crops then cover all of each picture); else each picture's centre square."""
        if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise DataError(
                f"need batch_size >= 1, num_workers >= 0 and 0 <= rank < world_size, got "
                f"batch_size={batch_size}, num_workers={num_workers}, rank={rank}, "
                f"world_size={world_size}"
            )
        self._stream: ShardStream | None = None
        if isinstance(dataset, ShardDataset):
            self._stream = ShardStream(
                dataset, batch_size=batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                num_workers=num_workers, rank=rank, world_size=world_size, endless=endless,
                block_size=shuffle_block_size, worker_init_fn=ignore_stop_signals,
                whole_images=whole_images,
            )  # fmt: skip
        elif drop_last and len(dataset) < batch_size * world_size:
            raise DataError(
                f"{dataset.name} has {len(dataset)} images, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower batch_size or set drop_last=False"
            )
        elif endless and len(dataset) < batch_size * world_size and len(dataset) <= rank:
            raise DataError(f"{dataset.name} has {len(dataset)} images: rank {rank} gets none")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.drop_last, self.num_workers, self.endless = drop_last, num_workers, endless
        self.rank, self.world_size, self.whole_images = rank, world_size, whole_images
        self.max_skip_fraction = max_skip_fraction
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.epoch, self.position = 0, 0
        self.attempted, self.skipped = 0, 0  # cumulative, for the max_skip_fraction check
        self.by_source: dict[int, list[int]] = {}  # source -> [attempted, skipped], cumulative
        self._first_skip: Skip | None = None
        self._first_by_source: dict[int, Skip] = {}
        if self._stream is None:
            self._labels = dataset.labels()  # int64 [N]

    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def _epoch_end(self) -> int:
        """Items consumed by a whole epoch: the tail that fills no global batch is dropped."""
        n = len(self.dataset)
        return n - n % self._global_batch if self.drop_last else n

    def __len__(self) -> int:
        """Batches per epoch for this rank (an all-skipped batch still counts here)."""
        if self._stream is not None:
            return self._stream.batches_per_epoch()
        full, tail = divmod(len(self.dataset), self._global_batch)
        return full + int(not self.drop_last and tail > self.rank)

    def state_dict(self) -> dict[str, Any]:
        if self._stream is not None:
            counts = {"attempted": self.attempted, "skipped": self.skipped}
            return self._stream.state_dict() | counts
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_images": len(self.dataset),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "attempted": self.attempted,
            "skipped": self.skipped,
            "by_source": {str(k): list(v) for k, v in self.by_source.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken; batch_size and world_size may differ from then."""
        if self._stream is not None:
            self._stream.load_state_dict(state)
            self.epoch = self._stream.epoch
            self.attempted = int(state.get("attempted", 0))
            self.skipped = int(state.get("skipped", 0))
            return
        if state.get("kind") == "shards":
            raise DataError("loader state is from a shard stream; resume with the same --data")
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise DataError(f"loader state lacks {sorted(missing)}; pass Loader.state_dict()")
        mine_by_name = {"num_images": len(self.dataset), "seed": self.seed, "shuffle": self.shuffle}
        for name, mine in mine_by_name.items():
            if name in state and state[name] != mine:
                raise DataError(
                    f"loader state has {name}={state[name]!r} but this loader has {mine!r}; "
                    "resume with the same data and seed"
                )
        if not 0 <= int(state["position"]) <= len(self.dataset) or int(state["epoch"]) < 0:
            raise DataError(f"loader state epoch/position out of range: {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.attempted = int(state.get("attempted", 0))
        self.skipped = int(state.get("skipped", 0))
        self.by_source = {int(k): [int(a), int(s)] for k, (a, s) in
                          state.get("by_source", {}).items()}  # fmt: skip

    def _tasks(self) -> list[tuple[torch.Tensor, int]]:
        """This rank's remaining batches of the epoch: (indices int64 [b], position after it)."""
        n = len(self.dataset)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        tasks = []
        for start in range(self.position, self._epoch_end, self._global_batch):
            stop = min(start + self._global_batch, self._epoch_end)
            mine = order[start + self.rank : stop : self.world_size]  # [<= batch_size]
            tasks.append((mine, stop))
        return tasks

    def __iter__(self) -> Iterator[Batch]:
        if self._stream is not None:
            yield from self._iter_stream(self._stream)
            return
        while True:
            if self.position >= self._epoch_end:  # resumed exactly at the end of an epoch
                self.epoch, self.position = self.epoch + 1, 0
            yielded = 0
            for batch in self._run_epoch():
                yielded += 1
                yield batch
            if self.endless and yielded == 0 and len(self) > 0:
                raise DataError(
                    f"no image of {self.dataset.name} could be decoded in a whole epoch; "
                    "fix the source"
                )
            self.epoch, self.position = self.epoch + 1, 0
            if not self.endless:
                return

    def _iter_stream(self, stream: ShardStream) -> Iterator[Batch]:
        """Not endless: one epoch of every slot of this rank (per slot, from where it stands)."""
        for item in stream:
            self.epoch = stream.epoch
            self._account(item.attempted, item.skips)
            if len(item.indices):
                yield Batch(item.images, item.indices, item.labels,
                            item.aspects if self.whole_images else None)  # fmt: skip

    def _run_epoch(self) -> Iterator[Batch]:
        tasks = self._tasks()
        if self.dataset.in_memory:  # fast path: one indexing op per batch, no workers
            for indices, end_position in tasks:
                self.position = end_position
                if len(indices):
                    yield Batch(self.dataset.gather(indices), indices, self._labels[indices])
            return
        for decoded in self._decode(tasks):
            self.position = decoded.end_position
            self._account(decoded.attempted, decoded.skips, decoded.by_source)
            if len(decoded.indices):
                labels = self._labels[decoded.indices]
                yield Batch(decoded.images, decoded.indices, labels, decoded.aspects)

    def _decode(self, tasks: list[tuple[torch.Tensor, int]]) -> Iterator[_Decoded]:
        work = _Tasks(self.dataset, [t for t in tasks if len(t[0])], whole=self.whole_images)
        if self.num_workers == 0 or len(work) == 0:
            yield from (work[k] for k in range(len(work)))
            return
        yield from DataLoader(
            work, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_whole,
            worker_init_fn=ignore_stop_signals,
        )  # fmt: skip

    def _account(
        self,
        attempted: int,
        skips: list[Skip],
        by_source: dict[int, tuple[int, list[Skip]]] | None = None,
    ) -> None:
        """Log skips; fail once the skipped fraction is clearly too high to be noise, for the
        whole dataset or for any one of its sources (a dead folder among good ones)."""
        self.attempted += attempted
        self.skipped += len(skips)
        for skip in skips:
            self.skip_log.add(skip.key, skip.reason)
            if self._first_skip is None:
                self._first_skip = skip
        self._check_skips(self.attempted, self.skipped, self.dataset.name, self._first_skip)
        for k, (tried, failed) in (by_source or {}).items():
            counts = self.by_source.setdefault(k, [0, 0])
            counts[0] += tried
            counts[1] += len(failed)
            if failed:
                first = self._first_by_source.setdefault(k, failed[0])
                name = repr(self.dataset.sources[k].name)  # type: ignore[union-attr]
                self._check_skips(*counts, name, first)

    def check_skip_fraction(self) -> None:
        """After a whole pass (eval, embed): the max_skip_fraction rule on the final counts,
        for the whole dataset and each of its sources, however few images were tried."""
        self._check_skips(self.attempted, self.skipped, self.dataset.name, self._first_skip, 0)
        for k, counts in self.by_source.items():
            if counts[1]:
                name = repr(self.dataset.sources[k].name)  # type: ignore[union-attr]
                self._check_skips(*counts, name, self._first_by_source.get(k), 0)

    def _check_skips(
        self,
        attempted: int,
        skipped: int,
        name: str,
        first: Skip | None,
        min_attempts: int = MIN_ATTEMPTS_BEFORE_FAILING,
    ) -> None:
        if attempted >= max(min_attempts, 1) and skipped > self.max_skip_fraction * attempted:
            where = f" (first: {first.key}: {first.reason})" if first else ""
            raise DataError(
                f"{skipped} of {attempted} images in {name} could not be decoded{where}; fix the "
                "source or raise max_skip_fraction"
            )
