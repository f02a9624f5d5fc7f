"""ResNet v1/v2, width k, the (-) variant and the small-image stem."""

from __future__ import annotations

import pytest
import torch

from wildsight.backbones import ResNet, ResNetParams, build_backbone, count_params
from wildsight.backbones.resnet import PRESETS


def _meta(params: ResNetParams, **kwargs) -> ResNet:
    with torch.device("meta"):
        return ResNet(params, **kwargs)


@pytest.mark.parametrize(("depth", "published"), [(18, 11_689_512), (50, 25_557_032)])
def test_param_counts_match_torchvision(depth: int, published: int) -> None:
    model = _meta(ResNetParams(depth))
    assert count_params(model) + model.feature_dim * 1000 + 1000 == published


def test_torchvision_key_names() -> None:
    keys = set(_meta(ResNetParams(50)).state_dict())
    expected = ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.num_batches_tracked", "layer4.2.conv3.weight",
                "layer4.2.bn3.bias"]  # fmt: skip
    assert set(expected) <= keys
    assert not any(k.startswith("fc.") for k in keys)
    assert "layer1.0.conv2.weight" in set(_meta(ResNetParams(18)).state_dict())


@pytest.mark.parametrize("k", [4, 8, 16])
def test_widening_factor(k: int) -> None:
    # Revisiting: first conv 16k channels, pre-logits 512k (k = 4 is the usual ResNet-50).
    model = _meta(ResNetParams(50, k=k))
    assert model.conv1.out_channels == 16 * k
    assert model.feature_dim == 512 * k
    assert model.stage_dims == (64 * k, 128 * k, 256 * k, 512 * k)
    assert _meta(ResNetParams(18, k=k)).feature_dim == 128 * k


def test_v2_is_pre_activation() -> None:
    model = _meta(ResNetParams(50, version=2))
    assert isinstance(model.bn1, torch.nn.Identity)  # no BN/ReLU after the stem conv
    block = model.layer2[0]
    assert block.bn1.num_features == 256  # BN on the block input, before any conv
    assert len(block.downsample) == 1  # projection from the pre-activated input, no BN
    assert model.post_bn.num_features == 2048


def test_final_relu_variants() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    v1 = build_backbone("resnet18", small_input=True).eval()
    v2 = build_backbone("resnet:depth=18,version=2", small_input=True).eval()
    v2_minus = build_backbone("resnet:depth=18,version=2,final_relu=false", small_input=True).eval()
    v1_minus = build_backbone("resnet:depth=18,final_relu=0", small_input=True).eval()
    with torch.no_grad():
        assert v1.forward_maps(x)[-1].min() >= 0
        assert v2.forward_maps(x)[-1].min() >= 0
        assert v2_minus.forward_maps(x)[-1].min() < 0  # (-): no ReLU before global pooling
        assert v1_minus.forward_maps(x)[-1].min() < 0
    assert PRESETS["resnet50v2_minus"] == ResNetParams(50, version=2, final_relu=False)


def test_stems() -> None:
    small = build_backbone("resnet18", small_input=True).eval()
    with torch.no_grad():
        maps = small.forward_maps(torch.randn(1, 3, 32, 32))
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]  # 3x3/1 stem, no max-pool
    published = build_backbone("resnet18").eval()
    assert published.conv1.kernel_size == (7, 7) and published.conv1.stride == (2, 2)
    with torch.no_grad():
        maps = published.forward_maps(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]


def test_zero_init_residual_v1_only() -> None:
    model = ResNet(ResNetParams(18), zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for layer in model.stage_modules() for b in layer)
    assert torch.all(model.layer2[0].downsample[1].weight == 1)
    with pytest.raises(ValueError, match="v1 only"):
        ResNet(ResNetParams(50, version=2), zero_init_residual=True)


@pytest.mark.parametrize(
    "kwargs", [{"depth": 42}, {"depth": 50, "k": 0}, {"depth": 50, "version": 3}]
)
def test_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ResNet"):
        ResNetParams(**kwargs)
