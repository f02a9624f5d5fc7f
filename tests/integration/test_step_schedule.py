"""Revisiting's pretext schedule: linear warm-up, then the LR divided by 10 at fixed fractions of
the run (epochs 15 and 25 of 35), as the trainer applies it step by step."""

from __future__ import annotations

import json

from tests.conftest import tiny_tree
from wildsight import api, config


def test_the_step_schedule_warms_up_then_divides_at_each_milestone(image_folder, tmp_path):
    tree = tiny_tree(image_folder, tmp_path / "run", steps=8)
    tree["optim"] |= {"schedule": "step", "lr_decay_at": [0.5, 0.75], "warmup_steps": 2,
                      "start_lr": 0.03, "lr": 0.3}  # fmt: skip
    api.pretrain(config.load(tree))
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    got = {row["step"] - 1: row["lr"] for row in rows}  # row "step" n is logged after step n - 1
    scale = 8 / 256  # batch 8, LR per 256 images
    start, base = 0.03 * scale, 0.3 * scale
    expected = {0: start, 1: (start + base) / 2}  # linear warm-up over steps 0 and 1
    expected |= {k: base for k in (2, 3)}  # milestone 0.5 x 8 = step 4, 0.75 x 8 = step 6
    expected |= {k: base / 10 for k in (4, 5)} | {k: base / 100 for k in (6, 7)}
    assert got.keys() == expected.keys()
    for k, lr in expected.items():
        assert abs(got[k] - lr) < 1e-12, (k, got[k], lr)
