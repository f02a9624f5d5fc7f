"""The demo's probe row (Goyal et al. 2019 grid taps, layer chosen on the held-out split) and
`eval linear --layers grids` on a tiny run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_tree
from wildsight import api
from wildsight import config as config_lib
from wildsight.cli import main
from wildsight.demo import DEMO_GRID_LAYERS, probe_row
from wildsight.eval import grid_side


@pytest.fixture
def run(image_folder, tmp_path):  # noqa: ANN001, ANN201
    out = tmp_path / "run"
    api.pretrain(config_lib.load(tiny_tree(image_folder, out, steps=2)))
    return out


def test_the_row_quotes_the_grid_layer_best_on_the_held_out_split(run, image_folder) -> None:  # noqa: ANN001
    row = probe_row("swav", api.load_encoder(run), str(image_folder), str(image_folder))
    layers = row["linear_layers"]
    grids = [name for name in layers if name.endswith("_grid")]
    assert list(layers) == ["pre_logits", "stage3_grid", "stage4_grid"][: 1 + DEMO_GRID_LAYERS]
    best = max(grids, key=lambda name: layers[name]["val_top1"])
    assert row["layer"] == best and row["linear_top1"] == layers[best]["top1"]
    assert row["linear_pooled_top1"] == layers["pre_logits"]["top1"]
    # 16 px images: the small-stem RegNetX-200MF maps of stages 3 and 4 are 2 and 1 px wide
    assert layers["stage3_grid"]["feature_dim"] == 152 * grid_side(152, 2, 2) ** 2 == 152 * 4
    assert layers["stage4_grid"]["feature_dim"] == layers["pre_logits"]["feature_dim"] == 368
    pixels = probe_row("raw pixels", None, str(image_folder), str(image_folder))
    assert pixels["dim"] == 3 * 28 * 28 and pixels["linear_pooled_top1"] is None


def test_eval_linear_grids_headlines_the_best_held_out_layer(run, image_folder, capsys) -> None:  # noqa: ANN001
    data = ["--checkpoint", str(run), "--train", str(image_folder), "--test", str(image_folder)]
    assert main(["eval", "linear", "--layers", "grids", "--name", "g", *data]) == 0
    doc = json.loads((run / "eval" / "g.json").read_text())
    rows = doc["rows"]
    assert [r["layer"] for r in rows] == [f"stage{i}_grid" for i in (1, 2, 3, 4)]
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_top1"], -i))
    assert doc["top1"] == rows[best]["top1"]
