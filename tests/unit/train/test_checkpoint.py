"""Checkpoints: exact round trips, resume == uninterrupted, atomicity under failure, no pickle."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wildsight.train import checkpoint
from wildsight.train.checkpoint import (
    CheckpointError,
    flatten_state,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)
from wildsight.train.optim import build_optimizer, param_groups


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """A few steps whose data draws from all three global RNGs, so each must be restored."""
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6) * (1.0 + random.random()) + float(np.random.rand())
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Same structure, same Python types (int stays int, tuple stays tuple), bitwise tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), path
        assert list(a) == list(b), path
        assert [type(k) for k in a] == [type(k) for k in b], path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{path}/{i}")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def _snapshot(
    model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors, meta = flatten_state({"model": model.state_dict(), "optim": opt.state_dict()})
    cloned = {k: v.detach().clone() for k, v in tensors.items()}
    return unflatten_state(cloned, meta)["model"], unflatten_state(cloned, meta)["optim"]


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_resume_equals_uninterrupted_training(tmp_path: Path, name: str) -> None:
    _seed(0)
    model = _model()
    opt = build_optimizer(name, param_groups(model, 1e-4), lr=0.05, momentum=0.9, weight_decay=1e-4)
    _train(model, opt, 3)
    tensors, meta = flatten_state(
        {"model": model.state_dict(), "optim": opt.state_dict(), "rng": rng_state()}
    )
    save_checkpoint(tmp_path, 3, tensors=tensors, state={"tensor_meta": meta, "step": 3})
    saved_model, saved_optim = _snapshot(model, opt)
    expected_losses = _train(model, opt, 3)
    expected_params = [p.detach().clone() for p in model.parameters()]

    _seed(123)  # a different start: everything must come from the checkpoint
    resumed = _model()
    opt2 = build_optimizer(
        name, param_groups(resumed, 1e-4), lr=0.05, momentum=0.9, weight_decay=1e-4
    )
    loaded, state = load_checkpoint(tmp_path)
    assert state["step"] == 3
    parts = unflatten_state(loaded, state["tensor_meta"])
    _assert_identical(saved_model, parts["model"])
    _assert_identical(saved_optim, parts["optim"])
    assert parts["model"]["1.num_batches_tracked"].dtype == torch.int64
    resumed.load_state_dict(parts["model"], strict=True)
    opt2.load_state_dict(parts["optim"])
    set_rng_state(parts["rng"])
    assert _train(resumed, opt2, 3) == expected_losses
    for p, q in zip(resumed.parameters(), expected_params, strict=True):
        assert torch.equal(p.detach(), q)


def test_flatten_keeps_python_types_through_json(tmp_path: Path) -> None:
    state = {
        "optim": {
            "state": {0: {"step": torch.tensor(7.0), "buf": torch.arange(6.0).view(2, 3)}, 5: {}},
            "param_groups": [
                {
                    "params": [0, 5],
                    "betas": (0.9, 0.999),
                    "foreach": None,
                    "nesterov": False,
                    "lr": 0.1,
                }
            ],
        },
        "misc": {
            "__tensor__": 3,
            "nested": [(1, "a", None), {"k": torch.ones(2, dtype=torch.bool)}],
        },
        "odd/keys": {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}, (2, 3): 1.5, None: True},
    }
    tensors, meta = flatten_state(state)
    assert "optim/state/0/step" in tensors and "optim/state/0/buf" in tensors
    json_meta = json.loads(json.dumps(meta))
    save_checkpoint(tmp_path, 0, tensors=tensors, state={"meta": json_meta})
    loaded, saved = load_checkpoint(tmp_path / "ckpt-000000000")
    _assert_identical(state, unflatten_state(loaded, saved["meta"]))


def test_unflatten_is_strict() -> None:
    tensors, meta = flatten_state({"m": {"w": torch.ones(2)}})
    with pytest.raises(CheckpointError, match="not referenced"):
        unflatten_state({**tensors, "extra": torch.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match="missing"):
        unflatten_state({}, meta)
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        flatten_state({"m": {"w": object()}})


def test_aliased_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.arange(12.0).view(3, 4)
    tensors = {"a": base, "b": base, "t": base.t(), "row": base[1], "lin": nn.Linear(2, 2).weight}
    save_checkpoint(tmp_path, 1, tensors=tensors, state={})
    loaded, _ = load_checkpoint(tmp_path)
    for key, t in tensors.items():
        assert torch.equal(loaded[key], t.detach()), key


def test_rng_state_round_trip_json_and_tensor(tmp_path: Path) -> None:
    _seed(5)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    # the trainer's way: the torch tensor into safetensors, the rest as plain JSON
    torch_state = state.pop("torch")
    save_checkpoint(tmp_path, 0, tensors={"rng_torch": torch_state}, state={"rng": state})
    loaded, saved = load_checkpoint(tmp_path)
    _seed(99)
    set_rng_state(saved["rng"] | {"torch": loaded["rng_torch"]})
    got = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert torch.equal(got[2], expected[2])


def _save_steps(directory: Path, steps: list[int], keep_last: int | None = 3) -> None:
    for step in steps:
        save_checkpoint(
            directory, step, tensors={"w": torch.full((3,), float(step))}, state={"step": step},
            keep_last=keep_last,
        )  # fmt: skip


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_keep_last_prunes_the_oldest(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    assert _names(tmp_path) == ["ckpt-000000004", "ckpt-000000005", "latest"]
    assert (tmp_path / "latest").read_text() == "ckpt-000000005\n"
    tensors, state = load_checkpoint(tmp_path)
    assert state == {"step": 5} and torch.equal(tensors["w"], torch.full((3,), 5.0))
    _save_steps(tmp_path, [6, 7], keep_last=None)
    assert len(_names(tmp_path)) == 5


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2])
    save_checkpoint(tmp_path, 2, tensors={"w": torch.zeros(1)}, state={"again": True})
    assert _names(tmp_path) == ["ckpt-000000001", "ckpt-000000002", "latest"]
    tensors, state = load_checkpoint(tmp_path)
    assert state == {"again": True} and torch.equal(tensors["w"], torch.zeros(1))


def _enospc(path: Path, data: bytes | None = None) -> None:
    """Write half of the bytes, then fail as a full disk does."""
    with open(path, "wb") as f:
        f.write((data or b"x" * 1000)[: max(1, len(data or b"") // 2)])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["tensors", "state", "latest"])
def test_failure_mid_write_leaves_previous_checkpoint_and_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    _save_steps(tmp_path, [1])
    write_bytes = checkpoint._write_bytes
    if failing == "tensors":
        monkeypatch.setattr(checkpoint, "_write_tensors", lambda path, tensors: _enospc(path))
    else:
        target = "state.json" if failing == "state" else ".tmp-latest-"

        def write(path: Path, data: bytes) -> None:
            if path.name.startswith(target):
                _enospc(path, data)
            write_bytes(path, data)

        monkeypatch.setattr(checkpoint, "_write_bytes", write)
    with pytest.raises(CheckpointError) as info:
        _save_steps(tmp_path, [2])
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "ckpt-000000002") in message and "No space left on device" in message
    assert f"the previous checkpoint {tmp_path / 'ckpt-000000001'} is intact" in message
    assert _names(tmp_path) == ["ckpt-000000001", "latest"]  # no temp dir or file left
    assert (tmp_path / "latest").read_text() == "ckpt-000000001\n"
    tensors, state = load_checkpoint(tmp_path)
    assert state == {"step": 1} and torch.equal(tensors["w"], torch.full((3,), 1.0))
    monkeypatch.undo()
    _save_steps(tmp_path, [2])  # and the next save works
    assert load_checkpoint(tmp_path)[1] == {"step": 2}


def test_first_save_failing_says_there_was_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "_write_tensors", lambda path, tensors: _enospc(path))
    with pytest.raises(CheckpointError, match="there was none before"):
        _save_steps(tmp_path, [1])
    assert _names(tmp_path) == []


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    partial = tmp_path / ".tmp-ckpt-000000002-abc123"  # what a SIGKILL mid-write leaves
    partial.mkdir()
    (partial / "tensors.safetensors").write_bytes(b"\x00" * 10)
    assert load_checkpoint(tmp_path)[1] == {"step": 1}
    _save_steps(tmp_path, [2])
    assert _names(tmp_path) == ["ckpt-000000001", "ckpt-000000002", "latest"]


def test_state_must_be_json_native(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="flatten_state"):
        save_checkpoint(tmp_path, 0, tensors={}, state={"betas": (0.9, 0.999)})
    with pytest.raises(CheckpointError, match="non-str key 3"):
        save_checkpoint(tmp_path, 0, tensors={}, state={"state": {3: 1.0}})
    with pytest.raises(CheckpointError, match="Tensor"):
        save_checkpoint(tmp_path, 0, tensors={}, state={"w": torch.ones(1)})


class _Evil:
    """Unpickling this creates `marker`: what a malicious .pt file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pickle_files_are_refused_without_being_executed(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))  # the payload works when unpickled...
    assert control.exists()
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": _Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match=str(evil)):  # ...a .pt file is not even opened
        load_checkpoint(evil)
    # a pickle disguised as the tensors file of a checkpoint, with a matching size and crc32
    ckpt = tmp_path / "run" / "ckpt-000000001"
    ckpt.mkdir(parents=True)
    (ckpt / "tensors.safetensors").write_bytes(evil.read_bytes())
    n_bytes, crc = checkpoint._crc32(ckpt / "tensors.safetensors")
    record = {"format": 1, "tensors": {"bytes": n_bytes, "crc32": crc}, "state": {}}
    (ckpt / "state.json").write_text(json.dumps(record))
    (tmp_path / "run" / "latest").write_text("ckpt-000000001\n")
    with pytest.raises(CheckpointError, match=str(ckpt / "tensors.safetensors")):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "latest").write_text("../model.pt\n")
    with pytest.raises(CheckpointError, match="not a ckpt-<step> directory"):
        load_checkpoint(tmp_path / "run")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_corrupt_tensors_file_is_named(tmp_path: Path, damage: str) -> None:
    _save_steps(tmp_path, [1])
    path = tmp_path / "ckpt-000000001" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-1] ^= 0xFF  # in the tensor bytes: only the crc32 can tell
    else:
        data[:8] = b"\xff" * 8  # header length
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(tmp_path)


def test_bad_state_json_and_missing_targets_are_named(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    state_file = tmp_path / "ckpt-000000001" / "state.json"
    state_file.write_text('{"format": 1, "tens')
    with pytest.raises(CheckpointError, match=str(state_file)):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("ckpt-000000009\n")
    with pytest.raises(CheckpointError, match="ckpt-000000009, which is missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoints_get_the_modes_mkdir_and_open_would_give_them(tmp_path: Path) -> None:
    """mkdtemp/mkstemp make 0700/0600; a checkpoint must be as readable as the run's other files
    (a colleague evaluating a run on a shared cluster), under the process's umask."""
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, 1, tensors={"w": torch.zeros(2)}, state={"step": 1})
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    ckpt = checkpoint.latest_checkpoint(tmp_path)
    assert ckpt is not None
    assert ckpt.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for path in (tmp_path / "latest", *ckpt.iterdir()):
        assert path.stat().st_mode & 0o777 == plain == 0o644, path
