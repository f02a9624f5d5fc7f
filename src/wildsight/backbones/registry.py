"""Every named backbone in one dict, a strict parser for custom ones, and a description table.

Names: the presets of regnet.py, resnet.py, revnet.py, vgg.py and sk_resnet.py. Custom models
are spelled as their parameters:
    "regnet:depth=27,w0=640,wa=230.83,wm=2.53,group_width=373,bottleneck=1.0,se=0.25"
    "resnet:depth=50,k=8,version=2,final_relu=false"
    "revnet:depth=50,k=16"   "vgg:depth=19,k=8"   "sk_resnet:depth=152,width=3,sk_ratio=0.0625"
Unknown names and keys fail in one line naming the closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any

import torch

from wildsight.backbones.complexity import classifier_complexity
from wildsight.backbones.layers import Backbone
from wildsight.backbones.regnet import PRESETS as REGNET_PRESETS
from wildsight.backbones.regnet import RegNet, RegNetParams
from wildsight.backbones.resnet import PRESETS as RESNET_PRESETS
from wildsight.backbones.resnet import ResNet, ResNetParams
from wildsight.backbones.revnet import PRESETS as REVNET_PRESETS
from wildsight.backbones.revnet import RevNet, RevNetParams
from wildsight.backbones.sk_resnet import PRESETS as SK_RESNET_PRESETS
from wildsight.backbones.sk_resnet import SKResNet, SKResNetParams
from wildsight.backbones.vgg import PRESETS as VGG_PRESETS
from wildsight.backbones.vgg import VGG, VGGParams


def regnet(params: RegNetParams, *, small_input: bool = False) -> RegNet:
    """RegNet with the published stride-2 stem, or the stride-1 one for 28-64 px images."""
    return RegNet(params, stem="small" if small_input else "simple")


def resnet(params: ResNetParams, *, small_input: bool = False) -> ResNet:
    """ResNet with the published 7x7/2 + max-pool stem, or 3x3/1 without max-pool for 28-64 px."""
    return ResNet(params, stem="small" if small_input else "imagenet")


def revnet(params: RevNetParams, *, small_input: bool = False) -> RevNet:
    """Reversible RevNet; stems as ResNet's (7x7/2 + max-pool, or 3x3/1 for 28-64 px)."""
    return RevNet(params, stem="small" if small_input else "imagenet")


def vgg(params: VGGParams, *, small_input: bool = False) -> VGG:
    """VGG-BN up to fc7; small_input drops two max-pools and feeds fc6 a global average."""
    return VGG(params, small_input=small_input)


def sk_resnet(params: SKResNetParams, *, small_input: bool = False) -> SKResNet:
    """SimCLR v2 SK-ResNet with its ResNet-C stem, or its 3x3/1 cifar stem for 28-64 px."""
    return SKResNet(params, stem="small" if small_input else "imagenet")


BACKBONES: dict[str, Callable[..., Backbone]] = {
    **{name: functools.partial(regnet, params) for name, params in REGNET_PRESETS.items()},
    **{name: functools.partial(resnet, params) for name, params in RESNET_PRESETS.items()},
    **{name: functools.partial(revnet, params) for name, params in REVNET_PRESETS.items()},
    **{name: functools.partial(vgg, params) for name, params in VGG_PRESETS.items()},
    **{name: functools.partial(sk_resnet, params) for name, params in SK_RESNET_PRESETS.items()},
}

# "family:key=value,..." specs: family -> (params dataclass, builder, spec key -> dataclass field)
_SPECS: dict[str, tuple[type[Any], Callable[..., Backbone], dict[str, str]]] = {
    "regnet": (
        RegNetParams,
        regnet,
        {
            "depth": "depth",
            "w0": "w0",
            "wa": "wa",
            "wm": "wm",
            "group_width": "group_width",
            "bottleneck": "bottleneck",
            "se": "se_ratio",
        },
    ),
    "resnet": (
        ResNetParams,
        resnet,
        {"depth": "depth", "k": "k", "version": "version", "final_relu": "final_relu"},
    ),
    "revnet": (RevNetParams, revnet, {"depth": "depth", "k": "k", "final_relu": "final_relu"}),
    "vgg": (VGGParams, vgg, {"depth": "depth", "k": "k"}),
    "sk_resnet": (
        SKResNetParams,
        sk_resnet,
        {"depth": "depth", "width": "width", "sk_ratio": "sk_ratio"},
    ),
}


