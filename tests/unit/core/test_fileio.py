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
