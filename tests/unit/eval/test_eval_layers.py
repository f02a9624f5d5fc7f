"""Probe taps: every stage's pooled output and the pre-logits, from one forward pass, equal to
the backbone's own forward_stages / forward."""

from __future__ import annotations

import pytest
import torch

from wildsight.backbones import build_backbone
from wildsight.eval import extract_features, extract_layers, layer_names
from wildsight.eval.features import resolve_layers


def to_float(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 255.0


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("regnetx_200mf", small_input=True).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)


def test_layer_names_follow_the_stages(backbone) -> None:  # noqa: ANN001
    assert backbone.stage_dims == (24, 56, 152, 368)  # pycls RegNetX-200MF widths
    assert layer_names(backbone) == ["stage1", "stage2", "stage3", "pre_logits"]
    assert resolve_layers(backbone, ["all"]) == layer_names(backbone)
    assert resolve_layers(backbone, ["pre_logits", "stage2"]) == ["stage2", "pre_logits"]
    with pytest.raises(ValueError, match=r"unknown layer 'stage9'; choose from \['stage1'"):
        resolve_layers(backbone, ["stage9"])


def test_every_tap_equals_the_backbone_own_outputs(backbone, images) -> None:  # noqa: ANN001
    taps = extract_layers(backbone, images, ["all"], transform=to_float, batch_size=4)
    with torch.no_grad():
        maps = backbone.forward_maps(to_float(images))  # 4 maps [B, C_i, H_i, W_i]
        pre_logits = backbone(to_float(images))  # [B, 368]
    assert list(taps) == ["stage1", "stage2", "stage3", "pre_logits"]
    for name, fmap in zip(taps, maps, strict=True):
        torch.testing.assert_close(taps[name], fmap.mean(dim=(2, 3)))  # global average pool
    torch.testing.assert_close(taps["pre_logits"], pre_logits)
    torch.testing.assert_close(
        taps["pre_logits"], extract_features(backbone, images, transform=to_float)
    )
    assert [t.shape[1] for t in taps.values()] == [24, 56, 152, 368]


def test_a_subset_of_layers_comes_in_network_order(backbone, images) -> None:  # noqa: ANN001
    both = extract_layers(backbone, images, ["pre_logits", "stage1"], transform=to_float)
    alone = extract_layers(backbone, images, ["stage1"], transform=to_float)
    assert list(both) == ["stage1", "pre_logits"]
    torch.testing.assert_close(both["stage1"], alone["stage1"])
    assert both["stage1"].is_contiguous() and not both["stage1"].is_inference()


def test_the_backbone_mode_is_given_back(backbone, images) -> None:  # noqa: ANN001
    backbone.train()
    try:
        extract_layers(backbone, images, ["stage1"], transform=to_float)
        assert backbone.training
    finally:
        backbone.eval()
    extract_layers(backbone, images, ["stage1"], transform=to_float)
    assert not backbone.training
