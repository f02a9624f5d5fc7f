"""make_views / eval_view: the contract the trainer and the methods rely on."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from wildsight.views import (
    AugmentSpec,
    CropGroup,
    ViewSpec,
    eval_view,
    make_views,
    ops,
    sample_view_params,
)

NO_AUGMENT = AugmentSpec(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
SMALL = ViewSpec(
    (
        CropGroup(count=2, size=40, scale=(0.3, 1.0)),
        CropGroup(count=3, size=16, scale=(0.05, 0.3), augment=replace(NO_AUGMENT, solarize_p=0.5)),
    )
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8(n: int = 4, c: int = 3, h: int = 48, w: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=_gen(seed), dtype=torch.uint8)


def test_shapes_dtypes_order():
    views = make_views(_uint8(), SMALL, _gen())
    assert [tuple(v.shape) for v in views] == [(4, 3, 40, 40)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in views)
    assert SMALL.num_views == 5 and SMALL.num_global == 2


def test_same_seed_same_views_other_seed_other_views():
    images = _uint8()
    a, b, c = (make_views(images, SMALL, _gen(s)) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_views_of_one_call_differ():
    views = make_views(_uint8(), SMALL, _gen())
    assert not torch.equal(views[0], views[1])


def test_draws_do_not_depend_on_probabilities():
    # the generator advances by a fixed amount per view, so flip_p = 1 mirrors exactly the
    # crops that flip_p = 0 gives for the same seed
    group = CropGroup(count=1, size=24, scale=(0.2, 1.0), augment=NO_AUGMENT)
    flipped = replace(group, augment=replace(NO_AUGMENT, flip_p=1.0))
    images = _uint8()
    plain = make_views(images, ViewSpec((group, group)), _gen(3))
    mirrored = make_views(images, ViewSpec((flipped, flipped)), _gen(3))
    for p, m in zip(plain, mirrored, strict=True):
        torch.testing.assert_close(m, p.flip(-1), atol=1e-4, rtol=0)  # normalised: x 1/0.225


def test_whole_image_crop_without_augmentation_is_the_eval_view():
    spec = ViewSpec(
        (CropGroup(count=1, size=64, scale=(1.0, 1.0), ratio=(1, 1), augment=NO_AUGMENT),)
    )
    images = _uint8(h=48, w=48)
    (view,) = make_views(images, spec, _gen())
    torch.testing.assert_close(view, eval_view(images, 64), atol=1e-4, rtol=0)


def test_view_equals_the_ops_applied_by_hand():
    group = CropGroup(
        count=1,
        size=32,
        scale=(0.2, 0.9),
        augment=AugmentSpec(blur_p=1.0, solarize_p=0.5, grayscale_p=0.5, color_jitter_p=1.0),
    )
    images = _uint8(n=8)
    (view,) = make_views(images, ViewSpec((group,)), _gen(11))
    g = _gen(11)
    p = sample_view_params(group, 8, 48, 56, g)
    x = ops.resized_crop(images.float() / 255, p.boxes, 32)
    x = ops.hflip(x, p.flip)
    x = ops.color_jitter(x, p.jitter_factors, p.jitter_order)
    x = torch.where(p.grayscale.view(-1, 1, 1, 1), ops.grayscale(x).expand_as(x), x)
    x = ops.gaussian_blur(x, p.blur_sigma, ops.blur_kernel_size(32, 2.0))
    x = torch.where(p.solarize.view(-1, 1, 1, 1), ops.solarize(x), x)
    ref = ops.normalize(x, group.augment.mean, group.augment.std)
    torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grayscale_p, blur_p", [(1.0, 0.5), (0.5, 1.0), (1.0, 1.0)])
def test_ops_compose_when_some_apply_to_every_image(grayscale_p, blur_p):
    aug = replace(NO_AUGMENT, grayscale_p=grayscale_p, blur_p=blur_p, solarize_p=0.5, flip_p=1.0)
    spec = ViewSpec((CropGroup(count=2, size=32, scale=(0.5, 1.0), augment=aug),))
    views = make_views(_uint8(), spec, _gen())
    assert all(v.shape == (4, 3, 32, 32) and v.is_contiguous() for v in views)


def test_probabilities_are_per_image():
    group = CropGroup(
        count=1, size=8, scale=(1.0, 1.0), augment=replace(NO_AUGMENT, grayscale_p=0.3)
    )
    images = _uint8(n=2000, h=8, w=8)
    (view,) = make_views(images, ViewSpec((group,)), _gen())
    x = ops.denormalize(view, group.augment.mean, group.augment.std)
    gray = ((x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-5).float().mean().item()
    assert abs(gray - 0.3) < 0.04


def test_single_channel_input_gives_gray_rgb_views():
    views = make_views(_uint8(c=1), SMALL, _gen())
    for view in views:
        x = ops.denormalize(view, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        torch.testing.assert_close(x[:, 0], x[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(x[:, 0], x[:, 2], atol=1e-5, rtol=0)


def test_eval_view_resizes_and_normalises_without_randomness():
    images = _uint8(h=64, w=64)
    out = eval_view(images, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    ref = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, (ref - 0.5) / 0.5, atol=1e-5, rtol=0)
    assert torch.equal(out, eval_view(images, 32, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert eval_view(_uint8(c=1), 28).shape == (4, 3, 28, 28)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(2, 3, 8, 8), "uint8"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "empty batch"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), r"\[B, 3, H, W\]"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"\[B, 3, H, W\]"),
    ],
)
def test_bad_images_fail_in_one_line(images, match):
    with pytest.raises(ValueError, match=match):
        make_views(images, SMALL, _gen())
    with pytest.raises(ValueError, match=match):
        eval_view(images, 8)


def test_generator_is_required():
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        make_views(_uint8(), SMALL, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CropGroup(count=1, size=8, scale=(0.0, 1.0)), "crop scale"),
        (lambda: CropGroup(count=1, size=8, scale=(0.5, 0.2)), "crop scale"),
        (lambda: CropGroup(count=1, size=8, scale=(0.5, 1.5)), "crop scale"),
        (lambda: CropGroup(count=1, size=8, scale=(0.5,)), "crop scale"),
        (lambda: CropGroup(count=1, size=8, scale=(0.5, 1.0), ratio=(2, 1)), "crop ratio"),
        (lambda: CropGroup(count=0, size=8, scale=(0.5, 1.0)), "crop count"),
        (lambda: CropGroup(count=1, size=0, scale=(0.5, 1.0)), "crop size"),
        (lambda: AugmentSpec(flip_p=1.5), "flip_p"),
        (lambda: AugmentSpec(solarize_p=-0.1), "solarize_p"),
        (lambda: AugmentSpec(hue=0.6), "hue"),
        (lambda: AugmentSpec(contrast=-1), "contrast"),
        (lambda: AugmentSpec(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (lambda: AugmentSpec(std=(0.2, 0.0, 0.2)), "std"),
        (lambda: AugmentSpec(mean=(0.5, 0.5)), "mean"),
        (lambda: ViewSpec(()), "at least one"),
    ],
)
def test_validation_names_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_lists_become_tuples():
    group = CropGroup(count=1, size=8, scale=[0.2, 1.0], augment=AugmentSpec(blur_sigma=[0.1, 1.0]))
    spec = ViewSpec([group])
    assert group.scale == (0.2, 1.0) and group.augment.blur_sigma == (0.1, 1.0)
    assert isinstance(spec.groups, tuple) and hash(spec) == hash(ViewSpec((group,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_views_on_cuda():
    images = _uint8()
    cpu = make_views(images, SMALL, _gen(5))
    gpu = make_views(images.cuda(), SMALL, _gen(5))
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=0)


def test_a_process_crops_its_rows_by_their_own_aspect_ratios_as_one_process_does():
    """Whole images of several shapes: rank r of 2 (rows r, r + 2, ...) gets exactly the views
    one process makes of those rows of the whole batch, its aspects only known locally; the
    aspects change the crops (and 1 everywhere is the same as none)."""
    images, aspects = _uint8(n=8), torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0, 1.0, 0.75, 4.0])
    whole = make_views(images, SMALL, _gen(3), aspects=aspects)
    for rank in (0, 1):
        rows = torch.arange(rank, 8, 2)
        mine = make_views(images[rows], SMALL, _gen(3), rows=rows, num_rows=8,
                          aspects=aspects[rows])  # fmt: skip
        assert all(torch.equal(a[rows], b) for a, b in zip(whole, mine, strict=True))
    plain = make_views(images, SMALL, _gen(3))
    assert not torch.equal(plain[0][1], whole[0][1])  # row 1 shows a 2:1 picture
    ones = make_views(images, SMALL, _gen(3), aspects=torch.ones(8))
    assert all(torch.equal(a, b) for a, b in zip(plain, ones, strict=True))
    with pytest.raises(ValueError, match="aspects must be 8 ratios > 0"):
        make_views(images, SMALL, _gen(3), aspects=torch.zeros(8))
