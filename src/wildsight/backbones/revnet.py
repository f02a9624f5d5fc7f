"""RevNet: reversible residual networks (Gomez et al., 2017) as "Revisiting Self-Supervised Visual
Representation Learning" (Kolesnikov et al., 2019) builds them.

A stage is a chain of additive couplings on the two channel halves (u, v):

    (u, v) -> (v, u + F(v))        inverse: (a, b) -> (b - F(a), a)

Two consecutive couplings are the reversible block of Gomez et al.: y1 = x1 + F(x2),
y2 = x2 + G(y1). F is a pre-activation residual function on C/2 channels (bottleneck: BN, ReLU,
1x1, BN, ReLU, 3x3, BN, ReLU, 1x1 with C/8 in the middle; basic: BN, ReLU, 3x3, BN, ReLU, 3x3),
one per block of the ResNet of the same depth (RevNet-50: 3, 4, 6, 3 couplings). Between stages a
parameter-free, non-reversible downsampling: 2x2 average pool stride 2, then zero channels padded
on both sides (C -> 2C). The stem is a 7x7/2 conv straight to the stage-1 width (no BN/ReLU: "a
random projection to more channels") and a 3x3/2 max-pool; the trunk ends with BN [+ ReLU]. Width
k as in ResNet: stage widths 64k..512k (bottleneck) or 16k..128k (basic); revnet50 at k=16 has
85.8M parameters without classifier ("RevNet-50 (4x), 86M" in SimCLR, Chen et al. 2020, Table 6).

Memory: the backward pass recomputes each coupling's input from its output inside
`_ReversibleCouplingFn`, so a stage keeps only its output for backward, whatever its depth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.backbones.complexity import Complexity, Cx
from wildsight.backbones.layers import (
    Backbone,
    Conv2d,
    _bn_stats_on_copies,
    conv2d,
    init_weights,
    norm2d,
)
from wildsight.backbones.resnet import LAYOUTS


@dataclass(frozen=True)
class RevNetParams:
    """Depth (18/34/50/101/152, the ResNet of the same depth), width k, ReLU before pooling."""

    depth: int
    k: int = 4
    final_relu: bool = True

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"RevNet depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        if self.k < 1:
            raise ValueError(f"RevNet widening factor k must be >= 1, got {self.k}")


# One line per variant: Revisiting trains RevNet-50 with k in {4, 8, 12, 16}, with and without the
# final ReLU (its configs pass --last_relu True); the other depths follow ResNet's layouts.
PRESETS: dict[str, RevNetParams] = {
    "revnet18": RevNetParams(18),
    "revnet34": RevNetParams(34),
    "revnet50": RevNetParams(50),
    "revnet101": RevNetParams(101),
    "revnet152": RevNetParams(152),
    "revnet50_k8": RevNetParams(50, k=8),
    "revnet50_k12": RevNetParams(50, k=12),
    "revnet50_k16": RevNetParams(50, k=16),
    "revnet50_minus": RevNetParams(50, final_relu=False),
}


class RevBottleneckF(nn.Module):
    """F of a bottleneck coupling, pre-activation, no shortcut: w -> w (w/4 in the middle)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        w_b = w // 4
        self.bn1, self.conv1 = norm2d(w), conv2d(w, w_b, 1)
        self.bn2, self.conv2 = norm2d(w_b), conv2d(w_b, w_b, 3)
        self.bn3, self.conv3 = norm2d(w_b), conv2d(w_b, w, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(F.relu(self.bn1(x)))
        x = self.conv2(F.relu(self.bn2(x)))
        out: Tensor = self.conv3(F.relu(self.bn3(x)))
        return out


class RevBasicF(nn.Module):
    """F of a basic coupling, pre-activation, no shortcut: BN, ReLU, 3x3, BN, ReLU, 3x3 (w -> w)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = norm2d(w), conv2d(w, w, 3)
        self.bn2, self.conv2 = norm2d(w), conv2d(w, w, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(F.relu(self.bn1(x)))
        out: Tensor = self.conv2(F.relu(self.bn2(x)))
        return out


def couple(fs: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Apply the couplings (u, v) -> (v, u + F_i(v)) in order: [B, C, H, W] -> [B, C, H, W].

    Each coupling splits and concatenates, exactly as the reversible path does one coupling per
    autograd node, so both paths run the same ops in the same memory layout (bitwise equal).
    """
    for f in fs:
        u, v = x.chunk(2, dim=1)  # [B, C/2, H, W] each
        x = torch.cat([v, u + f(v)], dim=1)
    return x


def _autocast_as_in_forward(
    state: tuple[str, bool, torch.dtype] | None,
) -> AbstractContextManager[Any]:
    """Re-enter the forward's autocast state (device type, enabled, dtype) for a recomputation."""
    if state is None:
        return contextlib.nullcontext()
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class _ReversibleCouplingFn(torch.autograd.Function):
    """y = (v, u + F(v)) for x = (u, v), storing no activation; backward rebuilds x from y.

    The couplings of a stage form a chain sharing `slots` (one entry per coupling): only the
    stage's last coupling saves its output y for backward. Backward of coupling i, given y_i and
    g = (g_a, g_b) with y_i = (a, b) = (v, u + F(v)): recompute f = F(a) with grad, recover the
    input u = b - f, v = a, hand x_i = (u, v) = y_{i-1} to coupling i - 1 through slots[i - 1],
    and return g_u = g_b, g_v = g_a + (dF/dv)^T g_b, g_theta = (dF/dtheta)^T g_b. So at any time
    one coupling's graph, one stage-sized tensor per stage and one coupling's parameter gradients
    are alive: activation memory is O(1) in the number of couplings.

    Invariants the recomputation relies on:
    - F is deterministic given (v, parameters, BN mode): no dropout or other randomness inside
      (RevNetStage rejects it), so no RNG state needs replaying. A stochastic F would need the RNG
      state stashed per coupling, as torch.utils.checkpoint(preserve_rng_state=True) does.
    - BatchNorm in train mode normalises with the statistics of the batch it sees, and the
      recomputation sees the same batch (up to rounding of u = b - f), so it reproduces F; its
      running-stat update lands on throw-away copies (`_bn_stats_on_copies`), so the running
      statistics see each batch once, as without reversibility. The module's train/eval mode must
      not change between forward and backward.
    - Autocast: the forward's autocast state (device type, enabled, dtype) is re-entered for the
      recomputation, so F is recomputed in the same precision. The stream (u, v) itself is kept
      in float32 (RevNetStage upcasts a half-precision input): with u, v in bf16, u + F(v) would
      round to 8 bits and b - F(a) would not give u back (gradients off by ~10%).
    - Each backward re-walks the chain from the saved stage output, refilling the slots it
      consumes, so retain_graph=True and a second backward work.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, f: nn.Module, slots: list[Tensor | None], i: int, *params: Tensor
    ) -> Tensor:
        device = x.device.type
        ctx.f, ctx.slots, ctx.i = f, slots, i
        ctx.autocast = (
            (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            if torch.amp.is_autocast_available(device)
            else None  # e.g. the meta device
        )
        y = couple([f], x)  # autograd.Function.forward runs without grad: nothing is stored
        if i == len(slots) - 1:
            ctx.save_for_backward(y)  # the stage output: where the chain's backward starts
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.i == len(ctx.slots) - 1:
            (y,) = ctx.saved_tensors
        else:
            y, ctx.slots[ctx.i] = ctx.slots[ctx.i], None
            if y is None:  # only if a backward started inside the stage, which taps never do
                raise RuntimeError(
                    "reversible RevNet coupling has no output to invert: backward must enter a "
                    "reversible stage through its output; build it with reversible=False"
                )
        f = ctx.f
        a, b = y.detach().chunk(2, dim=1)  # [B, C/2, H, W] each: a = v, b = u + F(v)
        g_a, g_b = grad_y.chunk(2, dim=1)
        params = [p for p in f.parameters() if p.requires_grad]
        with torch.enable_grad(), _bn_stats_on_copies(f):
            v = a.detach().requires_grad_(True)
            with _autocast_as_in_forward(ctx.autocast):
                out = f(v)  # F(v), [B, C/2, H, W]
            grads = iter(torch.autograd.grad(out, [v, *params], g_b))
        u = b - out.detach()
        if ctx.i > 0:
            ctx.slots[ctx.i - 1] = torch.cat([u, a], dim=1)  # x_i = y_{i-1}
        grad_x = torch.cat([g_b, g_a + next(grads)], dim=1)  # (g_u, g_v)
        param_grads = [next(grads) if p.requires_grad else None for p in f.parameters()]
        return (grad_x, None, None, None, *param_grads)


class PoolAndDouble(nn.Module):
    """Non-reversible downsampling between stages: 2x2 avg pool stride 2, zero-pad C -> 2C.

    Revisiting `pool_and_double_channels`: C/2 zero channels before and after. No parameters;
    for backward autograd keeps only its input, the previous stage's output, which that stage
    keeps anyway. Odd sides: the last window averages what it covers (TF 'SAME'), e.g. 7 -> 4.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)  # [B, C, ceil(H/2), ceil(W/2)]
        c = x.shape[1]
        return F.pad(x, (0, 0, 0, 0, c // 2, c - c // 2))  # [B, 2C, ...]


class RevNetStage(nn.Module):
    """[downsample,] couplings; reversible (stores only its output) while grad is on."""

    def __init__(self, w: int, depth: int, kind: str, downsample: bool, reversible: bool) -> None:
        super().__init__()
        self.downsample = PoolAndDouble() if downsample else nn.Identity()
        f_cls = RevBottleneckF if kind == "bottleneck" else RevBasicF
        self.blocks = nn.ModuleList(f_cls(w // 2) for _ in range(depth))
        self.reversible = reversible
        stochastic = [m for m in self.blocks.modules() if isinstance(m, nn.Dropout)]
        if stochastic:  # the recomputation in backward would draw different masks
            raise ValueError(f"reversible couplings must be deterministic, found {stochastic[0]}")

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)  # [B, C, H, W]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # the additive stream stays float32 under autocast (see below)
        if not (self.reversible and torch.is_grad_enabled()):
            return couple(list(self.blocks), x)
        slots: list[Tensor | None] = [None] * len(self.blocks)  # filled during backward
        for i, f in enumerate(self.blocks):
            x = _ReversibleCouplingFn.apply(x, f, slots, i, *f.parameters())
        return x


class RevNet(Backbone):
    """RevNet trunk: stem, 4 reversible stages (downsampling between them), BN [+ReLU], avg pool.

    `stem="imagenet"`: 7x7 conv stride 2 to the stage-1 width, 3x3 max-pool stride 2.
    `stem="small"` (28-64 px images): 3x3 conv stride 1, no max-pool (a 32 px input ends 4x4).
    `reversible=False` runs the same function with plain autograd (every activation stored); it
    is the reference of the gradient tests and the baseline of benchmarks/memory.py.
    """

    family = "revnet"

    def __init__(
        self, params: RevNetParams, *, stem: str = "imagenet", reversible: bool = True
    ) -> None:
        if stem not in ("imagenet", "small"):
            raise ValueError(f"RevNet stem must be 'imagenet' or 'small', got {stem!r}")
        kind, blocks = LAYOUTS[params.depth]
        w1 = 16 * params.k * (4 if kind == "bottleneck" else 1)
        widths = [w1 * 2**i for i in range(4)]
        super().__init__(widths)
        self.params = params
        self.stem_type = stem
        self.reversible = reversible
        small = stem == "small"
        self.conv1 = (
            conv2d(3, w1, 3) if small else Conv2d(3, w1, 7, stride=2, padding=3, bias=False)
        )
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, stride=2, padding=1)
        for i, (w, depth) in enumerate(zip(widths, blocks, strict=True)):
            self.add_module(f"layer{i + 1}", RevNetStage(w, depth, kind, i > 0, reversible))
        self.post_bn = norm2d(widths[-1])
        self.post_relu = nn.ReLU(inplace=True) if params.final_relu else nn.Identity()
        self.apply(init_weights)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Only for reversible=False: reversible stages already keep nothing but their output,
        so checkpointing them would only add a recomputation."""
        self.grad_checkpointing = enabled and not self.reversible

    def stem_forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.maxpool(self.conv1(x))  # [B, w1, H/4, W/4] ([B, w1, H, W] small stem)
        return out

    def stage_modules(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(4)]

    def post_forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.post_relu(self.post_bn(x))
        return out

    def complexity(self, image_size: int = 224) -> Complexity:
        """Analytic params and MACs, no classifier."""
        return revnet_complexity(self.params, self.stem_type, image_size)


def revnet_complexity(
    params: RevNetParams, stem: str = "imagenet", image_size: int = 224
) -> Complexity:
    """Params and MACs of `RevNet(params, stem=stem)` without classifier, walking it with `Cx`."""
    kind, blocks = LAYOUTS[params.depth]
    w = 16 * params.k * (4 if kind == "bottleneck" else 1)
    cx = Cx(image_size, image_size)
    if stem == "small":
        cx.conv(3, w, 3)
    else:
        cx.conv(3, w, 7, stride=2).pool(stride=2)
    for i, depth in enumerate(blocks):
        if i > 0:  # avg pool 2x2/2 (ceil) and zero channels: free
            cx.h, cx.w, w = -(-cx.h // 2), -(-cx.w // 2), 2 * w
        h = w // 2  # F acts on half the channels
        for _ in range(depth):
            if kind == "bottleneck":
                cx.norm(h).conv(h, h // 4, 1).norm(h // 4).conv(h // 4, h // 4, 3)
                cx.norm(h // 4).conv(h // 4, h, 1)
            else:
                cx.norm(h).conv(h, h, 3).norm(h).conv(h, h, 3)
    cx.norm(w)
    return cx.result()
