"""Where images come from: IDX (Fashion-MNIST) files, folder trees, .txt lists; concatenated.

`open_dataset(specs, image_size)` turns what a user types into one map-style
`ImageDataset` whose `load(i)` gives uint8 [3, S, S] or a `Skip`. Spec forms:

    fmnist:train | fmnist:test          IDX files in $WILDSIGHT_FMNIST_DIR or
                                        /usr/share/datasets/fashion-mnist
    fmnist:/some/folder:train           the same from another folder
    /a/folder[:train|:test]             a folder of IDX files (auto-detected; train by default)
    /a/folder                           a tree of images; class = first-level sub-folder
    /a/list.txt                         one path per line (relative to the list's folder),
                                        optionally "<path>\t<label>"
    /a/shards | 'a/s-{000..009}.tar'    WebDataset tar shards, streamed (data/shards.py)

IDX sources are kept whole in memory (uint8 [N, 1, H, W]) and batched by indexing;
file sources hold only their paths, packed in one byte buffer so that forked loader
workers do not copy them page by page as reference counts change.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import os
import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from wildsight.data.decode import (
    DEFAULT_MAX_PIXELS,
    Skip,
    decode_resized,
    decode_whole,
    read_file,
    resize_center_crop,
)

if TYPE_CHECKING:
    from wildsight.data.shards import ShardDataset

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_SPLITS = {"train": ("train",), "test": ("t10k", "test")}
_IDX_IMAGES = re.compile(r"^(?P<prefix>.+?)[-.]images[-.]idx3[-.]ubyte(\.gz)?$")
# Formats Pillow registers for opening but that are data containers or stubs, not pictures.
_NOT_PICTURES = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "IPTC", "EPS"}
_HOW = "pass a folder of images, a .txt list of paths, a folder of IDX files or fmnist:train|test"


class DataError(ValueError):
    """A data source is unusable; the one-line message names it and says what to do."""


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions ('.jpg', ...) of every picture format this Pillow can open."""
    Image.init()
    registered = Image.registered_extensions()  # {".jpg": "JPEG", ...}
    return frozenset(
        ext for ext, fmt in registered.items() if fmt in Image.OPEN and fmt not in _NOT_PICTURES
    )


class IdxSource:
    """IDX3 grey images held in memory: uint8 [N, 1, H, W], labels int64 [N] (-1 if absent).

    `files`: the IDX files read (absolute paths), for `fingerprint`; none = hash the pixels."""

    in_memory = True

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str] | None,
        files: Sequence[str] = (),
    ):
        self.name, self.images, self._labels, self.classes = name, images, labels, classes
        self.files = tuple(files)
        self._pixels = images.numpy()  # the same memory

    def __len__(self) -> int:
        return self.images.shape[0]

    def key(self, i: int) -> str:
        return f"{self.name}#{i}"

    def labels(self) -> torch.Tensor:
        return self._labels

    def gather(self, indices: torch.Tensor, size: int) -> torch.Tensor:
        """int64 [B] -> uint8 [B, 3, S, S]: index, resize if S != H, expand grey to 3 channels."""
        # numpy's single-threaded gather and copy: torch's OpenMP versions of these small
        # ops run 10x slower on a busy machine (thread spin under oversubscription)
        rows = torch.from_numpy(self._pixels[indices.numpy()])  # [B, 1, H, W]
        grey = resize_center_crop(rows, size).numpy()  # [B, 1, S, S]
        return torch.from_numpy(np.repeat(grey, 3, axis=1))  # [B, 3, S, S]

    def load(self, i: int, size: int, max_pixels: int) -> torch.Tensor | Skip:
        return self.gather(torch.tensor([i]), size)[0]

    def load_whole(self, i: int, size: int, max_pixels: int) -> tuple[torch.Tensor, float] | Skip:
        image = self.load(i, size, max_pixels)  # IDX images are square: whole = centre square
        return image if isinstance(image, Skip) else (image, 1.0)


