"""RevNet: reversible couplings, gradients vs plain autograd, O(1) activation memory in depth."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wildsight.backbones import RevNet, RevNetParams, build_backbone, count_flops, count_params
from wildsight.backbones.revnet import PRESETS, RevBottleneckF, RevNetStage, couple


def _randomise_bn(model: nn.Module) -> None:
    """BN gamma/beta away from (1, 0), so the gradient check exercises them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


def _three_stage_net(reversible: bool) -> nn.Sequential:
    """Stem conv, 3 stages (2, 3, 2 bottleneck couplings) with downsampling between, final BN."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        RevNetStage(16, 2, "bottleneck", downsample=False, reversible=reversible),
        RevNetStage(32, 3, "bottleneck", downsample=True, reversible=reversible),
        RevNetStage(64, 2, "bottleneck", downsample=True, reversible=reversible),
        nn.BatchNorm2d(64),
    )


def _set_reversible(model: nn.Module, reversible: bool) -> None:
    for m in model.modules():
        if isinstance(m, RevNetStage):
            m.reversible = reversible


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _compare_with_plain_autograd(model: nn.Module, x: torch.Tensor) -> None:
    """Reversible backward vs plain autograd through the same modules (train-mode BN)."""
    reference = copy.deepcopy(model)
    _set_reversible(model, True)
    _set_reversible(reference, False)
    x_rev, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_rev, y_ref = model(x_rev), reference(x_ref)
    weights = torch.randn_like(y_ref)  # a loss whose gradient differs for every output
    (y_rev * weights).sum().backward()
    (y_ref * weights).sum().backward()

    assert torch.equal(y_rev, y_ref)  # the same forward ops in the same order
    assert _rel_err(x_rev.grad, x_ref.grad) < 1e-6
    n_checked = 0
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        assert _rel_err(p.grad, p_ref.grad) < 1e-6, name
        n_checked += 1
    assert n_checked > 0
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, b_ref), name  # the recomputation did not update BN stats again


def test_coupling_is_inverted_exactly_up_to_rounding() -> None:
    torch.manual_seed(0)
    fs = [RevBottleneckF(8).double() for _ in range(3)]
    for f in fs:
        _randomise_bn(f)
    x = torch.randn(4, 16, 6, 6, dtype=torch.float64)
    y = couple(fs, x)
    a, b = y.chunk(2, dim=1)
    for f in reversed(fs):  # (a, b) = (v, u + F(v))  ->  (u, v) = (b - F(a), a)
        a, b = b - f(a), a
    assert torch.allclose(torch.cat([a, b], dim=1), x, rtol=0, atol=1e-12)


def test_three_stage_gradients_equal_plain_autograd_float64() -> None:
    torch.manual_seed(0)
    net = _three_stage_net(reversible=True).double().train()
    _randomise_bn(net)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    _compare_with_plain_autograd(net, x)
    bn = net[1].blocks[0].bn1
    assert int(bn.num_batches_tracked) == 1  # one forward, one update


def test_frozen_couplings_get_no_gradient() -> None:
    torch.manual_seed(1)
    net = _three_stage_net(reversible=True).double().train()
    _randomise_bn(net)
    net[2].requires_grad_(False)
    _compare_with_plain_autograd(net, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert all(p.grad is None for p in net[2].parameters())


@pytest.mark.parametrize("depth", [18, 50])
def test_full_revnet_gradients_equal_plain_autograd(depth: int) -> None:
    torch.manual_seed(depth)
    model = RevNet(RevNetParams(depth, k=1), stem="small").double()
    _randomise_bn(model)
    _compare_with_plain_autograd(model, torch.randn(2, 3, 16, 16, dtype=torch.float64))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of non-parameter tensors autograd holds for backward after one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    assert y.requires_grad
    return sum(storages.values())


def test_activation_memory_does_not_grow_with_depth() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    reversible, plain = {}, {}
    for depth in (50, 101, 152):  # (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3) couplings
        model = RevNet(RevNetParams(depth, k=1), stem="small")
        reversible[depth] = _saved_bytes(model, x)
        plain[depth] = _saved_bytes(
            RevNet(RevNetParams(depth, k=1), stem="small", reversible=False), x
        )
    assert reversible[50] == reversible[101] == reversible[152]
    assert plain[50] < plain[101] < plain[152]
    assert reversible[50] < plain[50] / 4


def test_revnet50_k16_has_the_published_size() -> None:
    # "RevNet-50 (4x)": 86M parameters (Chen et al., 2020, SimCLR, Table 6, the Rotation row of
    # Kolesnikov et al., 2019), counted without the classifier as in that table's ResNet-50: 24M.
    with torch.device("meta"):
        model = build_backbone("revnet50_k16")
    assert round(count_params(model) / 1e6) == 86
    assert model.feature_dim == 512 * 16
    assert model.conv1.out_channels == 64 * 16  # stem straight to the stage-1 width
    with torch.device("meta"):
        resnet = build_backbone("resnet50")
    assert round(count_params(resnet) / 1e6) == 24


@pytest.mark.parametrize("name", ["revnet18", "revnet50", "revnet50_minus"])
@pytest.mark.parametrize("small_input", [False, True])
def test_analytic_count_equals_measured_count(name: str, small_input: bool) -> None:
    with torch.device("meta"):
        model = build_backbone(name, small_input=small_input)
    size = 32 if small_input else 224
    assert model.complexity(size).params == count_params(model)
    assert model.complexity(size).flops == count_flops(model, size)


def test_widths_stems_and_downsampling() -> None:
    assert PRESETS["revnet50_k8"] == RevNetParams(50, k=8)
    with torch.device("meta"):
        assert build_backbone("revnet50").stage_dims == (256, 512, 1024, 2048)
        assert build_backbone("revnet18").stage_dims == (64, 128, 256, 512)
    small = RevNet(RevNetParams(18, k=1), stem="small").eval()
    with torch.no_grad():
        assert [m.shape[-1] for m in small.forward_maps(torch.randn(1, 3, 32, 32))] == [
            32,
            16,
            8,
            4,
        ]
        assert [m.shape[-1] for m in small.forward_maps(torch.randn(1, 3, 28, 28))] == [
            28,
            14,
            7,
            4,
        ]
    stage = small.layer2
    with torch.no_grad():
        x = torch.randn(1, 16, 7, 7)
        down = stage.downsample(x)  # avg pool 2x2/2 ('SAME': 7 -> 4), C/2 zeros on both sides
    assert down.shape == (1, 32, 4, 4)
    assert down[:, :8].abs().sum() == 0 and down[:, 24:].abs().sum() == 0
    assert torch.allclose(down[:, 8:24, 0, 0], x[:, :, :2, :2].mean(dim=(2, 3)))
    assert torch.allclose(down[:, 8:24, 3, 3], x[:, :, 6, 6])  # a window with one pixel


def test_final_relu_variant() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plus = RevNet(RevNetParams(18, k=1), stem="small").eval().forward_maps(x)[-1]
        minus = RevNet(RevNetParams(18, k=1, final_relu=False), stem="small").eval()
        assert plus.min() >= 0 and minus.forward_maps(x)[-1].min() < 0


def test_checkpointing_only_applies_to_the_plain_autograd_variant() -> None:
    model = RevNet(RevNetParams(18, k=1), stem="small")
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is False  # reversible stages store nothing to checkpoint
    torch.manual_seed(0)
    plain = RevNet(RevNetParams(18, k=1), stem="small", reversible=False)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing is True
    x = torch.randn(2, 3, 16, 16)
    plain(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_bf16_autocast_is_replayed_in_the_recomputation() -> None:
    torch.manual_seed(0)
    model = RevNet(RevNetParams(18, k=1), stem="small")
    reference = copy.deepcopy(model)
    _set_reversible(reference, False)
    x = torch.randn(2, 3, 16, 16)
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        # F runs in bf16 and is recomputed in bf16; the (u, v) stream stays float32, so the
        # inverse is exact to float32 rounding (with a bf16 stream this error was ~0.14)
        assert _rel_err(p.grad, q.grad) < 1e-4, name


def test_retain_graph_and_a_second_backward() -> None:
    torch.manual_seed(0)
    model = RevNet(RevNetParams(50, k=1), stem="small")
    y = model(torch.randn(2, 3, 16, 16)).square().sum()
    y.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    y.backward()  # the chain is re-walked from each stage's saved output
    for (name, p), g in zip(model.named_parameters(), once, strict=True):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-4, atol=1e-7), name
