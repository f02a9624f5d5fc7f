"""RegNet generator and blocks: the paper's quantisation, pycls's compatibility rules, SEER."""

from __future__ import annotations

import math

import pytest
import torch

from wildsight.backbones import RegNet, RegNetParams, classifier_complexity, generate_regnet
from wildsight.backbones.regnet import PRESETS, regnet_complexity


def test_seer_256gf_stages_and_head_width() -> None:
    # Goyal et al., 2021: d 27, w0 640, wa 230.83, wm 2.53, g 373 -> stages (2, 7, 17, 1) and a
    # head whose first layer takes 10,444 features.
    widths, depths, group_widths = generate_regnet(PRESETS["regnety_256gf"])
    assert depths == (2, 7, 17, 1)
    assert widths == (746, 1492, 4103, 10444)
    assert group_widths == (373, 373, 373, 373)
    assert all(w % g == 0 for w, g in zip(widths, group_widths, strict=True))


def test_seer_256gf_has_about_1_3b_params() -> None:
    cx = regnet_complexity(PRESETS["regnety_256gf"])
    with_head = cx + classifier_complexity(10444, 1000)
    assert 1.25e9 < cx.params < 1.35e9, cx.params  # "about 1.3B parameters"
    assert with_head.params == cx.params + 10444 * 1000 + 1000


def test_seer_128gf_and_64gf_widths() -> None:
    # 128GF: the (528, 1056, 2904, 7392) widths the SEER paper quotes, and VISSL's 7392-d head;
    # 64GF: VISSL's linear-eval config takes 4920 features after the average pool.
    assert generate_regnet(PRESETS["regnety_128gf"])[:2] == ((528, 1056, 2904, 7392), (2, 7, 17, 1))
    assert generate_regnet(PRESETS["regnety_64gf"])[0][-1] == 4920


def test_quantisation_follows_the_formula() -> None:
    p = RegNetParams(depth=16, w0=48, wa=27.89, wm=2.09, group_width=8, se_ratio=0.25)
    per_block = []
    for j in range(p.depth):
        s = round(math.log((p.w0 + p.wa * j) / p.w0) / math.log(p.wm))
        per_block.append(8 * round(p.w0 * p.wm**s / 8))
    widths, depths, _ = generate_regnet(p)
    assert sum(depths) == p.depth
    runs = [w for i, w in enumerate(per_block) if i == 0 or per_block[i - 1] != w]
    assert widths == tuple(runs) == (48, 104, 208, 440)  # regnety_400mf
    assert depths == (1, 3, 6, 6)


def test_group_width_clipped_to_bottleneck_width() -> None:
    # g > width: pycls uses g = min(g, w * b), i.e. a depthwise-free single group.
    widths, _, group_widths = generate_regnet(RegNetParams(4, 16, 8.0, 2.0, group_width=64))
    assert all(g <= w for w, g in zip(widths, group_widths, strict=True))
    assert group_widths[0] == widths[0]


@pytest.mark.parametrize("bottleneck", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_widths_are_compatible_with_groups_for_any_bottleneck(bottleneck: float) -> None:
    p = RegNetParams(depth=20, w0=40, wa=30.5, wm=2.3, group_width=24, bottleneck=bottleneck)
    widths, _, group_widths = generate_regnet(p)
    for w, g in zip(widths, group_widths, strict=True):
        w_b = int(round(w * bottleneck))
        assert w_b % g == 0, (w, w_b, g)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"w0": 20},  # not a multiple of 8
        {"wm": 1.0},
        {"wa": -1.0},
        {"depth": 0},
        {"group_width": 0},
        {"se_ratio": 1.5},
    ],
)
def test_params_reject_bad_values(kwargs: dict) -> None:
    base = {"depth": 13, "w0": 24, "wa": 36.44, "wm": 2.49, "group_width": 8}
    with pytest.raises(ValueError, match="RegNet"):
        RegNetParams(**{**base, **kwargs})


def test_pycls_module_names_and_se_width_from_block_input() -> None:
    with torch.device("meta"):
        model = RegNet(PRESETS["regnety_200mf"])
    keys = model.state_dict().keys()
    for key in ["stem.conv.weight", "stem.bn.running_mean", "s1.b1.proj.weight", "s1.b1.bn.weight"]:
        assert key in keys
    for key in [
        "s1.b1.f.a.weight",
        "s1.b1.f.b.weight",
        "s1.b1.f.c_bn.weight",
        "s4.b7.f.se.f_ex.2.bias",
    ]:
        assert key in keys
    assert not any(k.startswith("head") for k in keys)
    # SE width = round(0.25 * w_in): block s3.b1 takes the 56-wide s2 output, s3.b2 the 152-wide.
    assert model.s3.b1.f.se.f_ex[0].out_channels == 14
    assert model.s3.b2.f.se.f_ex[0].out_channels == 38
    assert model.s3.b1.f.se.f_ex[0].in_channels == 152  # SE acts on the bottleneck width
    assert model.s3.b1.f.b.groups == 152 // 8


def test_stems_and_strides() -> None:
    model = RegNet(PRESETS["regnetx_200mf"], stem="small")
    maps = model.eval().forward_maps(torch.randn(1, 3, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (24, 16, 16),
        (56, 8, 8),
        (152, 4, 4),
        (368, 2, 2),
    ]
    model = RegNet(PRESETS["regnetx_200mf"], stem="simple")
    maps = model.eval().forward_maps(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    with pytest.raises(ValueError, match="stem"):
        RegNet(PRESETS["regnetx_200mf"], stem="imagenet")


def test_init_follows_pycls_and_zero_init_is_opt_in() -> None:
    torch.manual_seed(0)
    model = RegNet(PRESETS["regnetx_600mf"])
    conv = model.s4.b1.f.a  # 1x1, 240 -> 528
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / conv.out_channels), rel=0.05)
    assert torch.all(model.s4.b1.f.c_bn.weight == 1)
    zeroed = RegNet(PRESETS["regnetx_600mf"], zero_init_residual=True)
    assert all(
        torch.all(block.f.c_bn.weight == 0) for stage in zeroed.stage_modules() for block in stage
    )
    assert torch.all(zeroed.s1.b1.bn.weight == 1)  # the shortcut BN is not a residual branch's last