def _closest(word: str, choices: list[str]) -> str:
    return difflib.get_close_matches(word, choices, n=1, cutoff=0.0)[0]


def _convert(spec: str, key: str, text: str, kind: str) -> Any:
    """Parse one value strictly: int rejects '27.5', bool takes true/false/1/0."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
    except (ValueError, KeyError):
        pass
    raise ValueError(f"backbone spec {spec!r}: {key}={text!r} is not a valid {kind}")


def parse_spec(spec: str) -> tuple[Any, Callable[..., Backbone]]:
    """'regnet:depth=..,w0=..' -> (RegNetParams(...), builder); strict keys, types and ranges."""
    family, _, body = spec.partition(":")
    if family not in _SPECS:
        raise ValueError(
            f"unknown backbone family {family!r} in {spec!r}; did you mean "
            f"{_closest(family, sorted(_SPECS))!r}? choose from {sorted(_SPECS)}"
        )
    params_cls, builder, keys = _SPECS[family]
    kinds = {f.name: str(f.type) for f in dataclasses.fields(params_cls)}
    values: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not text:
            raise ValueError(f"backbone spec {spec!r}: expected key=value, got {item!r}")
        if key not in keys:
            raise ValueError(
                f"backbone spec {spec!r}: unknown key {key!r}; did you mean "
                f"{_closest(key, list(keys))!r}? keys: {', '.join(keys)}"
            )
        field = keys[key]
        if field in values:
            raise ValueError(f"backbone spec {spec!r}: key {key!r} given twice")
        values[field] = _convert(spec, key, text, kinds[field])
    required = [k for k, f in keys.items() if f not in values and _has_no_default(params_cls, f)]
    if required:
        raise ValueError(f"backbone spec {spec!r}: missing {', '.join(required)}")
    return params_cls(**values), builder


def _has_no_default(params_cls: type[Any], field_name: str) -> bool:
    field = next(f for f in dataclasses.fields(params_cls) if f.name == field_name)
    return field.default is dataclasses.MISSING


def build_backbone(name: str, *, small_input: bool = False) -> Backbone:
    """A backbone by preset name ("regnety_400mf", "resnet50") or by spec ("regnet:...").

    small_input=True swaps the published stem for one made for 28-64 px images (stride 1, no
    max-pool), so a 32 px input still ends on a >= 2x2 map.
    """
    if ":" in name:
        params, builder = parse_spec(name)
        return builder(params, small_input=small_input)
    if name not in BACKBONES:
        names = sorted(BACKBONES)
        raise ValueError(
            f"unknown backbone {name!r}; did you mean {_closest(name, names)!r}? choose from "
            f"{names}, or 'regnet:depth=..,w0=..,wa=..,wm=..,group_width=..[,bottleneck=..,se=..]' "
            f"or 'resnet:depth=..[,k=..,version=..,final_relu=..]' (also revnet:, vgg:, sk_resnet:)"
        )
    return BACKBONES[name](small_input=small_input)


@functools.cache
def _describe(name: str) -> tuple[tuple[str, Any], ...]:
    with torch.device("meta"):
        model = BACKBONES[name]()
    cx = model.complexity(224)  # backbone only, published stem
    head = classifier_complexity(model.feature_dim, 1000)
    row = {
        "name": name,
        "family": model.family,
        "params": cx.params,
        "params_with_classifier": cx.params + head.params,
        "flops": cx.flops,
        "flops_with_classifier": cx.flops + head.flops,
        "gflops": cx.flops / 1e9,
        "gflops_with_classifier": (cx.flops + head.flops) / 1e9,
        "feature_dim": model.feature_dim,
        "stage_dims": model.stage_dims,
    }
    return tuple(row.items())


def describe_backbones() -> list[dict[str, Any]]:
    """One row per name in BACKBONES, at 224 px with the published stem.

    Keys: name, family, params (backbone only), params_with_classifier (+ a 1000-way linear
    head with bias), flops and gflops (multiply-adds, pycls count, backbone only), the same
    `_with_classifier`, feature_dim, stage_dims. Models are built on the meta device.
    """
    return [dict(_describe(name)) for name in BACKBONES]
