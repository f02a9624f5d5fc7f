"""WebDataset tar shards: member naming, safe reading, shard specs, and `ShardDataset`.

Format (WebDataset's convention, so the `webdataset` library and plain `tar` read our shards
and we read theirs): a shard is a POSIX tar; member `dir/name.ext` has key `dir/name` (the
basename up to its FIRST dot) and extension `ext`; consecutive members with one key form a
sample. `wildsight shards` writes `<key>.<jpg|png|...>`, `<key>.cls` (class index, decimal
text) and `<key>.json` (where the image came from) per sample, and `index.json` (samples per
shard, classes) next to the shards.

Reading is safe by construction:
- nothing is ever extracted: member bytes are read into memory (`TarFile.extractfile`) and a
  member name is only a string key, so `../../x.jpg` or `/etc/x.jpg` name nothing on disk;
- only regular-file members are read, each up to `max_bytes`; links, devices and folders are
  ignored; only picture members (by extension) are decoded, with Pillow, and `.cls` as an
  integer; `.pyd/.pth/.pkl` and every other member are never read, let alone unpickled (SPEC §4).

A shard that cannot be read to its end (truncated, corrupt header, not a tar, broken gzip, or
fewer samples than its index.json says) is reported after the samples read before the damage,
so that every lost image is counted once (in skipped.tsv, the warning and max_skip_fraction):
- index.json gives its count: one sample with a `problem` per missing ordinal (`<shard>[<n>]`,
  n from the first sample not read whole to count - 1), each an image left out;
- no count known: one `Skip(<shard path>, "...; the rest of the shard is left out, count
  unknown")`, which claims no number (it counts as one item against max_skip_fraction).
The stream then goes on with the next shard.
"""

from __future__ import annotations

import bisect
import json
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from wildsight.data.decode import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    Skip,
    decode_resized,
    decode_whole,
)
from wildsight.data.sources import DataError, image_extensions

INDEX_NAME = "index.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_SHARDS = 1_000_000  # a brace pattern that expands further is a typo
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
_PICTURES = frozenset(ext.lstrip(".") for ext in image_extensions())
REST_UNKNOWN = "the rest of the shard is left out, count unknown"  # ends such a Skip's reason


def split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, extension): 'a/b.seg.PNG' -> ('a/b', 'seg.png'); no dot -> ext ''."""
    folder, _, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0:  # 'README', '.hidden': not part of any sample
        return name, ""
    return (f"{folder}/" if folder else "") + base[:dot], base[dot + 1 :].lower()


def is_picture(ext: str) -> bool:
    """'jpg', 'seg.png' -> True; 'cls', 'json', 'pth' -> False."""
    return ext.rpartition(".")[2] in _PICTURES


@dataclass(frozen=True)
class RawSample:
    """One sample of one shard, still encoded: `members` maps extension -> bytes."""

    shard: int  # index into ShardDataset.shards
    offset: int  # ordinal of the sample within its shard
    key: str
    members: dict[str, bytes]
    problem: str = ""  # non-empty: why the sample cannot give an image


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """True when a zero block follows the last member: the writer finished (tarfile stops
    silently at a truncated or corrupt header, so this is the only way to tell)."""
    fileobj = tar.fileobj
    assert fileobj is not None
    fileobj.seek(tar.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def read_shard(
    path: str,
    shard: int = 0,
    start: int = 0,
    *,
    expected: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[RawSample | Skip]:
    """Samples `start`, `start + 1`, ... of one shard, then what its damage lost (see above).

    Samples before `start` are passed over by their headers (their data is seeked past, not
    read). Only picture and `.cls` members are read. `expected` (from index.json) counts the
    samples a damaged shard lost and caps the samples taken from a long one.
    """
    offset, key, members, problem = -1, None, {}, ""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            while (info := tar.next()) is not None:
                if not info.isfile():  # folders, links, devices: never followed
                    continue
                name_key, ext = split_name(info.name)
                if not ext:
                    continue
                if name_key != key:
                    if offset >= start:
                        yield RawSample(shard, offset, key or "", members, problem)
                    offset, key, members, problem = offset + 1, name_key, {}, ""
                    if expected is not None and offset >= expected:
                        yield Skip(path, f"holds more than the {expected} samples of its index; "
                                         f"{REST_UNKNOWN}")  # fmt: skip
                        return
                if offset < start or not (ext == "cls" or is_picture(ext)):
                    continue
                if info.size > max_bytes:
                    problem = f"member {ext} too large: {info.size} bytes > {max_bytes}"
                    continue
                member = tar.extractfile(info)
                assert member is not None  # a regular file always has data
                members[ext] = member.read()
            clean = _ends_cleanly(tar)
    except _READ_ERRORS as err:  # sample `offset` was cut: samples 0 .. offset - 1 are whole
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        read = max(offset, 0)
        yield from _lost(path, shard, start, read, expected,
                         f"unreadable shard after {read} samples: {reason}")  # fmt: skip
        return
    if key is not None and offset >= start:
        yield RawSample(shard, offset, key, members, problem)
    count = offset + 1
    if not clean:
        yield from _lost(path, shard, start, count, expected,
                         f"truncated or corrupt tar after {count} samples (no end-of-archive)")  # fmt: skip
    elif expected is not None and count < expected:
        yield from _lost(path, shard, start, count, expected,
                         f"truncated: {count} of {expected} samples")  # fmt: skip


def _lost(
    path: str, shard: int, start: int, read: int, expected: int | None, why: str
) -> Iterator[RawSample | Skip]:
    """What a damaged shard lost after its first `read` samples: one problem sample per missing
    ordinal in [max(read, start), expected) when index.json counts them (a resumed read from
    `start` reports only its own), else one Skip for the rest of the shard, count unknown.
    With the count known and nothing missing (only the end-of-archive is cut), nothing."""
    if expected is None:
        yield Skip(path, f"{why}; {REST_UNKNOWN}")
        return
    for offset in range(max(read, start), expected):
        yield RawSample(shard, offset, "", {}, f"missing from a damaged shard of {expected} "
                                               f"indexed samples: {why}")  # fmt: skip


def expand_braces(pattern: str) -> list[str]:
    """'s-{000..002}.tar' -> ['s-000.tar', 's-001.tar', 's-002.tar']; '{a,b}' lists; several
    braces multiply. A range whose start has a leading zero is zero-padded to its width."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match[1], pattern[: match.start()], pattern[match.end() :]
    numbers = _RANGE.fullmatch(body)
    if numbers:
        lo, hi = int(numbers[1]), int(numbers[2])
        if hi < lo or hi - lo >= MAX_SHARDS:
            raise DataError(
                f"bad shard range {{{body}}} in {pattern!r}; write e.g. {{000000..000099}}"
            )
        width = len(numbers[1]) if numbers[1].startswith("0") and len(numbers[1]) > 1 else 0
        items = [f"{k:0{width}d}" for k in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"bad brace {{{body}}} in {pattern!r}; use {{000000..000099}} or {{a,b}}")
    rests = expand_braces(tail)
    if len(items) * len(rests) > MAX_SHARDS:
        raise DataError(f"{pattern!r} expands to more than {MAX_SHARDS} shards")
    return [head + item + rest for item in items for rest in rests]


