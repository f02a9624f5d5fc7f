"""RegNet (Radosavovic et al., 2020, "Designing Network Design Spaces"), as pycls builds it.

A RegNet is generated from 6 numbers: depth d, initial width w0, slope wa, width multiplier
wm, group width g and bottleneck multiplier b (RegNetY adds squeeze-and-excitation, ratio
0.25). Per-block widths u_j = w0 + wa * j are quantised to w0 * wm^round(log(u_j / w0) /
log(wm)), rounded to a multiple of 8 and made compatible with g and b; equal consecutive
widths form a stage. Module names follow pycls (stem.conv, s1.b1.f.a, ...), head excluded.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn

from wildsight.backbones.complexity import Complexity, Cx
from wildsight.backbones.layers import (
    SE,
    Backbone,
    conv2d,
    init_weights,
    norm2d,
    zero_init_final_bn,
)


@dataclass(frozen=True)
class RegNetParams:
    """The 6 RegNet numbers (paper Sec. 3.3) plus the SE ratio (0 -> RegNetX, 0.25 -> RegNetY)."""

    depth: int
    w0: int
    wa: float
    wm: float
    group_width: int
    bottleneck: float = 1.0
    se_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"RegNet depth must be >= 1, got {self.depth}")
        if self.w0 <= 0 or self.w0 % 8:
            raise ValueError(f"RegNet w0 must be a positive multiple of 8, got {self.w0}")
        if self.wa < 0:
            raise ValueError(f"RegNet wa must be >= 0, got {self.wa}")
        if self.wm <= 1:
            raise ValueError(f"RegNet wm must be > 1, got {self.wm}")
        if self.group_width < 1:
            raise ValueError(f"RegNet group_width must be >= 1, got {self.group_width}")
        if self.bottleneck <= 0:
            raise ValueError(f"RegNet bottleneck must be > 0, got {self.bottleneck}")
        if not 0 <= self.se_ratio < 1:
            raise ValueError(f"RegNet se_ratio must be in [0, 1), got {self.se_ratio}")


_Y = 0.25  # RegNetY: SE ratio relative to the block input width

# One line per published variant: RegNetParams(depth, w0, wa, wm, group_width, ...).
# pycls configs/dds_baselines/regnet{x,y}/*.yaml (MODEL_ZOO.md); the 64/128/256GF SEER models from
# VISSL configs (regnet64Gf.yaml, regnet128Gf.yaml, regnet256Gf_1.yaml; Goyal et al., 2021).
PRESETS: dict[str, RegNetParams] = {
    "regnetx_200mf": RegNetParams(13, 24, 36.44, 2.49, 8),
    "regnetx_400mf": RegNetParams(22, 24, 24.48, 2.54, 16),
    "regnetx_600mf": RegNetParams(16, 48, 36.97, 2.24, 24),
    "regnetx_800mf": RegNetParams(16, 56, 35.73, 2.28, 16),
    "regnetx_1.6gf": RegNetParams(18, 80, 34.01, 2.25, 24),
    "regnetx_3.2gf": RegNetParams(25, 88, 26.31, 2.25, 48),
    "regnetx_4.0gf": RegNetParams(23, 96, 38.65, 2.43, 40),
    "regnetx_6.4gf": RegNetParams(17, 184, 60.83, 2.07, 56),
    "regnetx_8.0gf": RegNetParams(23, 80, 49.56, 2.88, 120),
    "regnetx_12gf": RegNetParams(19, 168, 73.36, 2.37, 112),
    "regnetx_16gf": RegNetParams(22, 216, 55.59, 2.1, 128),
    "regnetx_32gf": RegNetParams(23, 320, 69.86, 2.0, 168),
    "regnety_200mf": RegNetParams(13, 24, 36.44, 2.49, 8, se_ratio=_Y),
    "regnety_400mf": RegNetParams(16, 48, 27.89, 2.09, 8, se_ratio=_Y),
    "regnety_600mf": RegNetParams(15, 48, 32.54, 2.32, 16, se_ratio=_Y),
    "regnety_800mf": RegNetParams(14, 56, 38.84, 2.4, 16, se_ratio=_Y),
    "regnety_1.6gf": RegNetParams(27, 48, 20.71, 2.65, 24, se_ratio=_Y),
    "regnety_3.2gf": RegNetParams(21, 80, 42.63, 2.66, 24, se_ratio=_Y),
    "regnety_4.0gf": RegNetParams(22, 96, 31.41, 2.24, 64, se_ratio=_Y),
    "regnety_6.4gf": RegNetParams(25, 112, 33.22, 2.27, 72, se_ratio=_Y),
    "regnety_8.0gf": RegNetParams(17, 192, 76.82, 2.19, 56, se_ratio=_Y),
    "regnety_12gf": RegNetParams(19, 168, 73.36, 2.37, 112, se_ratio=_Y),
    "regnety_16gf": RegNetParams(18, 200, 106.23, 2.48, 112, se_ratio=_Y),
    "regnety_32gf": RegNetParams(20, 232, 115.89, 2.53, 232, se_ratio=_Y),
    "regnety_64gf": RegNetParams(20, 352, 147.48, 2.4, 328, se_ratio=_Y),
    "regnety_128gf": RegNetParams(27, 456, 160.83, 2.52, 264, se_ratio=_Y),
    "regnety_256gf": RegNetParams(27, 640, 230.83, 2.53, 373, se_ratio=_Y),
}


def generate_regnet(
    params: RegNetParams, q: int = 8
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per-stage (widths, depths, group_widths) from the 6 numbers, exactly as pycls.

    u_j = w0 + wa * j (j < d),  s_j = round(log(u_j / w0) / log(wm)),
    w_j = q * round(w0 * wm^s_j / q).
    Equal consecutive w_j form a stage. Then (pycls adjust_block_compatibility) each stage's
    bottleneck width v = w * b gets group width g' = min(g, v) and is rounded to a multiple of
    lcm(g', b) (of g' when b <= 1), and w = v / b.
    """
    widths: list[int] = []
    depths: list[int] = []
    for j in range(params.depth):
        u = params.w0 + params.wa * j
        s = round(math.log(u / params.w0) / math.log(params.wm))
        w = int(round(params.w0 * params.wm**s / q)) * q
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    b = params.bottleneck
    out_widths, group_widths = [], []
    for w in widths:
        v = int(max(1, w * b))  # bottleneck width
        g = int(min(params.group_width, v))
        m = math.lcm(g, int(b)) if b > 1 else g
        v = max(m, int(round(v / m) * m))
        out_widths.append(int(v / b))
        group_widths.append(g)
    return tuple(out_widths), tuple(depths), tuple(group_widths)


