"""Published presets hold the papers' numbers; default_views picks them by method and size."""

import pytest
import torch

from wildsight.views import (
    BYOL_VIEWS,
    SEER_VIEWS,
    SIMCLR_VIEWS,
    SWAV_VIEWS,
    default_views,
    make_views,
    presets,
)


def _layout(spec):
    return [(g.count, g.size, g.scale) for g in spec.groups]


def test_published_crop_layouts():
    assert _layout(SWAV_VIEWS) == [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]
    assert _layout(SEER_VIEWS) == [(2, 224, (0.14, 1.0)), (4, 96, (0.05, 0.14))]
    assert _layout(SIMCLR_VIEWS) == [(2, 224, (0.08, 1.0))]
    assert _layout(BYOL_VIEWS) == [(1, 224, (0.08, 1.0)), (1, 224, (0.08, 1.0))]
    assert (SWAV_VIEWS.num_views, SWAV_VIEWS.num_global) == (8, 2)
    assert (SEER_VIEWS.num_views, SEER_VIEWS.num_global) == (6, 2)
    assert (BYOL_VIEWS.num_views, BYOL_VIEWS.num_global) == (2, 2)


def test_published_augmentations():
    for spec in (SWAV_VIEWS, SEER_VIEWS, SIMCLR_VIEWS):
        for group in spec.groups:
            a = group.augment
            assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.8, 0.8, 0.8, 0.2)
            assert (a.color_jitter_p, a.grayscale_p, a.blur_p, a.solarize_p) == (0.8, 0.2, 0.5, 0.0)
            assert a.blur_sigma == (0.1, 2.0) and group.ratio == (3 / 4, 4 / 3)
    view1, view2 = (g.augment for g in BYOL_VIEWS.groups)
    assert (view1.brightness, view1.contrast, view1.saturation, view1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (view1.blur_p, view1.solarize_p) == (1.0, 0.0)
    assert (view2.blur_p, view2.solarize_p) == (0.1, 0.2)


def test_default_views_large_images_are_the_published_ones():
    assert default_views(224) == SWAV_VIEWS
    assert default_views(256, "seer") == SEER_VIEWS
    assert default_views(96, "byol") == BYOL_VIEWS


def test_default_views_tiny_images():
    spec = default_views(28, "swav")
    assert [(g.count, g.size) for g in spec.groups] == [(2, 32), (4, 16)]
    assert spec.groups[0].scale == presets.TINY_GLOBAL_SCALE
    assert spec.groups[1].scale == presets.TINY_LOCAL_SCALE
    assert all(g.augment.blur_p == presets.TINY_BLUR_P for g in spec.groups)
    byol = default_views(32, "byol")
    assert [(g.count, g.size) for g in byol.groups] == [(1, 32), (1, 32)]
    assert [g.augment.solarize_p for g in byol.groups] == [0.0, 0.2]
    assert [(g.count, g.size) for g in default_views(64, "simclr").groups] == [(2, 32)]


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown view preset 'dino'; choose from \['byol'"):
        default_views(224, "dino")


@pytest.mark.parametrize("method", sorted(presets.PRESETS))
def test_every_preset_runs(method):
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    spec = default_views(28, method)
    views = make_views(images, spec, torch.Generator().manual_seed(0))
    assert len(views) == spec.num_views
    assert all(torch.isfinite(v).all() for v in views)
