"""Pretraining straight from tar shards: the trainer is unchanged, and a run killed mid-stream
resumes from the saved stream position to exactly the weights of an uninterrupted run."""

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_tree
from wildsight import api, config
from wildsight.data import write_shards
from wildsight.methods.swav import SwAV
from wildsight.train import checkpoint


def _final(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"], state


def test_kill_and_resume_on_shards_equals_uninterrupted(image_folder, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    write_shards([str(image_folder)], shards, shard_size=8)  # 48 images -> 6 shards
    tree = {"steps": 4, "checkpoint_every_steps": 2}
    straight = api.pretrain(config.load(tiny_tree(shards, tmp_path / "straight", **tree)))
    assert straight.steps == 4
    original = SwAV.after_step

    def crash_at_step_3(self, step, output):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step, output)

    monkeypatch.setattr(SwAV, "after_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        api.pretrain(config.load(tiny_tree(shards, tmp_path / "crashed", **tree)))
    monkeypatch.setattr(SwAV, "after_step", original)
    _, saved = _final(tmp_path / "crashed")
    assert saved["train"]["step"] == 2 and saved["loader"]["kind"] == "shards"
    assert saved["loader"]["slots"]["0"]["done"] == 16  # 2 batches of 8 into the first block

    api.pretrain(config.load(tiny_tree(shards, tmp_path / "crashed", **tree)), resume=True)
    a, state = _final(tmp_path / "straight")
    b, _ = _final(tmp_path / "crashed")
    assert state["loader"]["slots"]["0"]["done"] == 32
    for key in a:
        assert torch.equal(a[key], b[key]), key
