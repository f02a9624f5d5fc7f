"""Image encoders, by name or by parameters: RegNet (pycls, SEER), ResNet v1/v2 and RevNet with
width k, VGG-BN, and SimCLR v2's selective-kernel ResNet.

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
from wildsight.backbones.revnet import RevNet, RevNetParams
from wildsight.backbones.sk_resnet import SKResNet, SKResNetParams
from wildsight.backbones.vgg import VGG, VGGParams

__all__ = [
    "BACKBONES",
    "Backbone",
    "Complexity",
    "Cx",
    "RegNet",
    "RegNetParams",
    "ResNet",
    "ResNetParams",
    "RevNet",
    "RevNetParams",
    "SKResNet",
    "SKResNetParams",
    "VGG",
    "VGGParams",
    "build_backbone",
    "classifier_complexity",
    "count_flops",
    "count_params",
    "describe_backbones",
    "generate_regnet",
]
