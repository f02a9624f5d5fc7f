"""Each batched op against its formula, a plain per-image reference, or torch/kornia."""

import math

import pytest
import torch
import torch.nn.functional as F
from kornia.color import hsv_to_rgb, rgb_to_hsv

from wildsight.views import ops


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, h: int = 48, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=_gen(seed))  # [n, 3, h, w] in [0, 1]


# --- crop -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 40, 56])  # mild downscale (no mip), same size, upscale
def test_whole_image_box_equals_interpolate(size):
    x = _images(h=40, w=40)
    boxes = torch.tensor([[0, 0, 40, 40]] * 4)
    out = ops.resized_crop(x, boxes, size)
    ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sub_box_equals_interpolating_the_sub_box():
    x = _images(h=48, w=40)
    boxes = torch.tensor([[5, 7, 30, 26], [0, 0, 48, 40], [10, 3, 37, 37], [17, 14, 31, 26]])
    out = ops.resized_crop(x, boxes, 24, antialias=False)  # [4, 3, 24, 24]
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        box = x[i : i + 1, :, top : top + h, left : left + w]
        ref = F.interpolate(box, size=(24, 24), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_upsampled_sub_box_matches_interpolate_inside_the_edge():
    x = _images(h=48, w=40)
    boxes = torch.tensor([[5, 7, 20, 16]] * 4)
    out = ops.resized_crop(x, boxes, 48)
    ref = F.interpolate(x[:, :, 5:25, 7:23], size=(48, 48), mode="bilinear", align_corners=False)
    # grid_sample blends in the pixel just outside the box within half an input pixel of the
    # edge (interpolate repeats the edge pixel); everywhere else the two are the same
    torch.testing.assert_close(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5, rtol=0)


def test_folded_flip_equals_crop_then_flip():
    x = _images()
    boxes = torch.tensor([[5, 7, 30, 26]] * 4)
    flip = torch.tensor([True, False, True, False])
    folded = ops.resized_crop(x, boxes, 20, flip=flip)
    separate = ops.hflip(ops.resized_crop(x, boxes, 20), flip)
    torch.testing.assert_close(folded, separate, atol=1e-5, rtol=0)


def test_exact_2x_shrink_samples_the_2x2_means():
    x = _images(h=64, w=64)
    boxes = torch.tensor([[0, 0, 64, 64]] * 4)
    torch.testing.assert_close(
        ops.resized_crop(x, boxes, 32), F.avg_pool2d(x, 2), atol=1e-5, rtol=0
    )


def test_antialias_is_closer_to_an_antialiased_resize_on_noise():
    x = _images(n=2, h=128, w=128)
    boxes = torch.tensor([[0, 0, 128, 128], [16, 16, 96, 96]])
    ref = torch.cat(
        [
            F.interpolate(x[:1], size=(24, 24), mode="bilinear", antialias=True),
            F.interpolate(x[1:, :, 16:112, 16:112], size=(24, 24), mode="bilinear", antialias=True),
        ]
    )
    rmse = lambda a: (a - ref).pow(2).mean().sqrt().item()  # noqa: E731
    plain = rmse(ops.resized_crop(x, boxes, 24, antialias=False))
    mip = rmse(ops.resized_crop(x, boxes, 24))
    assert mip < 0.5 * plain, (mip, plain)


def test_sampled_boxes_respect_scale_ratio_and_bounds():
    n, height, width = 10_000, 200, 300
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = ops.sample_crop_boxes(n, height, width, scale, ratio, _gen())
    top, left, h, w = boxes.double().unbind(1)
    assert boxes.dtype == torch.int64 and boxes.shape == (n, 4)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # w and h are rounded to whole pixels, which moves area and ratio by at most half a pixel
    area = h * w / (height * width)
    slack = (h + w + 1) / (2 * height * width)
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    aspect = w / h
    assert (aspect >= ratio[0] * (1 - 1 / w - 1 / h)).all()
    assert (aspect <= ratio[1] * (1 + 1 / w + 1 / h)).all()
    # the box position is uniform: both extremes of the free range are reached
    assert (top == 0).any() and (top + h == height).any()
    assert (left == 0).any() and (left + w == width).any()


def test_box_area_and_log_ratio_are_uniform_when_no_try_is_rejected():
    n = 10_000
    boxes = ops.sample_crop_boxes(n, 256, 256, (0.05, 0.14), (3 / 4, 4 / 3), _gen(1))
    h, w = boxes[:, 2].double(), boxes[:, 3].double()
    area = h * w / 256**2
    assert abs(area.mean().item() - 0.095) < 0.002  # U(0.05, 0.14): mean 0.095, se 0.0003
    log_ratio = torch.log(w / h)
    assert abs(log_ratio.mean().item()) < 0.01  # symmetric around 0, se ~0.0017
    assert abs(log_ratio.std().item() - math.log(16 / 9) / math.sqrt(12)) < 0.01


def test_box_fallback_is_the_centre_crop_trimmed_to_the_ratio():
    # ratio >= 2 can never fit a full-area box in a square image: every try is rejected
    boxes = ops.sample_crop_boxes(8, 100, 100, (1.0, 1.0), (2.0, 3.0), _gen())
    assert boxes.tolist() == [[25, 0, 50, 100]] * 8


@pytest.mark.parametrize(
    ("width", "height", "scale"),
    [(300, 200, (0.08, 1.0)), (200, 320, (0.14, 1.0)), (400, 100, (1.0, 1.0))],  # last: fallback
)
def test_boxes_in_a_squashed_image_are_the_boxes_of_the_picture(width, height, scale):
    """A W x H picture stored squashed to S x S with its aspect W / H gets, draw for draw, the
    crops RandomResizedCrop takes from the picture itself: the same boxes as fractions of each
    side, up to the pixel rounding of both (the fallback included: 4:1 fits no 3:4-4:3 box)."""
    n, side, ratio = 4000, 200, (3 / 4, 4 / 3)
    picture = ops.sample_crop_boxes(n, height, width, scale, ratio, _gen(5)).double()
    aspects = torch.full((n,), width / height)
    squashed = ops.sample_crop_boxes(n, side, side, scale, ratio, _gen(5), aspects).double()
    as_fraction = picture / torch.tensor([height, width, height, width])
    got = squashed / side
    tolerance = 2.5 / min(side, width, height)  # rounding to pixels in either image
    assert (got - as_fraction).abs().max() < tolerance
    assert torch.equal(  # no aspects, or aspects of 1: the square image is the picture
        ops.sample_crop_boxes(64, side, side, scale, ratio, _gen(6)),
        ops.sample_crop_boxes(64, side, side, scale, ratio, _gen(6), torch.ones(64)),
    )


def test_box_sampling_is_seeded():
    a = ops.sample_crop_boxes(64, 100, 100, (0.1, 1.0), (0.75, 1.33), _gen(3))
    b = ops.sample_crop_boxes(64, 100, 100, (0.1, 1.0), (0.75, 1.33), _gen(3))
    c = ops.sample_crop_boxes(64, 100, 100, (0.1, 1.0), (0.75, 1.33), _gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- flips and photometric ops ----------------------------------------------------------


def test_flip_twice_is_identity_and_touches_only_the_mask():
    x = _images()
    mask = torch.tensor([True, False, True, True])
    once = ops.hflip(x.clone(), mask)
    assert torch.equal(once[1], x[1]) and torch.equal(once[0], x[0].flip(-1))
    assert torch.equal(ops.hflip(once, mask), x)


@pytest.mark.parametrize("op", [ops.adjust_brightness, ops.adjust_contrast, ops.adjust_saturation])
def test_factor_one_is_identity(op):
    x = _images()
    assert torch.equal(op(x, torch.ones(4)), x)


def test_brightness_contrast_saturation_formulas():
    x = _images().double()
    f = torch.tensor([0.0, 0.5, 1.3, 1.8], dtype=torch.float64)
    fb = f.view(-1, 1, 1, 1)
    luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # [n, 1, H, W]
    torch.testing.assert_close(ops.adjust_brightness(x, f), (fb * x).clamp(0, 1))
    mean = luma.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(ops.adjust_contrast(x, f), (fb * x + (1 - fb) * mean).clamp(0, 1))
    torch.testing.assert_close(ops.adjust_saturation(x, f), (fb * x + (1 - fb) * luma).clamp(0, 1))


def test_grayscale_uses_bt601_weights_and_equal_channels():
    x = torch.zeros(3, 3, 2, 2)
    for c in range(3):
        x[c, c] = 1.0  # pure red, green, blue
    gray = ops.grayscale(x)  # [3, 1, 2, 2]
    torch.testing.assert_close(gray[:, 0, 0, 0], torch.tensor([0.299, 0.587, 0.114]))
    view = ops.apply_where(_images(), torch.ones(4, dtype=torch.bool), ops.grayscale_rgb)
    assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])
    assert torch.equal(ops.adjust_saturation(x, torch.zeros(3)), ops.grayscale(x).expand_as(x))


