"""Parameters and FLOPs counted the way pycls counts them (and its MODEL_ZOO.md reports them).

pycls "flops" are multiply-adds of conv and linear layers only (BN, ReLU, pooling, the SE
product and the residual sum are free), at 224 x 224, classifier included; a layer with a
bias adds C_out once (not once per output pixel). Conv MACs are k*k * C_in/groups * C_out *
H_out * W_out. Params are all trainable tensors (BN gamma/beta included, running stats not).

Two ways to count, checked against each other in the tests:
- analytic (`Cx`, pycls's "cx" dicts): each family walks its own architecture with `Cx`;
  pure arithmetic, so RegNetY-256GF costs microseconds;
- measured (`count_params`, `count_flops`): one forward under torch's FlopCounterMode; works
  for any module, also on the meta device, but takes ~0.1-1 s per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Complexity:
    """Trainable parameters and multiply-adds ("flops" in pycls) of one forward pass."""

    params: int
    flops: int

    def __add__(self, other: Complexity) -> Complexity:
        return Complexity(self.params + other.params, self.flops + other.flops)


@dataclass
class Cx:
    """Running analytic count along a forward pass: current map size (h, w), params, MACs.

    Each method adds one layer and returns self, so a block reads as a chain:
    `cx.conv(w_in, w_b, 1).norm(w_b).conv(w_b, w_b, 3, stride=s, groups=g).norm(w_b)`.
    A parallel branch (a projection shortcut) saves and restores (h, w) around itself.
    """

    h: int
    w: int
    params: int = 0
    flops: int = 0

    def conv(
        self, w_in: int, w_out: int, k: int, *, stride: int = 1, groups: int = 1, bias: bool = False
    ) -> Cx:
        """k x k conv, padding (k - 1) // 2: h -> (h - 1) // stride + 1."""
        self.h, self.w = (self.h - 1) // stride + 1, (self.w - 1) // stride + 1
        weights = k * k * w_in * w_out // groups
        self.params += weights + (w_out if bias else 0)
        self.flops += weights * self.h * self.w + (w_out if bias else 0)
        return self

    def norm(self, c: int) -> Cx:
        """BatchNorm: gamma and beta, no MACs."""
        self.params += 2 * c
        return self

    def pool(self, stride: int) -> Cx:
        """Max-pool with padding (k - 1) // 2: no params, no MACs."""
        self.h, self.w = (self.h - 1) // stride + 1, (self.w - 1) // stride + 1
        return self

    def se(self, c: int, c_se: int) -> Cx:
        """SE on [c, h, w]: two 1x1 convs with bias on the pooled [c, 1, 1]; map size unchanged."""
        n = c * c_se + c_se + c_se * c + c
        self.params += n
        self.flops += n
        return self

    def result(self) -> Complexity:
        return Complexity(params=self.params, flops=self.flops)


def classifier_complexity(feature_dim: int, num_classes: int = 1000) -> Complexity:
    """A linear classifier with bias on pooled features: D*N + N params and MACs (pycls AnyHead)."""
    n = feature_dim * num_classes + num_classes
    return Complexity(params=n, flops=n)


def count_params(model: nn.Module) -> int:
    """Number of trainable scalars (BN gamma and beta included, buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int = 224) -> int:
    """Measured multiply-adds of one [1, 3, S, S] forward, pycls style (conv, linear, +C_out/bias).

    Runs in eval mode (no BN running-stat update) without grad, on the model's device (meta
    works). Assumes each conv/linear module runs once per forward, true of every backbone here.
    """
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, mode in modes:
            m.training = mode
    macs = int(counter.get_total_flops()) // 2  # FlopCounterMode counts a multiply-add as 2 flops
    biases = sum(
        int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None
    )
    return macs + biases
