"""SimCLR v2's selective-kernel ResNets: the published sizes, the SK mixing and ResNet-D pooling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from wildsight.backbones import (
    ResNet,
    ResNetParams,
    SKResNet,
    SKResNetParams,
    build_backbone,
    count_flops,
    count_params,
)
from wildsight.backbones.sk_resnet import AvgPoolShortcut, SKConv

# SimCLR v2 (Chen et al., 2020) Table 1, also google-research/simclr README: (depth, width, SK)
# -> "Param (M)". The table counts every variable of the TF base network, i.e. the trainable
# parameters plus the BatchNorm moving mean and variance; no classifier.
SIMCLR_V2_TABLE = {
    (50, 1, False): 24, (50, 1, True): 35, (50, 2, False): 94, (50, 2, True): 140,
    (101, 1, False): 43, (101, 1, True): 65, (101, 2, False): 170, (101, 2, True): 257,
    (152, 1, False): 58, (152, 1, True): 89, (152, 2, False): 233, (152, 2, True): 354,
    (152, 3, True): 795,
}  # fmt: skip


@pytest.mark.parametrize(("depth", "width", "sk"), list(SIMCLR_V2_TABLE))
def test_simclr_v2_table_1_sizes(depth: int, width: int, sk: bool) -> None:
    with torch.device("meta"):
        if sk:
            model = build_backbone(f"sk_resnet:depth={depth},width={width}")
        else:  # SimCLR without SK is a plain ResNet v1 with Revisiting's k = 4 * width
            model = ResNet(ResNetParams(depth, k=4 * width))
    bn_moving = sum(b.numel() for name, b in model.named_buffers() if "running_" in name)
    assert round((count_params(model) + bn_moving) / 1e6) == SIMCLR_V2_TABLE[(depth, width, sk)]
    assert model.feature_dim == 2048 * width


def test_presets_are_the_sk_rows_of_the_table() -> None:
    with torch.device("meta"):
        model = build_backbone("sk_resnet152_3x")
    assert model.params == SKResNetParams(152, width=3, sk_ratio=0.0625)
    assert model.stage_dims == (768, 1536, 3072, 6144)


def test_sk_conv_mixes_two_branches_with_a_softmax() -> None:
    torch.manual_seed(0)
    sk = SKConv(32, stride=1, sk_ratio=0.0625).train()
    assert sk.fc1.out_channels == 32  # max(int(32 * 0.0625), 32): the SimCLR minimum
    x = torch.randn(4, 32, 6, 6)
    with torch.no_grad():
        branches = F.relu(sk.bn(sk.conv(x)))  # [B, 2w, H, W], both branches 3x3
        b1, b2 = branches[:, :32], branches[:, 32:]
        # attention computed by hand from the pooled sum
        s = (b1 + b2).mean(dim=(2, 3), keepdim=True)
        z = F.relu(sk.fc1_bn(sk.fc1(s)))
        logits = sk.fc2(z)
        a1 = 1 / (1 + torch.exp(logits[:, 32:] - logits[:, :32]))  # softmax of two = sigmoid
        expected = a1 * b1 + (1 - a1) * b2
        sk.bn.momentum = sk.fc1_bn.momentum = 0.0  # the second forward normalises identically
        assert torch.allclose(sk(x), expected, atol=1e-5)
        torch.nn.init.zeros_(sk.fc2.weight)  # no preference: the mean of the branches
        assert torch.allclose(sk(x), (b1 + b2) / 2, atol=1e-6)


def test_resnet_d_shortcut_pooling_matches_a_loop() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)
    for stride in (1, 2):
        shortcut = AvgPoolShortcut(2, 2, stride).eval()
        torch.nn.init.eye_(shortcut.conv.weight[:, :, 0, 0])  # 1x1 identity conv
        with torch.no_grad():
            shortcut.bn.running_var.fill_(1 - shortcut.bn.eps)  # BN = identity
            out = shortcut(x)
        side = 5 if stride == 1 else 3
        expected = torch.zeros(1, 2, side, side)
        for i in range(side):
            for j in range(side):
                window = x[:, :, i * stride : i * stride + 2, j * stride : j * stride + 2]
                if stride == 1:  # TF 'SAME': the mean of the pixels the window covers
                    expected[:, :, i, j] = window.mean(dim=(2, 3))
                else:  # zero padding on the right/bottom counts in the mean
                    expected[:, :, i, j] = window.sum(dim=(2, 3)) / 4
        assert torch.allclose(out, expected, atol=1e-6), stride


def test_structure() -> None:
    with torch.device("meta"):
        model = SKResNet(SKResNetParams(50, width=2))
    convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(64, 2), (64, 1), (128, 1)]
    first = model.layer1[0]
    assert isinstance(first.downsample, AvgPoolShortcut)  # ResNet-D even at stride 1
    assert first.sk.conv.out_channels == 2 * 128 and model.layer2[0].sk.conv.stride == (2, 2)
    assert all(b.downsample is None for b in model.layer3[1:])
    zero_init = SKResNet(SKResNetParams(50))  # SimCLR: each block's last BN gamma starts at 0
    assert all(not b.bn3.weight.detach().any() for b in zero_init.layer4)


@pytest.mark.parametrize("small_input", [False, True])
def test_analytic_count_equals_measured_count(small_input: bool) -> None:
    with torch.device("meta"):
        model = build_backbone("sk_resnet50", small_input=small_input)
    size = 32 if small_input else 224
    assert model.complexity(size).params == count_params(model)
    assert model.complexity(size).flops == count_flops(model, size)


def test_real_step_and_checkpointing_change_nothing() -> None:
    # The contract test keeps > 25M-parameter models on the meta device; run the SK code once.
    torch.manual_seed(0)
    model = SKResNet(SKResNetParams(50), stem="small", zero_init_residual=False)
    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 16, 16)
    y, y_ckpt = model(x), twin(x)
    y.square().mean().backward()
    y_ckpt.square().mean().backward()
    assert y.shape == (2, 2048) and torch.equal(y, y_ckpt)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, c), name
    with torch.no_grad():
        stages = model.forward_stages(torch.randn(2, 3, 28, 28))
    assert [s.shape[1] for s in stages] == [256, 512, 1024, 2048]


def test_bad_params_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"for no SK use a ResNet \('resnet:depth=50,k=8'\)"):
        SKResNetParams(50, width=2, sk_ratio=0.0)
    with pytest.raises(ValueError, match=r"^SK-ResNet depth must be one of \[50, 101, 152\]"):
        build_backbone("sk_resnet:depth=34")
