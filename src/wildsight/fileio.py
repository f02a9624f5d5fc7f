"""Durable small-file writes shared by every module that must not leave a half-written file.

``write_atomically`` writes to a temporary file in the destination's folder, fsyncs it, renames
it over the destination and fsyncs the folder: a crash or a full disk leaves either the old
file or the new one, never a mix, and no temporary file behind. Checkpoints (train/checkpoint.py)
follow the same steps for whole directories.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def check_file_target(path: str | Path, what: str) -> None:
    """Refuse, before any work, a path a file cannot be written to: an existing folder, or a
    parent that is a file. `what` names it in the one-line error (e.g. "--json")."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; give a file name, e.g. "
                                f"{str(path / 'result.json')!r}")  # fmt: skip
    _check_parents(path, what)


def check_folder_target(path: str | Path, what: str, *, own_files: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a path a folder cannot be made at: an existing file, or a
    parent that is a file; with `own_files`, also a folder that holds other things but none of
    those files (an image folder, a run): only an empty folder or one of our own is written to
    (one of our own may hold only some of them, after a write cut short)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} {str(path)!r} is a file; give a folder (it is created)")
    ours = any((path / name).exists() for name in own_files)
    if own_files and path.is_dir() and any(path.iterdir()) and not ours:
        raise FileExistsError(f"{what} {str(path)!r} holds other files and no {own_files[0]}; "
                              "give a new or empty folder")  # fmt: skip
    _check_parents(path, what)


def _check_parents(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {str(path)!r}: {str(parent)!r} is a file")
            return


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (files and folders made by mkstemp/mkdtemp get it applied by hand)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file (which makes the file 0600), then the mode open() would give."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def save_tensors_atomically(
    tensors: dict, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """`save_tensors` made atomic as `write_atomically` is (safetensors writes only to a file
    name, so not through write_atomically_with). Returns the path."""

    def fill(tmp: str) -> None:
        save_tensors(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    return _replace_with_temporary(path, fill)


def write_atomically(path: str | Path, data: bytes | str) -> Path:
    """Replace `path` with `data` (str is written as UTF-8, undecodable file names kept as
    surrogate escapes) in one rename; parent folders are created. Returns the path."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogateescape")
    return write_atomically_with(path, lambda f: f.write(data))


def write_atomically_with(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """write(file) into a temporary file beside `path`, fsync, one rename over `path`, fsync
    the folder (for large outputs streamed by a writer, e.g. `np.save`). Returns the path."""

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # as open() makes it, not 0600
            write(f)
            f.flush()
            os.fsync(f.fileno())

    return _replace_with_temporary(path, fill)


def _replace_with_temporary(path: str | Path, fill: Callable[[str], None]) -> Path:
    """fill(tmp) writes and fsyncs a temporary file made beside `path` (parents created); then
    one rename over `path` and an fsync of the folder. On any failure, the temporary file is
    removed and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: str | Path, data: object) -> Path:
    """`data` as indented JSON, written atomically (see write_atomically)."""
    return write_atomically(path, json.dumps(data, indent=2) + "\n")