class FileSource:
    """Image files named by path; decoded on demand (in loader workers)."""

    in_memory = False

    def __init__(
        self, name: str, paths: list[str], labels: torch.Tensor, classes: list[str] | None
    ):
        encoded = [os.fsencode(p) for p in paths]
        self.name, self._labels, self.classes = name, labels, classes
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)  # [N]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # all paths, back to back

    def __len__(self) -> int:
        return len(self._ends)

    def key(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return os.fsdecode(self._blob[start : int(self._ends[i])].tobytes())

    def labels(self) -> torch.Tensor:
        return self._labels

    def load(self, i: int, size: int, max_pixels: int) -> torch.Tensor | Skip:
        path = self.key(i)
        data = read_file(path)
        if isinstance(data, Skip):
            return data
        return decode_resized(data, key=path, size=size, max_pixels=max_pixels)

    def load_whole(self, i: int, size: int, max_pixels: int) -> tuple[torch.Tensor, float] | Skip:
        path = self.key(i)
        data = read_file(path)
        if isinstance(data, Skip):
            return data
        return decode_whole(data, key=path, size=size, max_pixels=max_pixels)


Source = IdxSource | FileSource


def _read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) -> uint8 array of its dimensions."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read IDX file {path}: {err}; re-download or reinstall it"
        ) from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or ndim == 0:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; re-download it")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    if len(raw) - 4 - 4 * ndim != count:
        raise DataError(f"{path} holds {len(raw) - 4 - 4 * ndim} bytes, not {dims}; re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_images_files(folder: str) -> dict[str, str]:
    """{prefix: file name} of the `<prefix>-images-idx3-ubyte[.gz]` files in a folder."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    found: dict[str, str] = {}
    for name in names:
        match = _IDX_IMAGES.match(name)
        if match and match["prefix"] not in found:
            found[match["prefix"]] = name
    return found


def idx_source(spec: str, folder: str, split: str, classes: list[str] | None) -> IdxSource:
    """The `split` ('train'|'test') images and labels of a folder of IDX files."""
    found = _idx_images_files(folder)
    prefix = next((p for p in _SPLITS[split] if p in found), None)
    if prefix is None:
        hint = "run `make data` or set WILDSIGHT_FMNIST_DIR" if spec.startswith("fmnist") else _HOW
        raise DataError(
            f"no images found in {spec!r}: {folder} has no {split} IDX file "
            f"({_SPLITS[split][0]}-images-idx3-ubyte[.gz]); {hint}"
        )
    images_name = found[prefix]
    images = _read_idx(os.path.join(folder, images_name))
    if images.ndim != 3 or images.shape[0] == 0:
        raise DataError(f"no images found in {spec!r}: {images_name} has shape {images.shape}")
    labels_name = images_name.replace("images", "labels").replace("idx3", "idx1")
    labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    files = [os.path.abspath(os.path.join(folder, images_name))]
    if os.path.exists(os.path.join(folder, labels_name)):
        files.append(os.path.abspath(os.path.join(folder, labels_name)))
        raw = _read_idx(os.path.join(folder, labels_name))
        if raw.shape != (images.shape[0],):
            raise DataError(f"{labels_name} has {raw.shape} labels for {images.shape[0]} images")
        labels = torch.from_numpy(raw.astype(np.int64))
        if classes is None:
            classes = [str(k) for k in range(int(labels.max()) + 1)]
    else:
        classes = None
    pixels = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, H, W]
    return IdxSource(os.path.join(folder, images_name), pixels, labels, classes, files)


def folder_source(spec: str, root: str) -> FileSource:
    """Every picture under `root` (sorted, symlinks followed once); class = first-level folder."""
    root = os.path.abspath(root)
    extensions = image_extensions()
    relpaths: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                relpaths.append(name if rel == "." else os.path.join(rel, name))
    if not relpaths:
        raise DataError(
            f"no images found in {spec!r}: no file under {root} has a picture extension "
            "(.jpg, .png, .webp, ...); " + _HOW
        )
    relpaths.sort()
    tops = [r.split(os.sep, 1)[0] if os.sep in r else None for r in relpaths]
    classes = sorted({t for t in tops if t is not None})
    index = {name: k for k, name in enumerate(classes)}
    labels = torch.tensor([-1 if t is None else index[t] for t in tops], dtype=torch.int64)
    paths = [os.path.join(root, r) for r in relpaths]
    return FileSource(root, paths, labels, classes or None)


def list_source(spec: str, list_path: str) -> FileSource:
    """Lines `path` or `path<TAB>label`; paths relative to the list's folder; '#' comments."""
    base = os.path.dirname(os.path.abspath(list_path))
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read list {spec!r}: {err}; {_HOW}") from None
    paths: list[str] = []
    names: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) > 2:
            raise DataError(f"{list_path}:{number}: expected 'path' or 'path<TAB>label'")
        paths.append(os.path.join(base, fields[0].strip()))
        names.append(fields[1].strip() if len(fields) == 2 else "")
    if not paths:
        raise DataError(f"no images found in {spec!r}: the list has no paths; {_HOW}")
    named = sorted({n for n in names if n})
    if named and all(n.isdigit() for n in named):  # numeric labels are class indices
        classes: list[str] | None = [str(k) for k in range(max(int(n) for n in named) + 1)]
        labels = [int(n) if n else -1 for n in names]
    else:
        classes = named or None
        index = {n: k for k, n in enumerate(named)}
        labels = [index[n] if n else -1 for n in names]
    return FileSource(list_path, paths, torch.tensor(labels, dtype=torch.int64), classes)


