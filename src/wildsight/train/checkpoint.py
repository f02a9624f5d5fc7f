"""Atomic checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Layout of a run directory::

    run/latest                          # text: "ckpt-000012000"
    run/ckpt-000012000/tensors.safetensors
    run/ckpt-000012000/state.json       # {"format": 1, "tensors": {bytes, crc32}, "state": ...}

A checkpoint is written into a temporary directory next to its final place, every file and
the directory are fsynced, the directory is renamed into place, the run directory is fsynced,
and only then is ``latest`` replaced the same way. A crash or a full disk at any point leaves
the previous checkpoint and ``latest`` as they were (SPEC §4: public repos overwrite their one
checkpoint in place). Loading reads safetensors and JSON only: ``torch.load`` is never called,
so a pickle placed where a checkpoint should be is refused, not executed (SPEC §4).

Nested ``state_dict()``s (model, optimizer, RNG) go through ``flatten_state`` into
flat tensors plus a JSON "meta" that keeps ints, tuples, None and int dict keys exact;
``unflatten_state`` inverts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zlib
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from wildsight.fileio import current_umask, fsync_dir, save_tensors

__all__ = [
    "CheckpointError",
    "flatten_state",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unflatten_state",
]

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
FORMAT = 1
_CKPT_RE = re.compile(r"ckpt-(\d{9,})")
_TMP = ".tmp-"  # prefix of everything in flight; removed (or restored) by the next save
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the fix."""


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    directory: Path,
    step: int,
    *,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int | None = 3,
) -> Path:
    """Write ``directory/ckpt-{step:09d}/`` atomically, point ``latest`` at it, prune old ones.

    ``tensors``: flat name -> tensor (any device; aliased or non-contiguous tensors are cloned
    contiguous). ``state``: JSON-native (dict with str keys, list, str, int, float, bool, None;
    tuples and int keys are refused because JSON would change them: use ``flatten_state``).
    ``keep_last``: how many ``ckpt-*`` directories to keep, by step (the new one is always
    kept); None keeps all. Call it on one rank only. Returns the checkpoint directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    _check_json_native(state, "state")
    prepared = _prepare_tensors(tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _clean_in_flight(directory)
    name = f"ckpt-{step:09d}"
    final = directory / name
    prev = latest_checkpoint(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{name}-", dir=directory))
    os.chmod(tmp, 0o777 & ~current_umask())  # as mkdir would make it, not mkdtemp's 0700
    aside = directory / f"{_TMP}old-{name}"
    moved_aside = replaced = latest_done = False
    try:
        _write_tensors(tmp / TENSORS_FILE, prepared)
        n_bytes, crc = _crc32(tmp / TENSORS_FILE)
        record = {"format": FORMAT, "tensors": {"bytes": n_bytes, "crc32": crc}, "state": state}
        _write_bytes(tmp / STATE_FILE, json.dumps(record).encode())
        fsync_dir(tmp)
        if final.exists():  # same step saved again: keep the old one aside until done
            os.replace(final, aside)
            moved_aside = True
        os.replace(tmp, final)
        replaced = True
        fsync_dir(directory)
        _write_latest(directory, name)
        latest_done = True
        fsync_dir(directory)
    except BaseException as err:
        if not latest_done:  # roll back: `latest` still names the previous checkpoint
            if replaced:
                shutil.rmtree(final, ignore_errors=True)
            if moved_aside:
                with contextlib.suppress(OSError):  # else the next save or load restores it
                    os.replace(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception):
            raise
        kept = f"the previous checkpoint {prev} is intact" if prev else "there was none before"
        raise CheckpointError(f"could not write checkpoint to {final}: {err}; {kept}") from err
    if moved_aside:
        shutil.rmtree(aside, ignore_errors=True)
    if keep_last is not None:
        _prune(directory, keep_last, protect=name)
    return final


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU tensors; those sharing storage with another entry, or non-contiguous,
    are cloned contiguous (safetensors refuses both)."""
    out: dict[str, Tensor] = {}
    by_storage: dict[int, list[str]] = defaultdict(list)
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, Tensor):
            raise TypeError(f"tensors must map str -> Tensor, got {key!r}: {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"tensor {key!r} has layout {t.layout}; only dense tensors are saved")
        t = t.detach().to("cpu")
        out[key] = t
        if t.numel() > 0:
            by_storage[t.untyped_storage().data_ptr()].append(key)
    shared = {k for keys in by_storage.values() if len(keys) > 1 for k in keys}
    for key, t in out.items():
        if key in shared or not t.is_contiguous():
            out[key] = t.clone(memory_format=torch.contiguous_format)
    return out


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_tensors(tensors, path)
    _fsync_file(path)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_latest(directory: Path, name: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP}latest-", dir=directory)
    os.fchmod(fd, 0o666 & ~current_umask())  # as open() would make it, not mkstemp's 0600
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_bytes(tmp, f"{name}\n".encode())
        os.replace(tmp, directory / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> tuple[int, int]:
    crc, n = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, n = zlib.crc32(chunk, crc), n + len(chunk)
    return n, crc


def _clean_in_flight(directory: Path) -> None:
    """Remove what a killed save left behind; restore a checkpoint moved aside."""
    for entry in directory.iterdir():
        if not entry.name.startswith(_TMP):
            continue
        if entry.name.startswith(f"{_TMP}old-"):
            original = directory / entry.name.removeprefix(f"{_TMP}old-")
            if not original.exists():
                os.replace(entry, original)
                continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _prune(directory: Path, keep_last: int, protect: str) -> None:
    found = sorted(
        (int(m.group(1)), p.name)
        for p in directory.iterdir()
        if (m := _CKPT_RE.fullmatch(p.name)) and p.is_dir()
    )
    keep = {name for _, name in found[-keep_last:]} | {protect}
    for _, name in found:
        if name not in keep:
            try:
                shutil.rmtree(directory / name)
            except OSError as err:
                msg = f"could not delete old checkpoint {directory / name}: {err}"
                warnings.warn(msg, stacklevel=3)


def _check_json_native(obj: Any, path: str) -> None:
    if obj is None or isinstance(obj, bool | int | float | str):
        return
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_json_native(v, f"{path}[{i}]")
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(
                    f"{path} has a non-str key {k!r} that JSON would turn into a string; "
                    "pass the object through flatten_state() first"
                )
            _check_json_native(v, f"{path}[{k!r}]")
        return
    raise CheckpointError(
        f"{path} is a {type(obj).__name__}, which JSON cannot hold exactly; "
        "pass the object through flatten_state() first"
    )


# ----------------------------------------------------------------------------- load


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint directory that ``directory/latest`` names, or None if there is none."""
    latest = Path(directory) / LATEST_FILE
    if not latest.is_file():
        return None
    with open(latest, "rb") as f:
        name = f.read(256).decode("utf-8", errors="replace").strip()
    if not _CKPT_RE.fullmatch(name):
        raise CheckpointError(
            f"{latest} names {name!r}, not a ckpt-<step> directory; fix it or delete it"
        )
    return Path(directory) / name


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read ``(tensors, state)`` from a run directory (follows ``latest``) or a ckpt directory.

    Tensors come back on the CPU. Anything that is not a safetensors file plus a JSON file
    written by ``save_checkpoint`` (a ``.pt``/pickle file, a truncated or corrupt file, a
    ``latest`` that points nowhere) raises ``CheckpointError`` naming the file.
    """
    ckpt = _resolve(Path(path))
    tensors_file, state_file = ckpt / TENSORS_FILE, ckpt / STATE_FILE
    for f in (tensors_file, state_file):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: {ckpt} is not a complete checkpoint")
    try:
        record = json.loads(state_file.read_bytes())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{state_file} is not valid JSON ({err}); it is corrupt") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT or "state" not in record:
        raise CheckpointError(f"{state_file} is not a format-{FORMAT} wildsight checkpoint record")
    expected = record.get("tensors")
    if not (
        isinstance(expected, dict)
        and set(expected) == {"bytes", "crc32"}
        and all(type(v) is int for v in expected.values())
    ):
        raise CheckpointError(f"{state_file} has no valid record of {TENSORS_FILE}; it is corrupt")
    n_bytes, crc = _crc32(tensors_file)
    if (n_bytes, crc) != (expected["bytes"], expected["crc32"]):
        raise CheckpointError(
            f"{tensors_file} is corrupt or truncated ({n_bytes} bytes, crc32 {crc:#010x}; "
            f"expected {expected['bytes']} bytes, crc32 {expected['crc32']:#010x}); "
            "resume from an older checkpoint"
        )
    try:
        tensors = safetensors.torch.load_file(str(tensors_file))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{tensors_file} is not a valid safetensors file: {err}") from err
    return tensors, record["state"]


def _resolve(path: Path) -> Path:
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint directory; wildsight reads only safetensors + "
            "JSON checkpoints and never unpickles (.pt/.pth) files"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        if (path / TENSORS_FILE).exists() or (path / STATE_FILE).exists():
            return path
        raise CheckpointError(
            f"{path} holds no checkpoint (no {LATEST_FILE!r} and no {TENSORS_FILE}); pass a run "
            "directory or a ckpt-* directory"
        )
    if ckpt.is_dir():
        return ckpt
    aside = path / f"{_TMP}old-{ckpt.name}"  # a save of the same step was killed mid-swap
    if aside.is_dir():
        return aside
    raise CheckpointError(
        f"{path / LATEST_FILE} points to {ckpt}, which is missing; point it at an existing ckpt-*"
    )


# ------------------------------------------------------------------- nested state <-> flat

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _DICT})