def _hue_reference(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)  # hue in radians
    hue = torch.remainder(hsv[:, :1] + 2 * math.pi * shift.view(-1, 1, 1, 1), 2 * math.pi)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))


def test_hue_matches_the_hsv_round_trip():
    x = _images(n=6)
    x[0] = x[0, :1]  # a gray image: hue is undefined, must stay gray
    x[1] = torch.randint(0, 3, x[1].shape, generator=_gen()) / 2  # ties between channels
    shift = torch.tensor([0.3, -0.5, 0.5, 0.1, -0.2, 0.0])
    torch.testing.assert_close(
        ops.adjust_hue(x, shift), _hue_reference(x, shift), atol=1e-5, rtol=0
    )
    assert torch.equal(ops.adjust_hue(x, shift)[0, 0], ops.adjust_hue(x, shift)[0, 1])


def test_hue_zero_is_identity_and_opposite_shifts_round_trip():
    x = _images()
    torch.testing.assert_close(ops.adjust_hue(x, torch.zeros(4)), x, atol=1e-5, rtol=0)
    h = torch.tensor([0.1, 0.25, -0.4, 0.5])
    back = ops.adjust_hue(ops.adjust_hue(ops.adjust_hue(x, torch.zeros(4)), h), -h)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_color_jitter_applies_each_images_own_order():
    x = _images(n=32, h=8, w=8)
    factors, order = ops.sample_color_jitter(32, 0.8, 0.8, 0.8, 0.2, _gen(5))
    out = ops.color_jitter(x, factors, order)
    fns = [ops.adjust_brightness, ops.adjust_contrast, ops.adjust_saturation, ops.adjust_hue]
    for i in range(32):  # plain per-image reference loop
        ref = x[i : i + 1]
        for op in order[i].tolist():
            ref = fns[op](ref, factors[i : i + 1, op])
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-6, rtol=0)
    assert len({tuple(row) for row in order.tolist()}) > 10  # the order varies per image