def open_source(spec: str) -> Source:
    """One spec string -> one source (see the module docstring for the forms)."""
    if spec == "fmnist" or spec.startswith("fmnist:"):
        rest = spec[len("fmnist:") :] or "train"
        if rest in _SPLITS:
            folder = os.environ.get("WILDSIGHT_FMNIST_DIR") or FMNIST_DEFAULT_DIR
            return idx_source(spec, folder, rest, list(FMNIST_CLASSES))
        folder, _, split = rest.rpartition(":")
        if split not in _SPLITS or not folder:
            raise DataError(
                f"bad Fashion-MNIST spec {spec!r}; use fmnist:train, fmnist:test "
                "or fmnist:/folder:train"
            )
        return idx_source(spec, os.path.expanduser(folder), split, list(FMNIST_CLASSES))
    path, split = os.path.expanduser(spec), None
    head, _, tail = path.rpartition(":")
    if not os.path.exists(path) and tail in _SPLITS and os.path.isdir(head):
        path, split = head, tail
    if os.path.isdir(path):
        if split is not None or _idx_images_files(path):
            return idx_source(spec, path, split or "train", None)
        return folder_source(spec, path)
    if os.path.isfile(path) and path.lower().endswith(".txt"):
        return list_source(spec, path)
    if os.path.isfile(path) and ".tar" in path.lower():
        raise DataError(f"{spec!r} is a tar shard: open it with open_dataset, which streams shards")
    if os.path.isfile(path):
        raise DataError(f"no images found in {spec!r}: a single file is not a source; {_HOW}")
    raise DataError(f"no images found in {spec!r}: no such file or folder; {_HOW}")


def _merge_classes(sources: Sequence[Source]) -> tuple[list[str] | None, torch.Tensor]:
    """One class list (first-seen order) and the labels of all sources remapped onto it."""
    merged: list[str] = []
    parts: list[torch.Tensor] = []
    for source in sources:
        labels = source.labels()
        if source.classes is not None:
            for name in source.classes:
                if name not in merged:
                    merged.append(name)
            remap = torch.tensor([merged.index(n) for n in source.classes], dtype=torch.int64)
            labels = torch.where(labels >= 0, remap[labels.clamp(min=0)], labels)
        parts.append(labels)
    return (merged or None), torch.cat(parts)


