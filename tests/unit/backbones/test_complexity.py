"""Params and FLOPs: the published table (golden), and analytic == measured counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wildsight.backbones import (
    BACKBONES,
    Cx,
    build_backbone,
    count_flops,
    count_params,
    describe_backbones,
)

GOLDEN = json.loads((Path(__file__).parents[2] / "golden" / "backbone_complexity.json").read_text())
ROWS = {row["name"]: row for row in describe_backbones()}


@pytest.mark.parametrize("name", sorted(GOLDEN["models"]))
def test_published_complexity(name: str) -> None:
    published, row = GOLDEN["models"][name], ROWS[name]
    assert row["params_with_classifier"] == published["params"]
    if "flops" in published:  # pycls: exact multiply-adds
        assert row["flops_with_classifier"] == published["flops"]
    if "gflops" in published:  # torchvision: billions, 3 decimals
        assert round(row["gflops_with_classifier"], 3) == published["gflops"]


def test_golden_covers_every_pycls_regnet() -> None:
    regnets = {n for n in BACKBONES if n.startswith("regnet")} - {
        "regnety_64gf",
        "regnety_128gf",
        "regnety_256gf",
    }
    assert regnets <= set(GOLDEN["models"])
    assert len(regnets) == 24


def test_describe_rows() -> None:
    assert list(ROWS) == list(BACKBONES)
    for row in ROWS.values():
        assert row["params_with_classifier"] == row["params"] + row["feature_dim"] * 1000 + 1000
        assert row["gflops"] == row["flops"] / 1e9
        assert row["feature_dim"] == row["stage_dims"][-1]
        assert row["family"] in ("regnet", "resnet", "revnet", "vgg", "sk_resnet")
    assert describe_backbones() == list(ROWS.values())  # cached, and returns fresh dicts
    assert describe_backbones()[0] is not describe_backbones()[0]


@pytest.mark.parametrize(
    "name",
    ["regnetx_200mf", "regnety_200mf", "resnet18", "resnet50v2_minus",
     "regnet:depth=6,w0=16,wa=12,wm=2,group_width=8,bottleneck=0.5,se=0.25"],
)  # fmt: skip
@pytest.mark.parametrize("small_input", [False, True])
def test_analytic_count_equals_measured_count(name: str, small_input: bool) -> None:
    with torch.device("meta"):
        model = build_backbone(name, small_input=small_input)
    size = 32 if small_input else 224
    analytic = model.complexity(size)
    assert analytic.params == count_params(model)
    assert analytic.flops == count_flops(model, size)


def test_count_flops_leaves_the_model_as_it_was() -> None:
    model = build_backbone("regnety_200mf", small_input=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, 32)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cx_arithmetic() -> None:
    cx = Cx(224, 224).conv(3, 64, 7, stride=2).norm(64).pool(stride=2)
    assert (cx.h, cx.w) == (56, 56)
    assert cx.params == 7 * 7 * 3 * 64 + 2 * 64
    assert cx.flops == 7 * 7 * 3 * 64 * 112 * 112
    cx = Cx(7, 7).conv(32, 64, 3, groups=4, bias=True)
    assert cx.flops == 9 * 32 * 64 // 4 * 49 + 64  # pycls: a bias adds C_out once
