"""Pretext tasks draw tile jitter, permutations, neighbours and dropout masks from torch's global
RNG, which the trainer checkpoints: a run killed mid-way and resumed equals an uninterrupted one."""

import json

import pytest
import torch

from tests.conftest import tiny_tree
from tests.integration.reliability import crash_then_resume
from wildsight import api, config
from wildsight.methods.jigsaw import Jigsaw
from wildsight.train import checkpoint

# Jigsaw draws the most from the global RNG (tile jitter, K permutations per image, dropout);
# RPL's neighbour draws and Rotation/Exemplar use the same RNG or none.
SMALL = {
    "jigsaw": (Jigsaw, {"name": "jigsaw", "embed_dim": 8, "hidden_dim": 16, "num_permutations": 10,
                        "permutations_per_image": 3}),
}  # fmt: skip


def _tree(name, folder, out):
    # 24 px crops: 8 px cells, 6 px tiles, jitter +-1
    views = {"groups": [{"count": 1, "size": 24, "scale": [0.5, 1.0]}]}
    return tiny_tree(folder, out) | {"method": SMALL[name][1], "views": views}


def _final_model(run_dir):
    tensors, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_crash_then_resume_equals_uninterrupted(name, image_folder, tmp_path, monkeypatch):
    cls = SMALL[name][0]
    straight = api.pretrain(config.load(_tree(name, image_folder, tmp_path / "straight")))
    tree = _tree(name, image_folder, tmp_path / "crashed")
    resumed = crash_then_resume(monkeypatch, cls, tree)
    assert resumed.steps == 6
    a, b = _final_model(tmp_path / "straight"), _final_model(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the logged losses after the resume point match too (same tiles, labels and dropout)
    rows = lambda run: {r["step"]: r["loss"] for r in map(json.loads, run.read_text().splitlines())}  # noqa: E731
    before, after = (
        rows(straight.run_dir / "metrics.jsonl"),
        rows(tmp_path / "crashed" / "metrics.jsonl"),
    )
    assert all(after[s] == before[s] for s in before if s >= 4)
