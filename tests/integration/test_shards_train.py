"""Pretraining straight from tar shards: the trainer is unchanged, and a run killed mid-stream
resumes from the saved stream position to exactly the weights of an uninterrupted run."""

from pathlib import Path

import torch

from tests.conftest import tiny_tree
from tests.integration.reliability import pretrain_killed_at_step
from wildsight import api, config
from wildsight.data import write_shards
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
    pretrain_killed_at_step(tiny_tree(shards, tmp_path / "crashed", **tree), 3, monkeypatch)
    _, saved = _final(tmp_path / "crashed")
    assert saved["train"]["step"] == 2 and saved["loader"]["kind"] == "shards"
    assert saved["loader"]["slots"]["0"]["done"] == 16  # 2 batches of 8 into the first block

    api.pretrain(config.load(tiny_tree(shards, tmp_path / "crashed", **tree)), resume=True)
    a, state = _final(tmp_path / "straight")
    b, _ = _final(tmp_path / "crashed")
    assert state["loader"]["slots"]["0"]["done"] == 32
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_frozen_feature_evals_read_labelled_shards_as_the_folder_they_came_from(
    image_folder, tmp_path
):
    """Shards packed from a labelled folder give the same features, labels and probe result as
    the folder (the nearest-neighbour grid, which needs images by index, is left out)."""
    shards = tmp_path / "shards"
    write_shards([str(image_folder)], shards, shard_size=8)
    run = tmp_path / "run"
    api.pretrain(config.load(tiny_tree(image_folder, run, steps=2)))
    from_shards = api.eval_knn(run, str(shards), str(image_folder), ks=[5], name="shards")
    from_folder = api.eval_knn(run, str(image_folder), str(image_folder), ks=[5], name="folder")
    assert (run / "eval" / "shards.json").is_file() and "neighbours" not in from_shards
    assert "neighbours" in from_folder
    assert from_shards["top1"] == from_folder["top1"]
    assert from_shards["confusion"] == from_folder["confusion"]
