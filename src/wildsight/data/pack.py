"""`wildsight shards`: pack any image source into WebDataset tar shards plus an index.

Every image is read and fully decoded once with wildsight's own decoder (data/decode.py), so
what lands in a shard is exactly what training can read: broken files are left out and listed
in DIR/skipped.tsv. A good file is stored as its original bytes (`reencode="none"`, the file's
own extension) or re-encoded from the decoded RGB pixels (EXIF rotation applied) as PNG
(lossless) or JPEG (quality 95). In-memory IDX images (Fashion-MNIST) have no file: they are
stored as grey PNG (or JPEG). Per sample: `<key>.<ext>` image, `<key>.cls` class index (when
known) and `<key>.json` {"source", "label", "class"}; keys are the packed ordinal, 9 digits.

Shards are written to a temp name, fsynced and renamed; DIR/index.json (samples per shard,
total, classes) is written last the same way, so a folder with an index is a complete one.
Tar headers carry mtime 0, uid/gid 0 and mode 0644: the same input gives the same bytes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from wildsight.data.decode import DEFAULT_MAX_PIXELS, Skip, decode_image, read_file
from wildsight.data.loader import SkipLog
from wildsight.data.shards import INDEX_NAME, is_picture, is_shard_spec
from wildsight.data.sources import (
    DataError,
    IdxSource,
    Source,
    _merge_classes,
    open_source,
)
from wildsight.fileio import write_atomically

REENCODE = ("none", "png", "jpeg")
JPEG_QUALITY = 95
SHARD_NAME = "shard-{:06d}.tar"
CHUNK = 1024  # items decoded per round of the worker pool (bounds memory)


@dataclass(frozen=True)
class PackResult:
    out_dir: Path
    shards: list[str]  # file names, in order
    counts: list[int]  # samples per shard
    total: int
    skipped: int  # files left out (named in out_dir/skipped.tsv)


def _encode(pixels: Image.Image, reencode: str) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if reencode == "jpeg":
        pixels.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return "jpg", buffer.getvalue()
    pixels.save(buffer, "PNG")
    return "png", buffer.getvalue()


def prepare(source: Source, i: int, reencode: str, max_pixels: int) -> tuple[str, bytes] | Skip:
    """Item i of a source -> (extension, bytes to store), or Skip if our decoder rejects it."""
    if isinstance(source, IdxSource):
        grey = Image.fromarray(source.images[i, 0].numpy())  # [H, W] uint8: mode L
        return _encode(grey, "png" if reencode == "none" else reencode)
    path = source.key(i)
    data = read_file(path)
    if isinstance(data, Skip):
        return data
    pixels = decode_image(data, key=path, max_pixels=max_pixels)  # uint8 [H, W, 3] | Skip
    if isinstance(pixels, Skip):
        return pixels
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if reencode == "none" and ext and "." not in ext and is_picture(ext):
        return ext, data
    return _encode(Image.fromarray(pixels), "png" if reencode == "none" else reencode)


_WORKER_SOURCES: list[Source] = []


def _init_worker(sources: list[Source]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool
    _WORKER_SOURCES[:] = sources


def _prepare_in_worker(task: tuple[int, int, str, int]) -> tuple[str, bytes] | Skip:
    k, i, reencode, max_pixels = task
    return prepare(_WORKER_SOURCES[k], i, reencode, max_pixels)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _prepared(
    sources: list[Source], reencode: str, max_pixels: int, workers: int
) -> Iterator[tuple[int, int, tuple[str, bytes] | Skip]]:
    """(source, item, prepared) for every item of every source, in order."""
    tasks = ((k, i, reencode, max_pixels) for k, s in enumerate(sources) for i in range(len(s)))
    if workers == 0:
        for k, i, _, _ in tasks:
            yield k, i, prepare(sources[k], i, reencode, max_pixels)
        return
    with multiprocessing.get_context().Pool(workers, _init_worker, (sources,)) as pool:
        while chunk := [t for _, t in zip(range(CHUNK), tasks, strict=False)]:
            results = pool.map(_prepare_in_worker, chunk, chunksize=16)
            for (k, i, _, _), result in zip(chunk, results, strict=True):
                yield k, i, result


class _ShardWriter:
    """Opens DIR/shard-NNNNNN.tar lazily, under a temp name until it is complete."""

    def __init__(self, out_dir: Path, index: int):
        self.name = SHARD_NAME.format(index)
        self.path = out_dir / self.name
        self._tmp = out_dir / f".{self.name}.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115  # closed in close()/abort()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> int:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def write_shards(
    specs: Sequence[str] | str,
    out_dir: str | Path,
    *,
    shard_size: int,
    reencode: str = "none",
    workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PackResult:
    """Pack every image of `specs` (sources as for open_dataset) into `shard_size`-sample tar
    shards DIR/shard-000000.tar, ... with DIR/index.json; `workers` processes decode."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1 images per shard, got {shard_size}")
    if reencode not in REENCODE:
        raise DataError(f"--reencode must be one of {list(REENCODE)}, got {reencode!r}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    if not specs:
        raise DataError("give at least one --data source to pack")
    for spec in specs:
        if is_shard_spec(spec):
            raise DataError(f"{spec!r} is already tar shards; stream it with --data directly")
    sources = [open_source(spec) for spec in specs]
    classes, labels = _merge_classes(sources)  # labels: int64 [N] over all sources
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out} already holds shards; choose an empty --out or delete them")
    if any(out.glob("shard-*.tar")):
        raise DataError(f"{out} holds shards but no {INDEX_NAME}: an earlier pack was cut short; "
                        "delete its shard-*.tar files and pack again, or choose an empty --out")  # fmt: skip
    skips, names, counts, sizes = SkipLog(), [], [], []
    writer: _ShardWriter | None = None
    total, first_of = 0, [0]
    for s in sources:
        first_of.append(first_of[-1] + len(s))
    on_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up as Ctrl-C
        on_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for k, i, prepared in _prepared(sources, reencode, max_pixels, workers):
            if isinstance(prepared, Skip):
                skips.add(prepared.key, prepared.reason)
                continue
            label = int(labels[first_of[k] + i])
            ext, data = prepared
            meta = {"source": sources[k].key(i), "label": label if label >= 0 else None,
                    "class": classes[label] if classes and label >= 0 else None}  # fmt: skip
            members = {ext: data, "json": json.dumps(meta).encode()}
            if label >= 0:
                members["cls"] = str(label).encode()
            if writer is None:
                writer = _ShardWriter(out, len(names))
            writer.add(f"{total:09d}", members)
            total += 1
            if writer.count == shard_size:
                sizes.append(writer.close())
                names.append(writer.name)
                counts.append(writer.count)
                writer = None
        if writer is not None:
            sizes.append(writer.close())
            names.append(writer.name)
            counts.append(writer.count)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    if total == 0:
        raise DataError(
            f"no image of {', '.join(map(repr, specs))} could be decoded "
            f"({skips.count} skipped); nothing packed"
        )
    if skips.count:
        skips.write(out / "skipped.tsv")
    index = {
        "format": "webdataset", "created_by": "wildsight shards", "sources": specs,
        "reencode": reencode, "shard_size": shard_size, "total": total, "skipped": skips.count,
        "classes": classes,
        "shards": [{"name": n, "count": c, "bytes": b} for n, c, b in zip(names, counts, sizes, strict=True)],
    }  # fmt: skip
    write_atomically(out / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return PackResult(out, names, counts, total, skips.count)