def test_color_jitter_sampler_ranges():
    factors, order = ops.sample_color_jitter(10_000, 0.8, 0.4, 1.5, 0.1, _gen())
    lo, hi = factors.min(0).values, factors.max(0).values
    expected_lo, expected_hi = [0.2, 0.6, 0.0, -0.1], [1.8, 1.4, 2.5, 0.1]
    for c in range(4):
        assert expected_lo[c] <= lo[c] < expected_lo[c] + 0.01
        assert expected_hi[c] - 0.01 < hi[c] <= expected_hi[c]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(10_000, 4))
    # each op comes first about a quarter of the time
    first = torch.bincount(order[:, 0], minlength=4) / 10_000
    assert (first - 0.25).abs().max() < 0.02


def test_bernoulli_rate():
    assert abs(ops.sample_bernoulli(10_000, 0.2, _gen()).float().mean().item() - 0.2) < 0.015
    assert not ops.sample_bernoulli(100, 0.0, _gen()).any()
    assert ops.sample_bernoulli(100, 1.0, _gen()).all()


def test_solarize_formula():
    x = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.7, 1.0])
    torch.testing.assert_close(ops.solarize(x), torch.tensor([0.0, 0.2, 0.49, 0.5, 0.3, 0.0]))


def test_blur_tiny_sigma_is_identity_and_constants_are_kept():
    x = _images(h=32, w=32)
    torch.testing.assert_close(ops.gaussian_blur(x, torch.full((4,), 0.1), 5), x, atol=1e-6, rtol=0)
    const = torch.full((4, 3, 32, 32), 0.3)
    torch.testing.assert_close(ops.gaussian_blur(const, torch.full((4,), 2.0), 13), const)


