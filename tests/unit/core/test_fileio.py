"""write_atomically: the old file or the new one, never a mix, and no temporary file left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wildsight import fileio


def test_replaces_the_file_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.json"
    fileio.write_atomically(path, "first\n")
    fileio.write_atomically(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_undecodable_file_names_survive_as_bytes(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name on a UTF-8 system
    fileio.write_atomically(tmp_path / "skipped.tsv", f"{name}\tbroken\n")
    assert (tmp_path / "skipped.tsv").read_bytes() == b"caf\xe9.jpg\tbroken\n"


def test_a_failure_before_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.json"
    fileio.write_atomically(path, "old\n")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fileio.write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]  # the temporary file is gone


def test_files_get_the_mode_open_would_give_them_and_a_writer_can_stream(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; results must be readable as any file the user writes is."""
    import io

    import numpy as np

    old = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives under this umask
        ours = fileio.write_atomically(tmp_path / "ours.json", "{}")
        array = np.arange(6, dtype=np.float32).reshape(2, 3)
        streamed = fileio.write_atomically_with(tmp_path / "a.npy", lambda f: np.save(f, array))
    finally:
        os.umask(old)
    expected = plain.stat().st_mode & 0o777
    assert ours.stat().st_mode & 0o777 == expected == 0o640
    assert streamed.stat().st_mode & 0o777 == expected
    np.testing.assert_array_equal(np.load(io.BytesIO(streamed.read_bytes())), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "ours.json", "plain.txt"]


def test_tensors_are_replaced_in_one_rename_with_the_mode_open_would_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "cache" / "f.safetensors"
    old_mask = os.umask(0o027)
    try:
        fileio.save_tensors_atomically({"x": torch.arange(3.0)}, path, metadata={"k": "v"})
    finally:
        os.umask(old_mask)
    assert path.stat().st_mode & 0o777 == 0o640
    assert torch.equal(load_file(str(path))["x"], torch.arange(3.0))

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fileio.save_tensors_atomically({"x": torch.zeros(5)}, path)
    assert torch.equal(load_file(str(path))["x"], torch.arange(3.0))  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["f.safetensors"]  # no temporary file


def test_a_folder_of_our_own_may_hold_only_some_of_our_files(tmp_path: Path) -> None:
    """A write cut short leaves part of our files: writing there again is allowed; a folder of
    other files is refused, naming the file it lacks."""
    own = ("classifier.json", "model.safetensors")
    part = tmp_path / "teacher"
    part.mkdir()
    (part / "model.safetensors").write_bytes(b"x")
    fileio.check_folder_target(part, "--save", own_files=own)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holds other files and no classifier.json"):
        fileio.check_folder_target(images, "--save", own_files=own)
    fileio.check_folder_target(tmp_path / "new", "--save", own_files=own)
