"""VGG with BatchNorm (Simonyan & Zisserman, 2015; Ioffe & Szegedy, 2015) and widening factor k.

Layout and module names are torchvision's `vgg{11,13,16,19}_bn`: `features` holds [3x3 conv with
bias, BN, ReLU] x n and 2x2 max-pools; `classifier.0` is fc6 (7*7*C -> 4096) and `classifier.3` is
fc7 (4096 -> 4096), both Linear with bias + ReLU; the 1000-way `classifier.6` is left out. So a
torchvision state dict without `classifier.6.*` loads with strict=True.

Pre-logits (`feature_dim`) are the fc7 output, as "Revisiting Self-Supervised Visual
Representation Learning" (Kolesnikov et al., 2019) defines them for VGG: the backbone is
everything up to the classifier's last linear layer, so backbone + a 1000-way linear head is
exactly torchvision's vgg19_bn (143,678,248 parameters, 19.63 GMACs at 224 px). torchvision's
two Dropout(0.5) layers are left out: Revisiting drops them too ("because we use BatchNorm"), they
carry no parameters, and a backbone here has no randomness in forward.

Width k (Revisiting's `filters_factor`): conv widths 8k, 16k, 32k, 64k, 64k and fc widths 512k;
k = 8 is the usual VGG (64 ... 512 channels, 4096-wide fc layers).

Stages (the taps of `forward_stages`): the five conv blocks, each starting with the max-pool that
precedes it (so a tap is the block output before pooling, Revisiting's `block1..5`), then fc6
and fc7 as [B, 4096, 1, 1] maps. With `small_input=True` (28-64 px images) the pools before
blocks 2 and 3 are dropped (total stride 8 as with ResNet's small stem: at 32 px block 5 runs at
8x8, pool 5 leaves 4x4) and fc6 reads the global average of that map (C -> 512k) instead of a
7x7 map.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from wildsight.backbones.complexity import Complexity, Cx
from wildsight.backbones.layers import Backbone, conv2d, init_weights, norm2d

# depth -> convs per block (torchvision cfgs "A", "B", "D", "E")
LAYOUTS: dict[int, tuple[int, int, int, int, int]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}


@dataclass(frozen=True)
class VGGParams:
    """Depth (11/13/16/19) and widening factor k (8 -> 64 channels first, 4096-wide fc)."""

    depth: int = 19
    k: int = 8

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        if self.k < 1:
            raise ValueError(f"VGG widening factor k must be >= 1, got {self.k}")

    def block_widths(self) -> tuple[int, ...]:
        return tuple(8 * self.k * m for m in (1, 2, 4, 8, 8))


# One line per variant: the usual VGG19-BN (k = 8), and half / double width.
PRESETS: dict[str, VGGParams] = {
    "vgg19_bn": VGGParams(19),
    "vgg19_bn_k4": VGGParams(19, k=4),
    "vgg19_bn_k16": VGGParams(19, k=16),
}


class FullyConnected(nn.Module):
    """fc6/fc7 on a map: [max-pool, avg-pool to s x s,] flatten, Linear, ReLU -> [B, C, 1, 1].

    fc6 gets torchvision's last max-pool (features[-1]) and AdaptiveAvgPool2d(7) (the identity at
    224 px; 1, a global average, for the small-input fc6); fc7 gets neither.
    """

    def __init__(self, linear: nn.Linear, max_pool: nn.Module | None, side: int | None) -> None:
        super().__init__()
        self.max_pool = max_pool if max_pool is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(side) if side else nn.Identity()
        self.linear = linear
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.max_pool(x)).flatten(1)  # [B, C * s * s]
        out: Tensor = self.relu(self.linear(x))  # [B, C_out]
        return out[:, :, None, None]


def _pool_kept(i: int, small_input: bool) -> bool:
    """Is the i-th 2x2 max-pool (i = 1..5, before block i+1 / fc6) kept? Small input drops 1, 2."""
    return not (small_input and i in (1, 2))


class VGG(Backbone):
    """VGG-BN trunk: 5 blocks of [3x3 conv, BN, ReLU] separated by max-pools, fc6, fc7."""

    family = "vgg"

    def __init__(self, params: VGGParams, *, small_input: bool = False) -> None:
        widths = params.block_widths()
        w_fc = 512 * params.k
        super().__init__((*widths, w_fc, w_fc))
        self.params = params
        self.small_input = small_input
        layers: list[nn.Module] = []
        starts = []  # index in `features` where each block (with the pool before it) starts
        w_in = 3
        for i, (w, n) in enumerate(zip(widths, LAYOUTS[params.depth], strict=True)):
            starts.append(len(layers))
            if i > 0:  # nn.Identity keeps torchvision's indices where a pool is dropped
                layers.append(
                    nn.MaxPool2d(2, stride=2) if _pool_kept(i, small_input) else nn.Identity()
                )
            for _ in range(n):
                layers += [conv2d(w_in, w, 3, bias=True), norm2d(w), nn.ReLU(inplace=True)]
                w_in = w
        layers.append(nn.MaxPool2d(2, stride=2))  # pool 5, applied by the fc6 stage
        self.features = nn.Sequential(*layers)
        side = 1 if small_input else 7
        fc6 = nn.Linear(w_in * side * side, w_fc)
        fc7 = nn.Linear(w_fc, w_fc)
        # Registers fc6/fc7 under torchvision's indices (0 fc6, 1 ReLU, 2 Dropout, 3 fc7, ...,
        # 6 logits); never called as a whole: the two FullyConnected stages below run them.
        self.classifier = nn.Sequential(fc6, nn.Identity(), nn.Identity(), fc7)
        ends = [*starts[1:], len(layers) - 1]
        # Plain-list views over the registered modules: no duplicate state_dict keys.
        self._stages: list[nn.Module] = [
            *(self.features[a:b] for a, b in zip(starts, ends, strict=True)),
            FullyConnected(fc6, self.features[-1], side),
            FullyConnected(fc7, None, None),
        ]
        self.apply(init_weights)
        for m in self.modules():  # torchvision: conv biases start at 0
            if isinstance(m, nn.Conv2d) and m.bias is not None and not m.bias.is_meta:
                nn.init.zeros_(m.bias)

    def stem_forward(self, x: Tensor) -> Tensor:
        return x  # the first block starts on the image

    def stage_modules(self) -> list[nn.Module]:
        return self._stages

    def complexity(self, image_size: int = 224) -> Complexity:
        """Analytic params and MACs, no classifier (fc6 and fc7 included)."""
        return vgg_complexity(self.params, self.small_input, image_size)


def vgg_complexity(
    params: VGGParams, small_input: bool = False, image_size: int = 224
) -> Complexity:
    """Params and MACs of `VGG(params, small_input=...)` up to fc7, walking it with `Cx`."""
    cx = Cx(image_size, image_size)
    w_in = 3
    for i, (w, n) in enumerate(zip(params.block_widths(), LAYOUTS[params.depth], strict=True)):
        if i > 0 and _pool_kept(i, small_input):
            cx.h, cx.w = cx.h // 2, cx.w // 2  # 2x2 max-pool stride 2, floor
        for _ in range(n):
            cx.conv(w_in, w, 3, bias=True).norm(w)
            w_in = w
    side = 1 if small_input else 7
    w_fc = 512 * params.k
    cx.h = cx.w = 1  # a Linear layer counts as a 1x1 conv on a 1x1 map
    cx.conv(w_in * side * side, w_fc, 1, bias=True).conv(w_fc, w_fc, 1, bias=True)
    return cx.result()
