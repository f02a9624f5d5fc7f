"""Names, parameter specs and their one-line errors."""

from __future__ import annotations

import pytest
import torch

from wildsight.backbones import (
    BACKBONES,
    RegNet,
    RegNetParams,
    ResNet,
    ResNetParams,
    build_backbone,
)
from wildsight.backbones.registry import parse_spec

REGNETS = [
    "200mf",
    "400mf",
    "600mf",
    "800mf",
    "1.6gf",
    "3.2gf",
    "4.0gf",
    "6.4gf",
    "8.0gf",
    "12gf",
    "16gf",
    "32gf",
]


def test_every_published_variant_is_named() -> None:
    expected = {f"regnet{xy}_{size}" for xy in "xy" for size in REGNETS}
    expected |= {"regnety_64gf", "regnety_128gf", "regnety_256gf"}
    expected |= {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50v2"}
    assert expected <= set(BACKBONES)


def _one_line_error(name: str) -> str:
    with pytest.raises(ValueError) as info:
        build_backbone(name)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_name_suggests_the_closest() -> None:
    message = _one_line_error("regnety_400m")
    assert message.startswith(
        "unknown backbone 'regnety_400m'; did you mean 'regnety_400mf'? choose from"
    )
    assert "'resnet50'" in message and "regnet:depth=" in message
    assert "did you mean 'resnet50'" in _one_line_error("resnet-50")


def test_regnet_spec_builds_the_same_model_as_the_preset() -> None:
    spec = "regnet:depth=27,w0=640,wa=230.83,wm=2.53,group_width=373,bottleneck=1.0,se=0.25"
    params, _ = parse_spec(spec)
    assert params == RegNetParams(27, 640, 230.83, 2.53, 373, 1.0, 0.25)
    with torch.device("meta"):
        model = build_backbone(spec, small_input=True)
    assert isinstance(model, RegNet) and model.feature_dim == 10444
    x_params, _ = parse_spec("regnet:depth=13,w0=24,wa=36.44,wm=2.49,group_width=8,se=0")
    assert x_params == RegNetParams(13, 24, 36.44, 2.49, 8)  # se=0: a RegNetX


def test_resnet_spec() -> None:
    params, _ = parse_spec("resnet:depth=50,k=8,version=2,final_relu=false")
    assert params == ResNetParams(50, k=8, version=2, final_relu=False)
    with torch.device("meta"):
        assert isinstance(build_backbone("resnet:depth=18"), ResNet)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (
            "regnet:depth=27,w00=640,wa=1,wm=2,group_width=8",
            "unknown key 'w00'; did you mean 'w0'?",
        ),
        ("regnet:depth=27,wa=1,wm=2,group_width=8", "missing w0"),
        ("regnet:depth=27.5,w0=64,wa=1,wm=2,group_width=8", "depth='27.5' is not a valid int"),
        ("regnet:depth=2,depth=3,w0=64,wa=1,wm=2,group_width=8", "key 'depth' given twice"),
        ("regnet:depth=2,w0,wa=1,wm=2,group_width=8", "expected key=value, got 'w0'"),
        ("regnet:depth=2,w0=60,wa=1,wm=2,group_width=8", "w0 must be a positive multiple of 8"),
        ("regnot:depth=2", "unknown backbone family 'regnot'"),
        ("resnet:depth=50,final_relu=maybe", "final_relu='maybe' is not a valid bool"),
        ("resnet:depth=51", "ResNet depth must be one of"),
    ],
)
def test_bad_specs_fail_in_one_line(spec: str, fragment: str) -> None:
    assert fragment in _one_line_error(spec)


def test_small_input_swaps_only_the_stem() -> None:
    with torch.device("meta"):
        published, small = (
            build_backbone("regnetx_200mf"),
            build_backbone("regnetx_200mf", small_input=True),
        )
    assert published.stem.conv.stride == (2, 2) and small.stem.conv.stride == (1, 1)
    assert published.state_dict().keys() == small.state_dict().keys()