class SimpleStem(nn.Sequential):
    """Stem: 3x3 conv stride 2 (stride 1 for 28-64 px images), BN, ReLU."""

    def __init__(self, w_in: int, w_out: int, stride: int) -> None:
        super().__init__(
            OrderedDict(
                conv=conv2d(w_in, w_out, 3, stride=stride),
                bn=norm2d(w_out),
                relu=nn.ReLU(inplace=True),
            )
        )


class BottleneckTransform(nn.Sequential):
    """Bottleneck: 1x1, 3x3 grouped [+SE], 1x1 (BN after each conv, ReLU after the first two).

    w_b = round(w_out * b) channels in the middle, w_b / group_width groups; the SE width is
    round(se_ratio * w_in), relative to the block INPUT width as in pycls.
    """

    def __init__(
        self,
        w_in: int,
        w_out: int,
        stride: int,
        bottleneck: float,
        group_width: int,
        se_ratio: float,
    ) -> None:
        w_b = int(round(w_out * bottleneck))
        groups = w_b // group_width
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv2d(w_in, w_b, 1),
            a_bn=norm2d(w_b),
            a_relu=nn.ReLU(inplace=True),
            b=conv2d(w_b, w_b, 3, stride=stride, groups=groups),
            b_bn=norm2d(w_b),
            b_relu=nn.ReLU(inplace=True),
        )
        if se_ratio > 0:
            layers["se"] = SE(w_b, int(round(w_in * se_ratio)))
        layers["c"] = conv2d(w_b, w_out, 1)
        layers["c_bn"] = norm2d(w_out)
        layers["c_bn"].final_bn = True  # type: ignore[assignment]
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """Residual bottleneck: relu(proj(x) + F(x)), F = 1x1, 3x3 grouped [+SE], 1x1.

    proj = 1x1 conv + BN when the width or the stride changes, else the identity.
    """

    def __init__(
        self,
        w_in: int,
        w_out: int,
        stride: int,
        bottleneck: float,
        group_width: int,
        se_ratio: float,
    ) -> None:
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = conv2d(w_in, w_out, 1, stride=stride)
            self.bn = norm2d(w_out)
        self.f = BottleneckTransform(w_in, w_out, stride, bottleneck, group_width, se_ratio)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.bn(self.proj(x)) if self.proj_block else x  # [B, w_out, H/s, W/s]
        out: Tensor = self.relu(shortcut + self.f(x))
        return out


