"""Self-supervised methods. `METHODS` is the registry: a dict literal, one line per method."""

from __future__ import annotations

import difflib

from wildsight.backbones import Backbone
from wildsight.methods.base import Method, StepOutput, multicrop_features
from wildsight.methods.byol import BYOL, BYOLConfig
from wildsight.methods.exemplar import Exemplar, ExemplarConfig
from wildsight.methods.jigsaw import Jigsaw, JigsawConfig
from wildsight.methods.rotation import Rotation, RotationConfig
from wildsight.methods.rpl import RelativePatchLocation, RPLConfig
from wildsight.methods.simclr import SimCLR, SimCLRConfig
from wildsight.methods.swav import SwAV, SwAVConfig
from wildsight.views import ViewSpec

METHODS: dict[str, tuple[type[Method], type]] = {
    "swav": (SwAV, SwAVConfig),
    "simclr": (SimCLR, SimCLRConfig),
    "byol": (BYOL, BYOLConfig),
    "rotation": (Rotation, RotationConfig),
    "jigsaw": (Jigsaw, JigsawConfig),
    "rpl": (RelativePatchLocation, RPLConfig),
    "exemplar": (Exemplar, ExemplarConfig),
}

MethodConfig = SwAVConfig


def method_config_class(name: str) -> type:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown method {name!r}; {hint}choose from {sorted(METHODS)}")
    return METHODS[name][1]


def build_method(cfg: MethodConfig, backbone: Backbone, views: ViewSpec) -> Method:
    cls, _ = METHODS[cfg.name]
    return cls(backbone, views, cfg)


__all__ = [
    "METHODS",
    "Method",
    "StepOutput",
    "build_method",
    "method_config_class",
    "multicrop_features",
]
