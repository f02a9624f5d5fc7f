"""A planted pickle (or YAML object tag) wherever wildsight reads a file from the user never
runs: every command refuses it with a one-line error (exit code 2) and the payload's marker
file is never created. The payloads are live: unpickled on purpose, they do create it."""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import zlib

import pytest
import torch

from tests.conftest import tiny_tree, write_images
from wildsight import api, config
from wildsight.cli import main


class Payload:
    """Unpickling this creates the file `marker` (a stand-in for any code an attacker wants)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def pickle_bytes(marker) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_file(marker, path) -> pathlib.Path:
    """A `.pt` file as torch.save writes it (a zip holding data.pkl)."""
    torch.save({"state_dict": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    write_images(root / "images", 16)
    api.pretrain(config.load(tiny_tree(root / "images", root / "run", steps=1)))
    return root / "run"


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted payload ran"


def test_the_payloads_are_live(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle_bytes(live))
    assert live.exists()
    live.unlink()
    torch.load(torch_file(live, tmp_path / "x.pt"), weights_only=False)  # our own file, on purpose
    assert live.exists()


def _planted_run(good_run, tmp_path, marker, what: str) -> pathlib.Path:
    """A copy of a real run whose checkpoint file `what` is replaced by a payload."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    ckpt = next((run / "checkpoints").glob("ckpt-*"))
    if what == "tensors":  # torch's pickle format, and a state.json whose CRC matches it
        torch_file(marker, ckpt / "tensors.safetensors")
        data = (ckpt / "tensors.safetensors").read_bytes()
        record = json.loads((ckpt / "state.json").read_text())
        record["tensors"] = {"bytes": len(data), "crc32": zlib.crc32(data)}
        (ckpt / "state.json").write_text(json.dumps(record))
    elif what == "state":
        (ckpt / "state.json").write_bytes(pickle_bytes(marker))
    elif what == "pt_only":  # a checkpoint directory holding only a model.pth
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").mkdir()
        torch_file(marker, run / "checkpoints" / "model.pth")
    return run


def _refused(args, capsys, *expected: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("wildsight: error:"), err
    assert all(e in err for e in expected), err
    return err


@pytest.mark.parametrize(
    ("what", "why"),
    [("tensors", "not a valid safetensors file"), ("state", "not valid JSON"),
     ("pt_only", "checkpoint")],
)  # fmt: skip
def test_planted_checkpoint_files_are_refused_by_every_command(
    good_run, tmp_path, marker, capsys, what, why
):
    run = _planted_run(good_run, tmp_path, marker, what)
    images = str(good_run.parent / "images")
    _refused(["pretrain", "--out", str(run), "--resume", "--no-progress"], capsys, why)
    _refused(["pretrain", "--config", str(run), "--out", str(tmp_path / "new"),
              "--init-from", str(run), "--no-progress"], capsys, why)  # fmt: skip
    _refused(["eval", "knn", "--checkpoint", str(run), "--train", images, "--test", images],
             capsys, why)  # fmt: skip
    _refused(["embed", "--checkpoint", str(run), "--data", images, "--out", str(tmp_path / "e.npy")],
             capsys, why)  # fmt: skip


def test_a_pt_file_given_as_checkpoint_is_refused(good_run, tmp_path, marker, capsys):
    evil = torch_file(marker, tmp_path / "weights.pt")
    _refused(["pretrain", "--config", str(good_run), "--out", str(tmp_path / "new"),
              "--init-from", str(evil)], capsys, "never unpickles")  # fmt: skip
    _refused(["embed", "--checkpoint", str(evil), "--data", "x", "--out", str(tmp_path / "e")],
             capsys)  # fmt: skip


def test_yaml_object_tags_are_refused(good_run, tmp_path, marker, capsys):
    tag = f"!!python/object/apply:pathlib.Path.touch [{str(marker)!r}]"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"train:\n  out: {tag}\n")
    _refused(["pretrain", "--config", str(evil)], capsys, "not valid YAML")
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "config.yaml").write_text(f"backbone:\n  name: {tag}\n")
    images = str(good_run.parent / "images")
    _refused(["eval", "knn", "--checkpoint", str(run), "--train", images, "--test", images], capsys)
    _refused(["pretrain", "--out", str(run), "--resume"], capsys)
