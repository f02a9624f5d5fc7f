"""ResNet v1 and v2 with widening factor k (He et al., 2015 and 2016; Kolesnikov et al., 2019).

v1 is the torchvision layout (stride on the 3x3 conv, "v1.5"), with torchvision's module names
(conv1, bn1, layer1.0.conv1, ..., fc excluded), so a torchvision state dict without `fc.*`
loads into `resnet50` with strict=True. v2 is the pre-activation ResNet of "Identity Mappings in
Deep Residual Networks" as "Revisiting Self-Supervised Visual Representation Learning" builds
it: no BN/ReLU after the stem conv, shortcut projections from the pre-activated input, and a
final BN [+ ReLU] before pooling. Widening factor k (Revisiting): the stem has 16k channels,
stage i has bottleneck width 16k * 2^i, pre-logits are 512k (bottleneck) or 128k (basic);
k = 4 is the usual ResNet. The "(-)" variant drops the ReLU before global pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from wildsight.backbones.complexity import Complexity, Cx
from wildsight.backbones.layers import (
    Backbone,
    Conv2d,
    conv2d,
    init_weights,
    norm2d,
    zero_init_final_bn,
)

# depth -> (block kind, blocks per stage)
LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


@dataclass(frozen=True)
class ResNetParams:
    """Depth (18/34/50/101/152), width k, version 1 (post-act) or 2 (pre-act), final ReLU."""

    depth: int
    k: int = 4
    version: int = 1
    final_relu: bool = True

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        if self.k < 1:
            raise ValueError(f"ResNet widening factor k must be >= 1, got {self.k}")
        if self.version not in (1, 2):
            raise ValueError(f"ResNet version must be 1 or 2, got {self.version}")


# One line per published variant: torchvision's ResNets (v1, k = 4), and Revisiting's ResNet50 v1/v2
# with k in {8, 12, 16} and the (-) variant (v2 without the ReLU before pooling).
PRESETS: dict[str, ResNetParams] = {
    "resnet18": ResNetParams(18),
    "resnet34": ResNetParams(34),
    "resnet50": ResNetParams(50),
    "resnet101": ResNetParams(101),
    "resnet152": ResNetParams(152),
    "resnet50_k8": ResNetParams(50, k=8),
    "resnet50_k12": ResNetParams(50, k=12),
    "resnet50_k16": ResNetParams(50, k=16),
    "resnet50v2": ResNetParams(50, version=2),
    "resnet50v2_minus": ResNetParams(50, version=2, final_relu=False),
    "resnet50v2_k8": ResNetParams(50, k=8, version=2),
    "resnet50v2_k12": ResNetParams(50, k=12, version=2),
    "resnet50v2_k16": ResNetParams(50, k=16, version=2),
}


class _Shortcut(nn.Sequential):
    """Projection shortcut: 1x1 conv with stride [+ BN in v1]."""

    def __init__(self, w_in: int, w_out: int, stride: int, bn: bool) -> None:
        layers: list[nn.Module] = [conv2d(w_in, w_out, 1, stride=stride)]
        if bn:
            layers.append(norm2d(w_out))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """Basic v1: relu(shortcut(x) + BN(3x3(relu(BN(3x3 stride s(x)))))) [final relu optional]."""

    def __init__(self, w_in: int, w_out: int, stride: int, final_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = conv2d(w_in, w_out, 3, stride=stride)
        self.bn1 = norm2d(w_out)
        self.conv2 = conv2d(w_out, w_out, 3)
        self.bn2 = norm2d(w_out)
        self.bn2.final_bn = True  # type: ignore[assignment]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            _Shortcut(w_in, w_out, stride, bn=True) if stride != 1 or w_in != w_out else None
        )
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        shortcut: Tensor = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + shortcut
        if self.final_relu:
            out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """Bottleneck v1: 1x1, 3x3 stride s, 1x1 (x4 channels), BN after each, relu(shortcut + F)."""

    def __init__(self, w_in: int, w_out: int, stride: int, final_relu: bool = True) -> None:
        super().__init__()
        w_b = w_out // 4
        self.conv1 = conv2d(w_in, w_b, 1)
        self.bn1 = norm2d(w_b)
        self.conv2 = conv2d(w_b, w_b, 3, stride=stride)
        self.bn2 = norm2d(w_b)
        self.conv3 = conv2d(w_b, w_out, 1)
        self.bn3 = norm2d(w_out)
        self.bn3.final_bn = True  # type: ignore[assignment]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            _Shortcut(w_in, w_out, stride, bn=True) if stride != 1 or w_in != w_out else None
        )
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        shortcut: Tensor = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + shortcut
        if self.final_relu:
            out = self.relu(out)
        return out


class PreActBasicBlock(nn.Module):
    """Basic v2: x' = relu(BN(x)); sc + 3x3(relu(BN(3x3 stride s(x')))); sc = x or 1x1(x')."""

    def __init__(self, w_in: int, w_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = norm2d(w_in)
        self.conv1 = conv2d(w_in, w_out, 3, stride=stride)
        self.bn2 = norm2d(w_out)
        self.conv2 = conv2d(w_out, w_out, 3)
        self.relu = nn.ReLU(inplace=False)  # x is needed for the identity shortcut
        self.downsample = (
            _Shortcut(w_in, w_out, stride, bn=False) if stride != 1 or w_in != w_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        shortcut: Tensor = x if self.downsample is None else self.downsample(pre)
        out: Tensor = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Bottleneck v2: x' = relu(BN(x)); shortcut(x') + 1x1(relu(BN(3x3 s(relu(BN(1x1(x')))))))."""

    def __init__(self, w_in: int, w_out: int, stride: int) -> None:
        super().__init__()
        w_b = w_out // 4
        self.bn1 = norm2d(w_in)
        self.conv1 = conv2d(w_in, w_b, 1)
        self.bn2 = norm2d(w_b)
        self.conv2 = conv2d(w_b, w_b, 3, stride=stride)
        self.bn3 = norm2d(w_b)
        self.conv3 = conv2d(w_b, w_out, 1)
        self.relu = nn.ReLU(inplace=False)  # x is needed for the identity shortcut
        self.downsample = (
            _Shortcut(w_in, w_out, stride, bn=False) if stride != 1 or w_in != w_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        shortcut: Tensor = x if self.downsample is None else self.downsample(pre)
        out: Tensor = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class ResNet(Backbone):
    """ResNet trunk: stem, 4 stages (strides 1, 2, 2, 2), [final BN [+ReLU] in v2], avg pool.

    `stem="imagenet"`: 7x7 conv stride 2 [+ BN, ReLU in v1], 3x3 max-pool stride 2.
    `stem="small"` (28-64 px images): 3x3 conv stride 1 [+ BN, ReLU in v1], no max-pool, so a
    32 px input ends on a 4x4 map. `zero_init_residual` (v1 only) zeroes the last BN gamma of
    every block (off by default, as in torchvision and pycls).
    """

    family = "resnet"

    def __init__(
        self, params: ResNetParams, *, stem: str = "imagenet", zero_init_residual: bool = False
    ) -> None:
        if stem not in ("imagenet", "small"):
            raise ValueError(f"ResNet stem must be 'imagenet' or 'small', got {stem!r}")
        if zero_init_residual and params.version == 2:
            raise ValueError(
                "zero_init_residual needs a BN closing each residual branch: ResNet v1 only"
            )
        kind, blocks = LAYOUTS[params.depth]
        expansion = 4 if kind == "bottleneck" else 1
        w_stem = 16 * params.k
        widths = [w_stem * 2**i * expansion for i in range(4)]
        super().__init__(widths)
        self.params = params
        self.stem_type = stem
        v1 = params.version == 1
        small = stem == "small"
        self.conv1 = (
            conv2d(3, w_stem, 3, stride=1)
            if small
            else Conv2d(3, w_stem, 7, stride=2, padding=3, bias=False)
        )
        self.bn1 = norm2d(w_stem) if v1 else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if v1 else nn.Identity()
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, stride=2, padding=1)
        w_in = w_stem
        for i, (w_out, depth) in enumerate(zip(widths, blocks, strict=True)):
            layer: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                is_last = i == 3 and j == depth - 1
                if v1:
                    block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
                    layer.append(
                        block_cls(w_in, w_out, stride, final_relu=params.final_relu or not is_last)
                    )
                else:
                    block_cls_v2 = PreActBottleneck if kind == "bottleneck" else PreActBasicBlock
                    layer.append(block_cls_v2(w_in, w_out, stride))
                w_in = w_out
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        if not v1:
            self.post_bn = norm2d(w_in)
            self.post_relu = nn.ReLU(inplace=True) if params.final_relu else nn.Identity()
        self.apply(init_weights)
        if zero_init_residual:
            zero_init_final_bn(self)

    def stem_forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [B, 16k, H/2, W/2] ([B, 16k, H, W] small stem)
        out: Tensor = self.maxpool(x)  # [B, 16k, H/4, W/4] ([B, 16k, H, W] small stem)
        return out

    def stage_modules(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(4)]

    def post_forward(self, x: Tensor) -> Tensor:
        if self.params.version == 1:
            return x
        out: Tensor = self.post_relu(self.post_bn(x))
        return out

    def complexity(self, image_size: int = 224) -> Complexity:
        """Analytic params and MACs, no classifier."""
        return resnet_complexity(self.params, self.stem_type, image_size)


def resnet_complexity(
    params: ResNetParams, stem: str = "imagenet", image_size: int = 224
) -> Complexity:
    """Params and MACs of `ResNet(params, stem=stem)` without classifier, walking it with `Cx`."""
    kind, blocks = LAYOUTS[params.depth]
    v1 = params.version == 1
    expansion = 4 if kind == "bottleneck" else 1
    w_in = 16 * params.k
    cx = Cx(image_size, image_size)
    if stem == "small":
        cx.conv(3, w_in, 3)
    else:
        cx.conv(3, w_in, 7, stride=2)
    if v1:
        cx.norm(w_in)
    if stem != "small":
        cx.pool(stride=2)
    for i, depth in enumerate(blocks):
        w_out = 16 * params.k * 2**i * expansion
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if not v1:
                cx.norm(w_in)  # pre-activation BN
            if w_in != w_out or stride != 1:  # projection shortcut, a parallel branch
                h, w = cx.h, cx.w
                cx.conv(w_in, w_out, 1, stride=stride)
                if v1:
                    cx.norm(w_out)
                cx.h, cx.w = h, w
            if kind == "bottleneck":
                w_b = w_out // 4
                cx.conv(w_in, w_b, 1).norm(w_b).conv(w_b, w_b, 3, stride=stride).norm(w_b)
                cx.conv(w_b, w_out, 1)
            else:
                cx.conv(w_in, w_out, 3, stride=stride).norm(w_out).conv(w_out, w_out, 3)
            if v1:
                cx.norm(w_out)
            w_in = w_out
    if not v1:
        cx.norm(w_in)  # final BN before pooling
    return cx.result()
