"""Selective-kernel ResNet, the big encoders of SimCLR v2 (Chen et al., 2020, "Big Self-Supervised
Models are Strong Semi-Supervised Learners"), built as google-research/simclr `tf2/resnet.py`
builds them with `sk_ratio > 0`.

Three things change with respect to a ResNet v1 bottleneck net:
- the 3x3 conv of every bottleneck is a selective-kernel conv (Li et al., 2019, SKNet) with two
  3x3 branches computed as ONE conv to 2w channels (SimCLR v2's variant: both branches 3x3, no
  dilated 5x5), BN, ReLU; the two branches are mixed per channel by a softmax attention computed
  from their pooled sum (1x1 conv w -> max(w * sk_ratio, 32), BN, ReLU, 1x1 conv -> 2w);
- ResNet-D (He et al., 2019, "Bag of Tricks") projection shortcuts: 2x2 average pool with the
  block's stride, then 1x1 conv stride 1, BN;
- ResNet-C stem: 3x3/2 conv to 32w, 3x3 conv to 32w, 3x3 conv to 64w (BN, ReLU after each),
  3x3/2 max-pool.

Width multiplier w (SimCLR's 1x, 2x, 3x): bottleneck widths 64w * 2^i, stage outputs 256w * 2^i,
pre-logits 2048w (w = k/4 in ResNet's widening factor). sk_ratio = 0.0625 is the value the
SimCLR code recommends for SK. SimCLR v2's Table 1 (also the README of google-research/simclr)
counts every variable of the base network, BatchNorm moving averages included: our parameters
plus BN running mean/var, rounded to millions, equal all its SK rows (R50 1x 35M ... R152 3x 795M;
trainable parameters alone: 35.2M ... 794.7M).
Every block's last BN starts at gamma = 0 as in that code (`zero_init_residual=True`). The small
stem (28-64 px images) is SimCLR's `cifar_stem`: one 3x3/1 conv to 64w, BN, ReLU, no max-pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.backbones.complexity import Complexity, Cx
from wildsight.backbones.layers import Backbone, conv2d, init_weights, norm2d, zero_init_final_bn

LAYOUTS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
SK_MIN_DIM = 32  # SimCLR SK_Conv2D min_dim: the attention's hidden width is at least 32


@dataclass(frozen=True)
class SKResNetParams:
    """Depth (50/101/152), width multiplier (1x, 2x, 3x, ...) and SK attention ratio."""

    depth: int
    width: int = 1
    sk_ratio: float = 0.0625

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"SK-ResNet depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        if self.width < 1:
            raise ValueError(f"SK-ResNet width multiplier must be >= 1, got {self.width}")
        if not 0 < self.sk_ratio <= 1:
            raise ValueError(
                f"SK-ResNet sk_ratio must be in (0, 1], got {self.sk_ratio}; for no SK use a "
                f"ResNet ('resnet:depth={self.depth},k={4 * self.width}')"
            )


# One line per SK model of SimCLR v2's Table 1.
PRESETS: dict[str, SKResNetParams] = {
    "sk_resnet50": SKResNetParams(50),
    "sk_resnet50_2x": SKResNetParams(50, width=2),
    "sk_resnet101": SKResNetParams(101),
    "sk_resnet101_2x": SKResNetParams(101, width=2),
    "sk_resnet152": SKResNetParams(152),
    "sk_resnet152_2x": SKResNetParams(152, width=2),
    "sk_resnet152_3x": SKResNetParams(152, width=3),
}


def sk_hidden_width(w: int, sk_ratio: float) -> int:
    """Hidden width of the SK attention: max(int(w * sk_ratio), 32) (SimCLR SK_Conv2D)."""
    return max(int(w * sk_ratio), SK_MIN_DIM)


class SKConv(nn.Module):
    """SK conv: 3x3 stride s to 2w, BN, ReLU -> branches (b_1, b_2); out = sum_i a_i * b_i.

    a = softmax over i of fc2(relu(BN(fc1(mean_hw(b_1 + b_2))))), per channel: [B, 2, w, 1, 1].
    """

    def __init__(self, w: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        w_mid = sk_hidden_width(w, sk_ratio)
        self.conv = conv2d(w, 2 * w, 3, stride=stride)
        self.bn = norm2d(2 * w)
        self.fc1 = conv2d(w, w_mid, 1)
        self.fc1_bn = norm2d(w_mid)
        self.fc2 = conv2d(w_mid, 2 * w, 1)

    def forward(self, x: Tensor) -> Tensor:
        b = F.relu(self.bn(self.conv(x)))  # [B, 2w, H, W]
        b = b.unflatten(1, (2, -1))  # [B, 2, w, H, W]: the two branches
        s = b.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # [B, w, 1, 1]
        z = F.relu(self.fc1_bn(self.fc1(s)))  # [B, w_mid, 1, 1]
        a = self.fc2(z).unflatten(1, (2, -1)).softmax(dim=1)  # [B, 2, w, 1, 1], sums to 1 over i
        return (a * b).sum(dim=1)  # [B, w, H, W]


class AvgPoolShortcut(nn.Module):
    """ResNet-D shortcut: 2x2 avg pool (stride s), 1x1 conv, BN, with SimCLR's TF padding.

    Stride 2: zero-pad right/bottom by 1, then 2x2 'VALID' pooling (the padding counts in the
    mean; at even sides it is never read). Stride 1 (first block of stage 1): 2x2 pooling with TF
    'SAME' padding, where the last row/column average only the pixels they cover.
    """

    def __init__(self, w_in: int, w_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = conv2d(w_in, w_out, 1)
        self.bn = norm2d(w_out)

    def forward(self, x: Tensor) -> Tensor:
        padded = F.pad(x, (0, 1, 0, 1))
        if self.stride == 1:
            sums = F.avg_pool2d(padded, 2, stride=1, divisor_override=1)  # [B, C, H, W]
            ones = torch.ones_like(x[:1, :1])
            counts = F.avg_pool2d(F.pad(ones, (0, 1, 0, 1)), 2, stride=1, divisor_override=1)
            x = sums / counts
        else:
            x = F.avg_pool2d(padded, 2, stride=self.stride)
        out: Tensor = self.bn(self.conv(x))
        return out


class SKBottleneck(nn.Module):
    """SK bottleneck: relu(shortcut(x) + BN(1x1(SK(relu(BN(1x1(x))))))), stride in the SK conv."""

    def __init__(self, w_in: int, w_b: int, stride: int, sk_ratio: float, project: bool) -> None:
        super().__init__()
        w_out = 4 * w_b
        self.conv1 = conv2d(w_in, w_b, 1)
        self.bn1 = norm2d(w_b)
        self.sk = SKConv(w_b, stride, sk_ratio)
        self.conv3 = conv2d(w_b, w_out, 1)
        self.bn3 = norm2d(w_out)
        self.bn3.final_bn = True  # type: ignore[assignment]
        self.downsample = AvgPoolShortcut(w_in, w_out, stride) if project else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut: Tensor = x if self.downsample is None else self.downsample(x)
        out = self.sk(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(out)) + shortcut
        return F.relu(out)


class SKResNet(Backbone):
    """SK-ResNet trunk: ResNet-C stem, 4 stages of SK bottlenecks (strides 1, 2, 2, 2), avg pool.

    `stem="imagenet"`: three 3x3 convs (stride 2, 1, 1) and a 3x3/2 max-pool (56 px at 224).
    `stem="small"` (28-64 px images): one 3x3/1 conv, BN, ReLU (SimCLR cifar_stem), no max-pool.
    """

    family = "sk_resnet"

    def __init__(
        self, params: SKResNetParams, *, stem: str = "imagenet", zero_init_residual: bool = True
    ) -> None:
        if stem not in ("imagenet", "small"):
            raise ValueError(f"SK-ResNet stem must be 'imagenet' or 'small', got {stem!r}")
        w = params.width
        widths = [256 * w * 2**i for i in range(4)]
        super().__init__(widths)
        self.params = params
        self.stem_type = stem
        if stem == "small":
            self.stem = nn.Sequential(conv2d(3, 64 * w, 3), norm2d(64 * w), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                conv2d(3, 32 * w, 3, stride=2), norm2d(32 * w), nn.ReLU(inplace=True),
                conv2d(32 * w, 32 * w, 3), norm2d(32 * w), nn.ReLU(inplace=True),
                conv2d(32 * w, 64 * w, 3), norm2d(64 * w), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )  # fmt: skip
        w_in = 64 * w
        for i, (w_out, depth) in enumerate(zip(widths, LAYOUTS[params.depth], strict=True)):
            blocks = [
                SKBottleneck(
                    w_in if j == 0 else w_out,
                    w_out // 4,
                    2 if i > 0 and j == 0 else 1,
                    params.sk_ratio,
                    project=j == 0,  # SimCLR projects in every stage's first block
                )
                for j in range(depth)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            w_in = w_out
        self.apply(init_weights)
        if zero_init_residual:
            zero_init_final_bn(self)

    def stem_forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.stem(x)  # [B, 64w, H/4, W/4] ([B, 64w, H, W] small stem)
        return out

    def stage_modules(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(4)]

    def complexity(self, image_size: int = 224) -> Complexity:
        """Analytic params and MACs, no classifier."""
        return sk_resnet_complexity(self.params, self.stem_type, image_size)


def sk_resnet_complexity(
    params: SKResNetParams, stem: str = "imagenet", image_size: int = 224
) -> Complexity:
    """Params and MACs of `SKResNet(params, stem=stem)` without classifier, walking it with `Cx`."""
    w = params.width
    cx = Cx(image_size, image_size)
    if stem == "small":
        cx.conv(3, 64 * w, 3).norm(64 * w)
    else:
        cx.conv(3, 32 * w, 3, stride=2).norm(32 * w).conv(32 * w, 32 * w, 3).norm(32 * w)
        cx.conv(32 * w, 64 * w, 3).norm(64 * w).pool(stride=2)
    w_in = 64 * w
    for i, depth in enumerate(LAYOUTS[params.depth]):
        w_b = 64 * w * 2**i
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if j == 0:  # ResNet-D projection: avg pool (free), 1x1 conv, BN; a parallel branch
                h, w_ = cx.h, cx.w
                cx.pool(stride).conv(w_in, 4 * w_b, 1).norm(4 * w_b)
                cx.h, cx.w = h, w_
            cx.conv(w_in, w_b, 1).norm(w_b)
            cx.conv(w_b, 2 * w_b, 3, stride=stride).norm(2 * w_b)  # both SK branches
            h, w_ = cx.h, cx.w
            w_mid = sk_hidden_width(w_b, params.sk_ratio)
            cx.h = cx.w = 1  # the attention acts on pooled [w_b, 1, 1] features
            cx.conv(w_b, w_mid, 1).norm(w_mid).conv(w_mid, 2 * w_b, 1)
            cx.h, cx.w = h, w_
            cx.conv(w_b, 4 * w_b, 1).norm(4 * w_b)
            w_in = 4 * w_b
    return cx.result()
