"""`sources.fingerprint`: the identity of the images a dataset gives (the key of cached features)
changes with the files, never with the text typed alone, and costs no decoding."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_images
from wildsight.data import open_dataset, write_shards
from wildsight.data.sources import fingerprint


def _fp(spec: str | Path, size: int = 16) -> str:
    return fingerprint(open_dataset([str(spec)], size))


def test_a_folder_is_the_same_until_one_of_its_files_changes(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 6)
    first = _fp(tmp_path / "imgs")
    assert _fp(tmp_path / "imgs") == first  # nothing changed: a cache hit
    assert _fp(tmp_path / "imgs", size=20) != first  # other pixels
    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten in place
    touched = _fp(tmp_path / "imgs")
    assert touched != first
    shutil.copy(paths[0], tmp_path / "imgs" / "class0" / "extra.png")  # one image more
    assert _fp(tmp_path / "imgs") not in {first, touched}


def test_the_same_relative_spec_in_another_folder_is_another_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for where, seed in (("a", 0), ("b", 1)):
        write_images(tmp_path / where / "imgs", 4, seed=seed)
        # identical sizes and times: only the paths tell them apart
        for src, dst in zip(sorted((tmp_path / "a").rglob("*.png")),
                            sorted((tmp_path / where).rglob("*.png")), strict=True):  # fmt: skip
            os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    monkeypatch.chdir(tmp_path / "a")
    in_a = _fp("imgs")
    monkeypatch.chdir(tmp_path / "b")
    assert _fp("imgs") != in_a
    assert _fp(tmp_path / "a" / "imgs") == in_a  # the absolute spec of the same folder


def test_a_list_changes_with_its_lines_and_labels(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 4)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p.relative_to(tmp_path)}\t0\n" for p in paths))
    first = _fp(listing)
    listing.write_text(
        "".join(f"{p.relative_to(tmp_path)}\t{i % 2}\n" for i, p in enumerate(paths))
    )
    relabelled = _fp(listing)
    assert relabelled != first
    listing.write_text("".join(f"{p.relative_to(tmp_path)}\t0\n" for p in paths[:3]))
    assert _fp(listing) not in {first, relabelled}


def _idx(folder: Path, count: int, label: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, 3]) + count.to_bytes(4, "big") + (4).to_bytes(4, "big") * 2
    (folder / "train-images-idx3-ubyte").write_bytes(header + bytes(range(16)) * count)
    labels = bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + bytes([label]) * count
    (folder / "train-labels-idx1-ubyte").write_bytes(labels)


def test_idx_files_are_named_by_path_size_and_time(tmp_path: Path) -> None:
    _idx(tmp_path / "idx", 3, label=1)
    first = _fp(tmp_path / "idx", size=4)
    assert _fp(tmp_path / "idx", size=4) == first
    labels = tmp_path / "idx" / "train-labels-idx1-ubyte"
    stat = labels.stat()
    _idx(tmp_path / "idx", 3, label=2)  # same sizes: only the labels' content and time differ
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert _fp(tmp_path / "idx", size=4) != first


def test_shards_change_with_their_files(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 6)
    write_shards([str(tmp_path / "imgs")], tmp_path / "shards", shard_size=3)
    first = _fp(tmp_path / "shards")
    assert _fp(tmp_path / "shards") == first
    shard = sorted((tmp_path / "shards").glob("*.tar"))[0]
    with shard.open("ab") as f:
        f.write(b"\0" * 512)  # one more (empty) tar block
    assert _fp(tmp_path / "shards") != first
