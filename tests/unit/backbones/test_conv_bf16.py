"""The backbones' Conv2d gives true weight gradients under CPU bf16 autocast on 1-pixel inputs.

torch 2.13's CPU bf16 kernel returns garbage (1e35, inf, NaN) for the weight gradient of a
strided k > 1 convolution whose input is 1 pixel wide; the reference here is the same
convolution in float64, computed without autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wildsight.backbones import build_backbone
from wildsight.backbones.layers import Conv2d


def _weight_grad_error(conv: nn.Conv2d, x: torch.Tensor) -> float:
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().sum().backward()
    w = conv.weight.detach().double().requires_grad_(True)
    ref = nn.functional.conv2d(x.double(), w, None, conv.stride, conv.padding, 1, conv.groups)
    ref.square().sum().backward()
    assert w.grad is not None and conv.weight.grad is not None
    err = (conv.weight.grad.double() - w.grad).abs().max() / w.grad.abs().max()
    return float(err) if torch.isfinite(err) else float("inf")


@pytest.mark.parametrize(("k", "groups"), [(3, 1), (3, 8), (7, 1)])
def test_strided_conv_on_one_pixel_inputs_has_true_weight_gradients_under_bf16(k, groups):
    torch.manual_seed(0)
    conv = Conv2d(32, 32, k, stride=2, padding=k // 2, groups=groups, bias=False)
    # the fault varies from call to call (uninitialised memory): several calls, 1x1 and 1xN
    errors = [_weight_grad_error(conv, torch.randn(4, 32, 1, w)) for w in (1, 1, 1, 5, 1)]
    assert max(errors) < 0.02  # bf16 rounding of y's gradient, not garbage
    # and the usual inputs still run in bf16 (the fallback is only for the faulty shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(2, 32, 4, 4)).dtype == torch.bfloat16


def test_conv2d_keeps_nn_conv2d_parameters_and_state_dict():
    ours, theirs = Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(ours(x), theirs(x))


def test_a_backbone_on_8px_crops_trains_in_bf16_with_finite_gradients():
    torch.manual_seed(0)
    backbone = build_backbone("regnetx_200mf", small_input=True).train()
    for _ in range(3):  # 8 px -> a 1x1 map into the last stage's stride-2 conv
        backbone.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = backbone(torch.randn(8, 3, 8, 8))
        out.float().square().mean().backward()
        grads = [p.grad for p in backbone.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() and g.abs().max() < 1e3 for g in grads)
