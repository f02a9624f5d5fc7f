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


def test_byol_predictor_lr_scale_multiplies_only_the_predictors_update(image_folder, tmp_path):
    # one plain SGD step (no momentum, no weight decay, constant LR): every parameter moves by
    # -lr * scale * grad, and step 0's gradient is the same in every run (same seed, same views)
    finals = {}
    for scale in (1.0, 4.0, 7.0):
        tree = _tree("byol", image_folder, tmp_path / f"s{scale}")
        tree["method"] = tree["method"] | {"predictor_lr_scale": scale}
        tree["optim"] = {"name": "sgd", "lr": 0.2, "warmup_steps": 0, "momentum": 0.0,
                         "weight_decay": 0.0, "schedule": "constant"}  # fmt: skip
        tree["train"] = tree["train"] | {"steps": 1, "precision": "fp32"}
        api.pretrain(config.load(tree))
        finals[scale] = _final_model(tmp_path / f"s{scale}")
    a, b, c = finals[1.0], finals[4.0], finals[7.0]
    predictor = [k for k in a if k.startswith("predictor.") and a[k].is_floating_point()]
    assert predictor and any(not torch.equal(a[k], b[k]) for k in predictor)
    moved = max((b[k] - a[k]).abs().max().item() for k in predictor)
    assert moved > 1e-3  # 3 * lr * |g|: far above the fp32 rounding of the parameters (~1e-7)
    for key in predictor:  # p_s = p_0 - s * lr * g: equal steps between s = 1, 4, 7
        torch.testing.assert_close(b[key] - a[key], c[key] - b[key], rtol=1e-4, atol=1e-6)
    for key in (k for k in a if k.startswith(("backbone.", "projector."))):
        assert torch.equal(a[key], b[key]), key  # the encoder and projector: the scheduled LR