def test_blur_uses_each_images_sigma():
    x = _images(n=2, h=64, w=64)
    out = ops.gaussian_blur(x, torch.tensor([0.5, 2.0]), 13)
    var = out.var(dim=(1, 2, 3))
    assert var[1] < var[0] < x.var(dim=(1, 2, 3))[0]
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=2e-3, rtol=0)
    single = ops.gaussian_blur(x[1:], torch.tensor([2.0]), 13)
    torch.testing.assert_close(out[1:], single)


def test_blur_kernel_size():
    assert ops.blur_kernel_size(224, 2.0) == 13  # 10% would be 23; 3 sigma is enough
    assert ops.blur_kernel_size(224, 5.0) == 23
    assert ops.blur_kernel_size(96, 2.0) == 9
    assert ops.blur_kernel_size(16, 2.0) == 1


def test_normalize_and_its_inverse():
    x = _images()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = ops.normalize(x.clone(), mean, std)
    torch.testing.assert_close(y[:, 1], (x[:, 1] - 0.456) / 0.224)
    torch.testing.assert_close(ops.denormalize(y, mean, std), x)


def test_apply_where_only_runs_on_the_mask():
    x = _images()
    mask = torch.tensor([False, True, False, True])
    seen = []
    out = ops.apply_where(
        x.clone(), mask, lambda v, f: seen.append(len(v)) or v * f.view(-1, 1, 1, 1), torch.zeros(4)
    )
    assert seen == [2]
    assert torch.equal(out[0], x[0]) and (out[1] == 0).all() and (out[3] == 0).all()


# --- cutout ------------------------------------------------------------------------------


def test_cutout_fills_exactly_each_images_box():
    x = _images(h=12, w=10)
    boxes = torch.tensor([[0, 0, 5, 5], [7, 6, 5, 4], [3, 2, 0, 0], [0, 0, 12, 10]])
    ref = x.clone()
    for i, (top, left, h, w) in enumerate(boxes.tolist()):  # per-image slicing reference
        ref[i, :, top : top + h, left : left + w] = -1.5
    out = ops.cutout(x.clone(), boxes, fill=-1.5)
    assert torch.equal(out, ref)


def test_cutout_boxes_are_the_clipped_square_around_a_uniform_centre():
    n, height, width, side = 4000, 28, 20, 0.5
    boxes = ops.sample_cutout_boxes(n, height, width, side, _gen())
    top, left, h, w = boxes.T
    s = round(side * min(height, width))  # 10 px
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert (h <= s).all() and (w <= s).all()
    # a box clipped on no side is the full square; its centre is then inside by s/2
    inner = (top > 0) & (top + h < height) & (left > 0) & (left + w < width)
    assert inner.any() and (h[inner] == s).all() and (w[inner] == s).all()
    # uniform centres: the clipped height is s on rows s/2 .. height - s/2 (18 of 28 rows)
    assert abs((h == s).double().mean().item() - (height - s + 1) / height) < 0.03
    empty = ops.sample_cutout_boxes(8, height, width, 0.0, _gen())
    assert (empty[:, 2] * empty[:, 3] == 0).all()
    with pytest.raises(ValueError, match="cutout side"):
        ops.sample_cutout_boxes(8, height, width, 1.5, _gen())
