"""Probe taps: every stage's pooled output and the pre-logits, from one forward pass, equal to
the backbone's own forward_stages / forward."""

from __future__ import annotations

import pytest
import torch

from wildsight.backbones import build_backbone
from wildsight.eval import (
    extract_features,
    extract_layers,
    grid_layer_names,
    grid_side,
    layer_names,
)
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


def test_grid_taps_are_named_per_stage_and_ordered_with_the_pooled_ones(backbone) -> None:  # noqa: ANN001
    grids = ["stage1_grid", "stage2_grid", "stage3_grid", "stage4_grid"]
    assert grid_layer_names(backbone) == grids
    assert resolve_layers(backbone, ["grids"]) == grids
    assert resolve_layers(backbone, ["grids", "all"]) == [
        "stage1", "stage1_grid", "stage2", "stage2_grid", "stage3", "stage3_grid",
        "pre_logits", "stage4_grid",
    ]  # fmt: skip
    assert resolve_layers(backbone, ["stage4_grid", "pre_logits", "stage3_grid"]) == [
        "stage3_grid", "pre_logits", "stage4_grid",
    ]  # fmt: skip


def test_grid_sizes_are_those_of_goyal_et_al_for_resnet50() -> None:
    """Goyal et al. (2019) / VISSL's linear benchmark of ResNet-50 at 224 px pools res2..res5 to
    6x6x256, 4x4x512, 3x3x1024 and 2x2x2048 values; the real network's maps give those sizes."""
    model = build_backbone("resnet50").eval()
    image = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    taps = extract_layers(model, image, ["grids"], transform=to_float)
    assert [t.shape[1] for t in taps.values()] == [9216, 8192, 9216, 8192]
    assert [grid_side(c, h, h) for c, h in [(256, 56), (512, 28), (1024, 14), (2048, 7)]] == [
        6, 4, 3, 2,
    ]  # fmt: skip
    assert grid_side(4096, 3, 3) == 1 and grid_side(8, 5, 3) == 3  # never below 1 nor above the map


def _adaptive_bins(fmap: torch.Tensor, side: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C * side * side]: bin (i, j) averages rows floor(i H / s) ..
    ceil((i + 1) H / s) - 1 and likewise columns, flattened channel-major."""
    b, c, h, w = fmap.shape
    out = torch.empty(b, c, side, side)
    for i in range(side):
        r0, r1 = (i * h) // side, -((-(i + 1) * h) // side)
        for j in range(side):
            c0, c1 = (j * w) // side, -((-(j + 1) * w) // side)
            out[:, :, i, j] = fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out.flatten(1)


def test_grid_taps_average_the_stage_maps_over_a_grid(backbone) -> None:  # noqa: ANN001
    # at 56 px the small-stem RegNetX-200MF maps are 28, 14, 7 and 4 px wide; 24 channels allow
    # 19 x 19 (uneven bins over 28), 56 allow 12 x 12 over 14, 152 the whole 7 x 7, 368 all 4 x 4
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (3, 3, 56, 56), generator=g, dtype=torch.uint8)
    taps = extract_layers(backbone, images, ["grids"], transform=to_float, batch_size=2)
    with torch.no_grad():
        maps = backbone.forward_maps(to_float(images))
    for fmap, side, (name, tap) in zip(maps, [19, 12, 7, 4], taps.items(), strict=True):
        assert tap.shape == (3, fmap.shape[1] * side * side), name
        torch.testing.assert_close(tap, _adaptive_bins(fmap, side), rtol=1e-5, atol=1e-5)


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