def flatten_state(prefix_to_state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split nested state (``{"model": model.state_dict(), "optim": opt.state_dict(), ...}``)
    into flat tensors and a JSON-native meta that ``unflatten_state`` inverts exactly.

    Tensors are named by their path: ``"model/layer1.0.conv.weight"``,
    ``"optim/state/3/momentum_buffer"``. In the meta a tensor is ``{"__tensor__": name}``, a
    tuple ``{"__tuple__": [...]}``, and a dict with non-str keys (optimizer state is keyed by
    int param ids) ``{"__dict__": [[key, value], ...]}``. Tensors are not copied here.
    """
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for prefix, state in prefix_to_state.items():
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"flatten_state prefixes must be non-empty str, got {prefix!r}")
        meta[prefix] = _encode(state, prefix, tensors)
    return tensors, meta


def unflatten_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_state``: ``{prefix: nested state}``; every tensor must be used."""
    used: set[str] = set()
    out = {prefix: _decode(enc, tensors, used) for prefix, enc in meta.items()}
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{len(unused)} tensors are not referenced by the meta: {unused[:5]}")
    return out


def _encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        key, i = path, 1
        while key in tensors:  # paths only collide when a dict key itself contains "/"
            key, i = f"{path}#{i}", i + 1
        tensors[key] = obj
        return {_TENSOR: key}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not _MARKERS.intersection(obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if isinstance(k, Tensor):
                raise TypeError(f"cannot checkpoint a tensor used as a dict key at {path!r}")
            pairs.append([_encode(k, path, tensors), _encode(v, f"{path}/{k}", tensors)])
        return {_DICT: pairs}
    raise TypeError(
        f"cannot checkpoint a {type(obj).__name__} at {path!r}; "
        "use tensors, str, int, float, bool, None, lists, tuples and dicts"
    )


def _decode(obj: Any, tensors: Mapping[str, Tensor], used: set[str]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((marker, value),) = obj.items()
        if marker == _TENSOR:
            if value not in tensors:
                raise CheckpointError(f"tensor {value!r} named by the meta is missing")
            used.add(value)
            return tensors[value]
        if marker == _TUPLE:
            return tuple(_decode(v, tensors, used) for v in value)
        if marker == _DICT:
            return {_decode(k, tensors, used): _decode(v, tensors, used) for k, v in value}
    return {k: _decode(v, tensors, used) for k, v in obj.items()}


# ------------------------------------------------------------------------------ RNG

_RNG_KEYS = ("python", "numpy", "torch", "cuda")


def rng_state() -> dict[str, Any]:
    """Global RNG states: Python ``random``, NumPy's legacy global, torch CPU, and torch CUDA
    for the current device only (so a DDP rank does not create contexts on every GPU).

    Everything is JSON-native except ``"torch"``, the CPU generator's 5056-byte uint8 tensor:
    ``"python"`` is ``[version, [625 ints], gauss_next]``, ``"numpy"`` a dict with its key as
    624 ints, ``"cuda"`` a list of byte values or None. Checkpoint it whole through
    ``flatten_state({"rng": rng_state()})``, or put ``"torch"`` in the tensors and the rest
    in the JSON state; ``set_rng_state`` takes either back.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    assert isinstance(np_state, dict)
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "state": {
                "key": np_state["state"]["key"].tolist(),
                "pos": int(np_state["state"]["pos"]),
            },
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state()`` returned (torch states as uint8 tensors or lists of ints)."""
    if set(state) != set(_RNG_KEYS):
        raise ValueError(f"rng state has keys {sorted(state)}, expected {sorted(_RNG_KEYS)}")
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {
                "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                "pos": int(np_state["state"]["pos"]),
            },
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(_byte_tensor(state["cuda"]))
        else:
            warnings.warn(
                "checkpoint has a CUDA RNG state but CUDA is unavailable; ignored", stacklevel=2
            )


def _byte_tensor(value: Tensor | list[int]) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device="cpu", dtype=torch.uint8)
    return torch.tensor(value, dtype=torch.uint8)
