"""SimCLR's memory queue and BYOL's EMA target resume exactly, and the trainer drives BYOL's tau."""

import json
import math

import pytest
import torch

from tests.conftest import tiny_tree
from tests.integration.reliability import crash_then_resume
from wildsight import api, config
from wildsight.methods.byol import BYOL
from wildsight.methods.simclr import SimCLR
from wildsight.train import checkpoint

SMALL = {
    "simclr": (SimCLR, {"name": "simclr", "hidden_dim": 32, "out_dim": 16, "memory": 20},
               [{"count": 2, "size": 16, "scale": [0.3, 1.0]}]),
    "byol": (BYOL, {"name": "byol", "hidden_dim": 32, "out_dim": 16, "predictor_hidden_dim": 24},
             [{"count": 1, "size": 16, "scale": [0.3, 1.0], "augment": {"solarize_p": 0.0}},
              {"count": 1, "size": 16, "scale": [0.3, 1.0], "augment": {"solarize_p": 0.2}}]),
}  # fmt: skip


def _tree(name, folder, out):
    _, method, groups = SMALL[name]
    return tiny_tree(folder, out) | {"method": method, "views": {"groups": groups}}


def _final_model(run_dir):
    tensors, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_crash_then_resume_equals_uninterrupted(name, image_folder, tmp_path, monkeypatch):
    cls = SMALL[name][0]
    api.pretrain(config.load(_tree(name, image_folder, tmp_path / "straight")))
    tree = _tree(name, image_folder, tmp_path / "crashed")
    resumed = crash_then_resume(monkeypatch, cls, tree)
    assert resumed.steps == 6
    a, b = _final_model(tmp_path / "straight"), _final_model(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # queue / target network included
    if name == "simclr":
        assert int(a["memory_size"]) == 20 and a["memory_bank"].norm(dim=1).min() > 0.99
    else:
        assert any(k.startswith("target_backbone.") for k in a)
        assert not torch.equal(
            a["backbone.stem.conv.weight"], a["target_backbone.stem.conv.weight"]
        )


def test_trainer_gives_byol_the_run_length_for_its_tau_schedule(image_folder, tmp_path):
    result = api.pretrain(config.load(_tree("byol", image_folder, tmp_path / "run")))
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    taus = [row["tau"] for row in rows]  # one row per step: log_every_steps = 1
    expected = [1 - 0.004 * (math.cos(math.pi * k / 6) + 1) / 2 for k in range(6)]
    assert taus == pytest.approx(expected, abs=1e-12)