def _stage(
    w_in: int,
    w_out: int,
    stride: int,
    depth: int,
    bottleneck: float,
    group_width: int,
    se_ratio: float,
) -> nn.Sequential:
    """A stage: `depth` blocks of width w_out; the first one strides and changes width."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        (
            f"b{i + 1}",
            ResBottleneckBlock(
                w_in if i == 0 else w_out,
                w_out,
                stride if i == 0 else 1,
                bottleneck,
                group_width,
                se_ratio,
            ),
        )
        for i in range(depth)
    )
    return nn.Sequential(blocks)


class RegNet(Backbone):
    """RegNet trunk: stem (3x3, 32 ch), stages of residual bottlenecks (stride 2 each), avg pool.

    `stem="simple"` is the published ImageNet stem (stride 2); `stem="small"` uses stride 1 for
    28-64 px images, so a 32 px input still ends on a 2x2 map. `zero_init_residual` zeroes the
    last BN gamma of every block (off by default, as in pycls).
    """

    family = "regnet"

    def __init__(
        self,
        params: RegNetParams,
        *,
        stem: str = "simple",
        stem_width: int = 32,
        zero_init_residual: bool = False,
    ) -> None:
        if stem not in ("simple", "small"):
            raise ValueError(f"RegNet stem must be 'simple' or 'small', got {stem!r}")
        widths, depths, group_widths = generate_regnet(params)
        super().__init__(widths)
        self.params = params
        self.stem_stride = 2 if stem == "simple" else 1
        self.stem_width = stem_width
        self.stem = SimpleStem(3, stem_width, stride=self.stem_stride)
        self.stage_names: tuple[str, ...] = tuple(f"s{i + 1}" for i in range(len(widths)))
        w_in = stem_width
        for name, w, d, g in zip(self.stage_names, widths, depths, group_widths, strict=True):
            self.add_module(name, _stage(w_in, w, 2, d, params.bottleneck, g, params.se_ratio))
            w_in = w
        self.apply(init_weights)
        if zero_init_residual:
            zero_init_final_bn(self)

    def stem_forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.stem(x)  # [B, 32, H/2, W/2] ([B, 32, H, W] for the small stem)
        return out

    def stage_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def complexity(self, image_size: int = 224) -> Complexity:
        """Analytic params and MACs, no classifier (pycls AnyNet.complexity)."""
        return regnet_complexity(self.params, self.stem_stride, self.stem_width, image_size)


def regnet_complexity(
    params: RegNetParams, stem_stride: int = 2, stem_width: int = 32, image_size: int = 224
) -> Complexity:
    """Params and MACs of `RegNet(params)` without classifier, walking the same layers with `Cx`."""
    widths, depths, group_widths = generate_regnet(params)
    cx = Cx(image_size, image_size).conv(3, stem_width, 3, stride=stem_stride).norm(stem_width)
    w_in = stem_width
    for w_out, depth, group_width in zip(widths, depths, group_widths, strict=True):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            if w_in != w_out or stride != 1:  # projection shortcut, a parallel branch
                h, w = cx.h, cx.w
                cx.conv(w_in, w_out, 1, stride=stride).norm(w_out)
                cx.h, cx.w = h, w
            w_b = int(round(w_out * params.bottleneck))
            cx.conv(w_in, w_b, 1).norm(w_b)
            cx.conv(w_b, w_b, 3, stride=stride, groups=w_b // group_width).norm(w_b)
            if params.se_ratio > 0:
                cx.se(w_b, int(round(w_in * params.se_ratio)))
            cx.conv(w_b, w_out, 1).norm(w_out)
            w_in = w_out
    return cx.result()
