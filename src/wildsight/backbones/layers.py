"""Shared pieces of every backbone: conv/norm helpers, SE, pycls init and the Backbone base.

A backbone is "a classifier without its head": stem -> stages -> global average pool. The
`Backbone` base owns what every family shares: `forward` (pre-logits), per-stage pooled
features, per-stage activation checkpointing and a measured complexity. A family provides
`stem_forward`, `stage_modules` and, for pre-activation nets, `post_forward` (the norm/act
after the last stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from wildsight.backbones.complexity import Complexity, count_flops, count_params


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict) that sidesteps a CPU bf16 kernel fault.

    Under CPU bf16 autocast (torch 2.13, oneDNN on AMX / AVX512-BF16), the weight gradient of a
    strided k > 1 convolution whose input is 1 pixel high or wide comes back as garbage (values
    of 1e35, inf or NaN, varying from call to call): tests/unit/backbones/test_conv_bf16.py. Such
    inputs occur with tiny crops (8 px local crops of 28 px images, jigsaw tiles) in the last
    stage. Those calls run in float32, the rest as usual.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and min(x.shape[-2:]) == 1
            and max(self.stride) > 1
            and max(self.kernel_size) > 1
            and torch.is_autocast_enabled("cpu")
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def conv2d(
    w_in: int, w_out: int, k: int, *, stride: int = 1, groups: int = 1, bias: bool = False
) -> nn.Conv2d:
    """k x k convolution with 'same' padding (odd k only), as pycls builds every conv."""
    if k % 2 != 1:
        raise ValueError(f"only odd kernel sizes keep the padding symmetric, got k={k}")
    return Conv2d(w_in, w_out, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=bias)


def norm2d(w: int) -> nn.BatchNorm2d:
    """BatchNorm2d with PyTorch's defaults (eps 1e-5, momentum 0.1), which pycls also uses."""
    return nn.BatchNorm2d(w)


class SE(nn.Module):
    """Squeeze-and-Excitation: AvgPool, 1x1 conv, ReLU, 1x1 conv, Sigmoid; rescales channels.

    Hu et al., 2018. The two 1x1 convs carry biases (pycls, torchvision, timm all do).
    """

    def __init__(self, w_in: int, w_se: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.f_ex = nn.Sequential(
            nn.Conv2d(w_in, w_se, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(w_se, w_in, 1, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        scale: Tensor = self.f_ex(self.avg_pool(x))  # [B, C, 1, 1], in (0, 1)
        return x * scale


def init_weights(module: nn.Module) -> None:
    """pycls init: conv N(0, 2 / fan_out) (kaiming fan_out), BN 1 and 0, linear N(0, 0.01^2).

    Conv biases (only SE has them) keep PyTorch's default init, as in pycls. A BatchNorm marked
    `final_bn = True` is the last norm of a residual branch; `zero_init_final_bn` zeroes it.
    Meta-device modules are skipped (nothing to fill; it would only cost time): after
    `model.to_empty(device=...)`, call `model.apply(init_weights)`.
    """
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def zero_init_final_bn(model: nn.Module) -> None:
    """Zero gamma of each residual branch's last BN, so every block starts as the identity.

    Goyal et al., 2017 ("Accurate, large minibatch SGD"); pycls BN.ZERO_INIT_FINAL_GAMMA and
    torchvision zero_init_residual. Off by default in both, and here.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and getattr(m, "final_bn", False):
            nn.init.zeros_(m.weight)


@contextlib.contextmanager
def _bn_stats_on_copies(module: nn.Module) -> Iterator[None]:
    """Let every BatchNorm of `module` update copies of its running stats, then drop the copies.

    Used while a checkpointed stage is recomputed in backward: the recomputation normalises with
    the same batch statistics and saves the same tensors, but its momentum update (and
    `num_batches_tracked += 1`) lands on throw-away copies, so the running stats see each batch
    once, exactly as without checkpointing.
    """
    saved: list[tuple[_BatchNorm, Tensor, Tensor, Tensor]] = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            assert m.running_var is not None and m.num_batches_tracked is not None
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
    for m, mean, var, count in saved:
        m.running_mean = mean.clone()
        m.running_var = var.clone()
        m.num_batches_tracked = count.clone()
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


def run_stage(stage: nn.Module, x: Tensor, grad_checkpointing: bool) -> Tensor:
    """stage(x), optionally under torch.utils.checkpoint (non-reentrant).

    Outputs, gradients and BN running statistics are identical with and without checkpointing:
    the recomputation updates copies of the BN running stats (see `_bn_stats_on_copies`).
    """
    if not (grad_checkpointing and torch.is_grad_enabled()):
        out: Tensor = stage(x)
        return out

    def context_fn() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        return contextlib.nullcontext(), _bn_stats_on_copies(stage)  # (forward, recompute)

    out = checkpoint(stage, x, use_reentrant=False, context_fn=context_fn)
    return out


class Backbone(nn.Module):
    """Stem, stages, [post], global average pool: images [B,3,H,W] -> pre-logits [B, D].

    A family calls `super().__init__(stage_dims)` first, registers its layers under whatever
    names its reference implementation uses (pycls, torchvision), and implements
    `stem_forward`, `stage_modules` [and `post_forward`]. `family` names it in
    `describe_backbones()`.
    """

    family: str = "backbone"

    def __init__(self, stage_dims: Sequence[int]) -> None:
        super().__init__()
        self.stage_dims: tuple[int, ...] = tuple(int(w) for w in stage_dims)
        self.feature_dim: int = self.stage_dims[-1]
        self.grad_checkpointing = False

    # -- what a family provides ------------------------------------------------------------
    def stem_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def stage_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def post_forward(self, x: Tensor) -> Tensor:
        """Applied to the last stage's output before pooling (pre-activation nets: BN [+ReLU])."""
        return x

    def complexity(self, image_size: int = 224) -> Complexity:
        """Params and multiply-adds (pycls count, no classifier) of one image_size forward.

        Measured here (one forward under FlopCounterMode); families override it with an
        analytic count that the tests check against this one.
        """
        return Complexity(count_params(self), count_flops(self, image_size))

    # -- shared behaviour ------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint each stage but the last (torch.utils.checkpoint, use_reentrant=False).

        The last stage is recomputed first thing in backward, so checkpointing it would cost its
        forward again without lowering the peak (its activations are alive then either way).
        """
        self.grad_checkpointing = enabled

    def _checkpointed(self, index: int, num_stages: int) -> bool:
        return self.grad_checkpointing and index < num_stages - 1

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        """Feature maps after each stage, [B, C_i, H_i, W_i]; the last includes `post_forward`."""
        x = self.stem_forward(x)
        stages = self.stage_modules()
        maps = []
        for i, stage in enumerate(stages):
            x = run_stage(stage, x, self._checkpointed(i, len(stages)))
            if i == len(stages) - 1:
                x = self.post_forward(x)
            maps.append(x)
        return maps

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Average-pooled features after each stage, [B, C_i]; the last equals forward(x)."""
        return [m.mean(dim=(2, 3)) for m in self.forward_maps(x)]

    def forward(self, x: Tensor) -> Tensor:
        """Pre-logits: [B, 3, H, W] float -> [B, feature_dim]."""
        x = self.stem_forward(x)
        stages = self.stage_modules()
        for i, stage in enumerate(stages):
            x = run_stage(stage, x, self._checkpointed(i, len(stages)))
        x = self.post_forward(x)  # [B, D, h, w]
        return x.mean(dim=(2, 3))  # [B, D]