class ImageDataset:
    """Map-style concatenation of sources: `load(i)` -> uint8 [3, S, S] or Skip(key, reason)."""

    def __init__(
        self,
        sources: Sequence[Source],
        image_size: int,
        *,
        name: str = "",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if not sources:
            raise DataError("no images found in '': give at least one source; " + _HOW)
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.sources = list(sources)
        self.image_size, self.max_pixels = image_size, max_pixels
        self.name = name or ", ".join(repr(s.name) for s in self.sources)
        self.classes, self._labels = _merge_classes(self.sources)  # _labels: int64 [N]
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()  # [num_sources]

    @property
    def in_memory(self) -> bool:
        """True when every source is an in-memory tensor (batched by indexing, no workers)."""
        return all(s.in_memory for s in self.sources)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _locate(self, i: int) -> tuple[Source, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        k = bisect.bisect_right(self._ends, i)
        return self.sources[k], i - (self._ends[k - 1] if k > 0 else 0)

    def source_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 [B]: which of `sources` each dataset index [B] comes from."""
        return torch.bucketize(indices, torch.tensor(self._ends), right=True)

    def key(self, i: int) -> str:
        """The item's name for logs: its path, or `<idx file>#<row>`."""
        source, local = self._locate(i)
        return source.key(local)

    def load(self, i: int) -> torch.Tensor | Skip:
        source, local = self._locate(i)
        return source.load(local, self.image_size, self.max_pixels)

    def load_whole(self, i: int) -> tuple[torch.Tensor, float] | Skip:
        """The whole image squashed to S x S and its width / height (`decode_whole`), for
        pretraining crops that may cover all of it; `load` gives the centre square."""
        source, local = self._locate(i)
        return source.load_whole(local, self.image_size, self.max_pixels)

    def labels(self) -> torch.Tensor:
        """int64 [N]: class index into `classes`, -1 where unknown."""
        return self._labels

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """In-memory fast path: int64 [B] -> uint8 [B, 3, S, S] by tensor indexing."""
        if not self.in_memory:
            raise DataError(f"{self.name} is not in memory; load its images one by one")
        if len(self.sources) == 1:
            return self.sources[0].gather(indices, self.image_size)  # type: ignore[union-attr]
        which = self.source_ids(indices)  # [B]
        out = torch.empty(len(indices), 3, self.image_size, self.image_size, dtype=torch.uint8)
        for k in which.unique().tolist():
            mask = which == k
            local = indices[mask] - (self._ends[k - 1] if k > 0 else 0)
            out[mask] = self.sources[k].gather(local, self.image_size)  # type: ignore[union-attr]
        return out


def open_dataset(
    specs: Sequence[str] | str, image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageDataset | ShardDataset:
    """Specs (see module docstring) -> one dataset of uint8 [3, image_size, image_size] images.

    WebDataset tar shards ('dir/shard-{000000..000099}.tar', a shard file or a folder of them)
    give a streaming `ShardDataset` instead (data/shards.py); `Loader` takes either.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DataError("no images found in '': give at least one data spec; " + _HOW)
    from wildsight.data import shards  # shards.py imports this module

    if any(shards.is_shard_spec(str(spec)) for spec in specs):
        return shards.open_shards([str(s) for s in specs], image_size, max_pixels=max_pixels)
    sources = [open_source(str(spec)) for spec in specs]
    return ImageDataset(
        sources, image_size, name=", ".join(map(repr, specs)), max_pixels=max_pixels
    )


def _file_state(path: str) -> tuple[int, ...]:
    """(size, mtime_ns, inode) of the file a path names (links followed); () if it has none."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def fingerprint(dataset: ImageDataset | ShardDataset) -> str:
    """A hex digest that changes when the images or labels a dataset gives change, from file
    metadata only (nothing is decoded): every file's absolute path, size, mtime_ns and inode,
    the labels, classes and image size. Equal specs typed in other folders differ (paths are
    absolute). Cache keys of features are built on it (api.source_layers)."""
    digest = hashlib.sha1()

    def add(*parts: object) -> None:
        digest.update(repr(parts).encode("utf-8", errors="surrogateescape") + b"\n")

    add(type(dataset).__name__, dataset.image_size, dataset.max_pixels, dataset.classes)
    if not isinstance(dataset, ImageDataset):  # tar shards: each shard file, index.json counts
        add(dataset.counts, dataset.label_maps, dataset.max_bytes)
        for path in dataset.shards:
            add(os.path.abspath(path), _file_state(path))
        return digest.hexdigest()
    digest.update(dataset.labels().numpy().tobytes())
    for source in dataset.sources:
        add(type(source).__name__, len(source))
        if isinstance(source, IdxSource):
            for path in source.files:
                add(path, _file_state(path))
            if not source.files:
                digest.update(source._pixels.tobytes())
        else:
            for i in range(len(source)):
                path = os.path.abspath(source.key(i))
                add(path, _file_state(path))
    return digest.hexdigest()