def _is_shard_file(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def is_shard_spec(spec: str) -> bool:
    """A brace pattern or path of .tar shards, or a folder of them (with our index.json, or
    holding only .tar files at its top level and no sub-folders)."""
    path = os.path.expanduser(spec)
    if _REMOTE.match(spec) and ".tar" in spec.lower():
        return True
    if "{" in path and ".tar" in path.lower():
        return True
    if os.path.isfile(path):
        return _is_shard_file(path)
    if not os.path.isdir(path):
        return False
    if _looks_like_index(os.path.join(path, INDEX_NAME)):
        return True
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    return (
        any(e.is_file() and _is_shard_file(e.name) for e in entries)
        and not any(e.is_dir() for e in entries)
        and not any(
            e.is_file() and e.name.lower().endswith(tuple(image_extensions())) for e in entries
        )
    )


def _looks_like_index(path: str) -> bool:
    """An index.json of shards (another tool's index.json in an image folder is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            return isinstance(json.load(f).get("shards"), list)
    except (OSError, ValueError, AttributeError):
        return False


def _read_index(folder: str) -> dict | None:
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        {str(s["name"]): int(s["count"]) for s in index["shards"]}  # noqa: B018  # shape check
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path} is not a shard index ({type(err).__name__}: {err}); "
            "re-run `wildsight shards` or delete it"
        ) from None
    return index


def shard_paths(spec: str) -> list[str]:
    """One spec -> its shard files in order; missing files fail in one line."""
    if _REMOTE.match(spec):
        raise DataError(
            f"{spec!r}: remote shards are not supported yet; copy or mount them locally"
        )
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        index = _read_index(path)
        if index is not None:
            paths = [os.path.join(path, s["name"]) for s in index["shards"]]
        else:
            paths = sorted(
                e.path for e in os.scandir(path) if e.is_file() and _is_shard_file(e.name)
            )
    else:
        paths = expand_braces(path)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} shards of {spec!r} are missing (first: {missing[0]}); "
            "fix the pattern or re-run `wildsight shards`"
        )
    if not paths:
        raise DataError(
            f"no images found in {spec!r}: no shard files; pack some with `wildsight shards`"
        )
    return paths


class ShardDataset:
    """Tar shards read as a stream (no random access): `Loader` splits them over ranks and
    workers (data/stream.py). `index(shard, offset)` numbers samples: dense in [0, N) when
    every shard is listed in an index.json, else `shard * 2**32 + offset`."""

    in_memory = False

    def __init__(
        self,
        shards: Sequence[str],
        image_size: int,
        *,
        counts: Sequence[int] | None = None,
        classes: list[str] | None = None,
        label_maps: Sequence[Sequence[int] | None] | None = None,
        name: str = "",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        if not shards:
            raise DataError("no shards given; pack images with `wildsight shards`")
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.shards = list(shards)
        self.image_size, self.max_pixels, self.max_bytes = image_size, max_pixels, max_bytes
        self.counts = list(counts) if counts is not None else None  # samples per shard
        self.classes = classes
        self.label_maps = list(label_maps) if label_maps else [None] * len(self.shards)
        self.name = name or repr(self.shards[0]) + (
            f" (+{len(shards) - 1} shards)" if len(shards) > 1 else ""
        )
        self._starts = [0]
        for count in self.counts or []:
            self._starts.append(self._starts[-1] + count)

    @property
    def num_images(self) -> int | None:
        """Samples in all shards per their index.json (None when not indexed)."""
        return self._starts[-1] if self.counts is not None else None

    def index(self, shard: int, offset: int) -> int:
        return self._starts[shard] + offset if self.counts is not None else (shard << 32) + offset

    def locate(self, index: int) -> tuple[int, int]:
        """Inverse of `index`: (shard, offset)."""
        if self.counts is None:
            return index >> 32, index & 0xFFFFFFFF
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def key(self, index: int) -> str:
        """The sample's name for logs: `<shard path>[<ordinal in the shard>]`."""
        shard, offset = self.locate(index)
        return f"{self.shards[shard]}[{offset}]"

    def samples(self, shard: int, start: int = 0) -> Iterator[RawSample | Skip]:
        """Samples of shard `shard` from ordinal `start` on, then a Skip if it is damaged."""
        expected = self.counts[shard] if self.counts is not None else None
        return read_shard(
            self.shards[shard], shard, start, expected=expected, max_bytes=self.max_bytes
        )

    def decode(self, sample: RawSample) -> tuple[torch.Tensor, int] | Skip:
        """-> (uint8 [3, S, S], label or -1), or Skip naming `<shard>#<key>` (a sample lost
        from a damaged shard, which has no key: `<shard>[<ordinal>]`, as `key()` names it)."""
        decoded = self.decode_with_aspect(sample, whole=False)
        return decoded if isinstance(decoded, Skip) else decoded[:2]

    def decode_with_aspect(
        self, sample: RawSample, *, whole: bool
    ) -> tuple[torch.Tensor, int, float] | Skip:
        """-> (uint8 [3, S, S], label or -1, width / height of what the square shows): the whole
        picture squashed (`decode_whole`), or (whole=False) its centre square, aspect 1."""
        path = self.shards[sample.shard]
        where = f"{path}#{sample.key}" if sample.key else f"{path}[{sample.offset}]"
        if sample.problem:
            return Skip(where, sample.problem)
        ext = next((e for e in sample.members if is_picture(e)), None)
        if ext is None:
            return Skip(where, "no picture member")
        data, size, limit = sample.members[ext], self.image_size, self.max_pixels
        if whole:
            picture = decode_whole(data, key=where, size=size, max_pixels=limit)
            if isinstance(picture, Skip):
                return picture
            return picture[0], self._label(sample), picture[1]
        image = decode_resized(data, key=where, size=size, max_pixels=limit)
        if isinstance(image, Skip):
            return image
        return image, self._label(sample), 1.0

    def _label(self, sample: RawSample) -> int:
        text = sample.members.get("cls", b"").strip()
        if not text.isdigit() or len(text) > 9:
            return -1
        label, remap = int(text), self.label_maps[sample.shard]
        if remap is not None:
            return remap[label] if label < len(remap) else -1
        return label


def open_shards(
    specs: Sequence[str], image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ShardDataset:
    """Shard specs (folders, files, brace patterns) -> one ShardDataset over all their shards.

    Counts and classes come from the index.json next to the shards; they are known only when
    every shard is listed there. Class lists of several indexes are merged in first-seen order.
    A shard without names (its folder has no index.json, or one without classes) has labels
    that are bare numbers: they stay as they are when no shard has names (`classes` None), and
    are unknown (-1) beside named shards, whose numbering they need not share.
    """
    shards: list[str] = []
    for spec in specs:
        if not is_shard_spec(spec):
            raise DataError(
                f"{spec!r} is not a shard spec; streams of shards cannot be mixed with folders, "
                "lists or IDX files (pack those with `wildsight shards` first)"
            )
        shards += shard_paths(spec)
    indexes = {folder: _read_index(folder) for folder in {os.path.dirname(p) for p in shards}}
    counts: list[int] | None = []
    merged: list[str] = []
    maps: list[list[int] | None] = []
    for path in shards:
        index = indexes[os.path.dirname(path)]
        listed = {s["name"]: int(s["count"]) for s in index["shards"]} if index else {}
        if counts is not None and os.path.basename(path) in listed:
            counts.append(listed[os.path.basename(path)])
        else:
            counts = None
        names = index.get("classes") if index else None
        if names:
            merged += [n for n in names if n not in merged]
            maps.append([merged.index(n) for n in names])
        else:
            maps.append(None)
    if merged:  # an unnamed shard's numbers mean nothing in the named shards' class list
        maps = [[] if m is None else m for m in maps]
    identity = all(m is None or (len(m) > 0 and m == list(range(len(m)))) for m in maps)
    return ShardDataset(
        shards, image_size, counts=counts, classes=merged or None,
        label_maps=None if identity else maps, name=", ".join(map(repr, specs)),
        max_pixels=max_pixels,
    )  # fmt: skip
