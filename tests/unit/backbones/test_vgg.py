"""VGG19-BN: torchvision's size and cost, its key names, width k, the taps and the small stem."""

from __future__ import annotations

import pytest
import torch

from wildsight.backbones import VGG, VGGParams, build_backbone, count_flops, count_params

# torchvision cfg "E" (VGG19): channels per 3x3 conv, "M" = 2x2 max-pool
CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]  # fmt: skip
PUBLISHED_PARAMS = 143_678_248  # torchvision VGG19_BN_Weights.IMAGENET1K_V1.meta["num_params"]
PUBLISHED_GFLOPS = 19.632  # same meta, "_ops" (multiply-adds at 224 px, classifier included)


def _by_hand(size: int = 224) -> tuple[int, int]:
    """(params, MACs) of torchvision vgg19_bn with its 1000-way head, from CFG_E by hand."""
    params = macs = 0
    c, side = 3, size
    for v in CFG_E:
        if v == "M":
            side //= 2
            continue
        assert isinstance(v, int)
        params += 9 * c * v + v + 2 * v  # conv weight + bias, BN gamma + beta
        macs += 9 * c * v * side * side
        c = v
    for d_in, d_out in [(c * 7 * 7, 4096), (4096, 4096), (4096, 1000)]:
        params += d_in * d_out + d_out
        macs += d_in * d_out
    return params, macs


def _meta(params: VGGParams, **kwargs) -> VGG:
    with torch.device("meta"):
        return VGG(params, **kwargs)


def test_vgg19_bn_equals_torchvision_with_its_classifier() -> None:
    model = _meta(VGGParams(19, k=8))
    assert model.feature_dim == 4096  # pre-logits: the fc7 output
    head = 4096 * 1000 + 1000
    params, macs = _by_hand()
    assert params == PUBLISHED_PARAMS
    assert count_params(model) + head == PUBLISHED_PARAMS
    assert model.complexity().params + head == PUBLISHED_PARAMS
    measured = count_flops(model, 224)  # conv + linear MACs, + C_out once per bias (pycls)
    assert measured == model.complexity().flops
    biases = 2 * 4096 + sum(v for v in CFG_E if v != "M")
    assert measured + 4096 * 1000 + 1000 == macs + biases + 1000
    assert round((measured + head) / 1e9, 3) == PUBLISHED_GFLOPS


def test_torchvision_key_names() -> None:
    expected = set()
    index = 0
    for v in CFG_E:
        if v == "M":
            index += 1
            continue
        expected |= {f"features.{index}.weight", f"features.{index}.bias"}
        expected |= {f"features.{index + 1}.{k}" for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}  # fmt: skip
        index += 3
    expected |= {
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    }
    model = _meta(VGGParams())
    assert set(model.state_dict()) == expected  # torchvision's minus the 1000-way classifier.6
    assert model.state_dict()["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert len(model.features) == len(CFG_E) + sum(v != "M" for v in CFG_E) * 2


@pytest.mark.parametrize("k", [4, 8, 16])
def test_widening_factor(k: int) -> None:
    model = _meta(VGGParams(19, k=k))
    assert model.stage_dims == (8 * k, 16 * k, 32 * k, 64 * k, 64 * k, 512 * k, 512 * k)
    assert model.features[0].out_channels == 8 * k


def test_taps_are_blocks_before_pooling_then_fc6_fc7() -> None:
    torch.manual_seed(0)
    model = VGG(VGGParams(19, k=1)).train()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = model.forward_maps(x)
        y = model(x)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (8, 224, 224), (16, 112, 112), (32, 56, 56), (64, 28, 28), (64, 14, 14),
        (512, 1, 1), (512, 1, 1),
    ]  # fmt: skip
    assert torch.equal(maps[-1].flatten(1), y)
    assert y.min() >= 0  # fc7 + ReLU
    # fc6 sees the 7x7 map after pool 5, flattened in (C, H, W) order as torchvision does
    with torch.no_grad():
        pooled = torch.nn.functional.max_pool2d(maps[4], 2)  # [2, 64, 7, 7]
        fc6 = torch.relu(
            pooled.flatten(1) @ model.classifier[0].weight.T + model.classifier[0].bias
        )
    assert torch.allclose(maps[5].flatten(1), fc6, atol=1e-5)


@pytest.mark.parametrize(("size", "sides"), [(32, [32, 32, 32, 16, 8]), (28, [28, 28, 28, 14, 7])])
def test_small_input(size: int, sides: list[int]) -> None:
    model = build_backbone("vgg:depth=19,k=1", small_input=True).eval()
    with torch.no_grad():
        maps = model.forward_maps(torch.randn(2, 3, size, size))
    assert [m.shape[-1] for m in maps[:5]] == sides  # pools 1 and 2 dropped: total stride 8
    assert model.classifier[0].in_features == 64  # fc6 reads the global average of pool 5
    with torch.device("meta"):
        small = build_backbone("vgg19_bn", small_input=True)
    assert small.complexity(32).params == count_params(small)
    assert small.complexity(32).flops == count_flops(small, 32)


def test_bad_params_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"^VGG depth must be one of \[11, 13, 16, 19\], got 18$"):
        VGGParams(18)
    with pytest.raises(ValueError, match="widening factor k must be >= 1"):
        build_backbone("vgg:depth=19,k=0")
