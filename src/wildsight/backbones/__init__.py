"""Image encoders: RegNet (pycls, SEER) and ResNet v1/v2 with width k, by name or by parameters.

backbone = build_backbone("regnety_400mf", small_input=True)
features = backbone(images)  # [B, 3, H, W] float -> [B, backbone.feature_dim]
"""

from wildsight.backbones.complexity import (
    Complexity,
    Cx,
    classifier_complexity,
    count_flops,
    count_params,
)
from wildsight.backbones.layers import Backbone
from wildsight.backbones.registry import BACKBONES, build_backbone, describe_backbones
from wildsight.backbones.regnet import RegNet, RegNetParams, generate_regnet
from wildsight.backbones.resnet import ResNet, ResNetParams

__all__ = [
    "BACKBONES",
    "Backbone",
    "Complexity",
    "Cx",
    "RegNet",
    "RegNetParams",
    "ResNet",
    "ResNetParams",
    "build_backbone",
    "classifier_complexity",
    "count_flops",
    "count_params",
    "describe_backbones",
    "generate_regnet",
]
