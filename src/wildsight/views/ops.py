"""Batched view operations: each op transforms a whole batch with per-sample parameters.

Every op is a small function of an image batch and explicit parameter tensors, so a test
can feed it known parameters; the samplers (`sample_*`) draw those parameters from an
explicit CPU `torch.Generator`. Images are float32 in [0, 1], shape [N, 3, H, W], on any
device; parameters are drawn and kept on the CPU and moved to the images' device only
where an op needs them, so the same seed gives the same views on every device and no
op waits on the device to decide which samples it touches.

Why kornia's functional pieces (`kornia.filters.gaussian_blur2d`; `kornia.color`'s HSV pair
is the tests' reference for `adjust_hue`, which does the same in one pass, 3x faster) but not
`kornia.augmentation`'s modules: the modules draw their parameters from the global torch RNG,
so the views of step t would depend on everything else that consumed random numbers before
it (model init, dropout, other workers); a run could not be resumed bit-identically, nor two
ranks made to draw different crops from a (seed, step, rank) generator. The functional
pieces are deterministic functions of their inputs.

Why per-image PIL ops are not used: SPEC §4, they run at ~100 img/s per core for colour
jitter on full images; here one op call covers the whole batch on the training device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as PIL's convert("L") and torchvision
CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params draws up to 10 boxes per image
# colour jitter ops, in the column order of the factor and order tensors
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
MIP_BIAS = 0.5  # mip level = floor(log2(shrink) + 0.5), see ImagePyramid


# --- samplers: parameters drawn on the CPU from an explicit generator ---------------------


def sample_bernoulli(n: int, p: float, generator: torch.Generator) -> Tensor:
    """[n] bool, each True with probability p; always draws n numbers (fixed stream layout)."""
    return torch.rand(n, generator=generator) < p


def sample_uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """[n] float32 uniform in [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    aspects: Tensor | None = None,
) -> Tensor:
    """Per-image crop boxes [n, 4] int64 as (top, left, box_height, box_width), in pixels.

    Vectorised torchvision `RandomResizedCrop.get_params`: up to 10 tries per image with
    area ~ U(scale) * H * W and aspect ratio w/h log-uniform in `ratio`; the first try that
    fits is kept, and an image where none fits gets the centre crop clamped to `ratio`.
    All 10 tries are drawn for every image so the generator advances by a fixed amount.

    aspects (float [n], default all 1): width / height of the picture each H x W image shows
    squashed (data.decode_whole). Area fractions survive the squash, aspect ratios are divided
    by it, so a box drawn with ratio r / a in the image is the box of ratio r of the picture:
    the crop, resized to its output size, is the one RandomResizedCrop takes from the picture.
    """
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * _rand64(n, CROP_TRIES, generator))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand64(n, CROP_TRIES, generator))
    shown = None if aspects is None else aspects.to(torch.float64).reshape(n, 1)  # [n, 1]
    if shown is not None:
        aspect = aspect / shown  # in the squashed image's pixels
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # [n, tries]
    h = torch.round(torch.sqrt(target_area / aspect)).long()  # [n, tries]
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, tries]
    first = fits.int().argmax(dim=1, keepdim=True)  # [n, 1] first fitting try (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # [n]
    u_top, u_left = _rand64(n, 1, generator).squeeze(1), _rand64(n, 1, generator).squeeze(1)
    top = torch.minimum((u_top * (height - h + 1)).long(), height - h)  # randint(0, H - h + 1)
    left = torch.minimum((u_left * (width - w + 1)).long(), width - w)
    boxes = torch.stack([top, left, h, w], dim=1)  # [n, 4]
    # fallback: the whole picture, trimmed to the nearest allowed aspect ratio, centred
    picture = (
        torch.full((n,), width / height, dtype=torch.float64) if shown is None else shown[:, 0]
    )
    fallback = _fallback_boxes(picture, height, width, ratio)  # [n, 4]
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def _fallback_boxes(picture: Tensor, height: int, width: int, ratio: tuple[float, float]) -> Tensor:
    """[n, 4] (top, left, h, w) in an H x W image of the centred box of the picture it shows
    (aspect `picture` [n] = its width / height; W / H when not squashed) trimmed to the nearest
    aspect in `ratio`: a too tall picture keeps its width and a height of width / ratio[0], a too
    wide one its height and a width of height x ratio[1], both scaled into the image's pixels."""
    fh = torch.where(picture < ratio[0], torch.round(picture * height / ratio[0]), float(height))
    fw = torch.where(picture > ratio[1], torch.round(ratio[1] * width / picture), float(width))
    fh, fw = fh.long().clamp(1, height), fw.long().clamp(1, width)
    return torch.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], dim=1)


def sample_cutout_boxes(
    n: int, height: int, width: int, side: float, generator: torch.Generator
) -> Tensor:
    """Cutout squares [n, 4] int64 (top, left, box_height, box_width) in pixels: a square of
    round(side * min(height, width)) px centred uniformly on the image, clipped at its borders
    (DeVries & Taylor, 2017, as FixMatch's strong view), so it may cover less near an edge."""
    if not 0.0 <= side <= 1.0:
        raise ValueError(f"cutout side must be a fraction of the image in [0, 1], got {side}")
    s = round(side * min(height, width))
    cy = torch.randint(0, height, (n,), generator=generator)
    cx = torch.randint(0, width, (n,), generator=generator)
    top, left = (cy - s // 2).clamp(min=0), (cx - s // 2).clamp(min=0)
    bottom, right = (cy - s // 2 + s).clamp(max=height), (cx - s // 2 + s).clamp(max=width)
    return torch.stack([top, left, (bottom - top).clamp(min=0), (right - left).clamp(min=0)], 1)


def sample_color_jitter(
    n: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Per-image jitter factors [n, 4] (columns BRIGHTNESS..HUE) and op order [n, 4].

    As torchvision's ColorJitter: brightness/contrast/saturation factors ~ U[max(0, 1-x), 1+x],
    hue shift ~ U[-hue, hue] (fraction of the colour circle), the four ops in a random order
    (here drawn per image: each row of `order` is a uniform random permutation of 0..3).
    """
    columns = [
        sample_uniform(n, max(0.0, 1.0 - x), 1.0 + x, generator)
        for x in (brightness, contrast, saturation)
    ]
    columns.append(sample_uniform(n, -hue, hue, generator))
    factors = torch.stack(columns, dim=1)  # [n, 4]
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # [n, 4] permutations
    return factors, order


def _rand64(n: int, k: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, k, generator=generator, dtype=torch.float64)  # [n, k]


# --- geometry ---------------------------------------------------------------------------


class ImagePyramid:
    """Power-of-two mip levels of an image batch, built on demand and shared by all views.

    Level k is level k-1 area-averaged by 2 (exact 2x2 means when the side is even). A crop
    shrunk by d >= sqrt(2) samples level round(log2 d), so bilinear sampling is left with a
    shrink in [0.71, 1.41) and skips no pixel. Measured (RMS error against
    `F.interpolate(antialias=True)` of the box, on a zone plate / white noise / 1/f image,
    512 px source): plain bilinear 0.18 / 0.14 / 0.025 at 2.3x and 0.22 / 0.18 / 0.043 at
    5.3x; mip 0.061 / 0.049 / 0.010 and 0.032 / 0.026 / 0.009; worst case 0.10 / 0.08 /
    0.016 at 1.5x. The published presets on 256 px inputs never shrink by sqrt(2), so they
    pay nothing; a 512 px source costs one 2x2 pooling plus a re-sample of the shrunk crops.
    (Mipmapping without the trilinear blend between levels.)
    """

    def __init__(self, images: Tensor) -> None:
        self.levels = [images]  # level 0: [B, 3, H, W] float

    def level(self, k: int) -> Tensor:
        while len(self.levels) <= k:
            prev = self.levels[-1]
            h, w = prev.shape[-2:]
            if h % 2 == 0 and w % 2 == 0:
                self.levels.append(F.avg_pool2d(prev, 2))
            else:  # adaptive bins keep the image's extent, so normalised coordinates still hold
                self.levels.append(F.adaptive_avg_pool2d(prev, (-(-h // 2), -(-w // 2))))
        return self.levels[k]


def crop_theta(boxes: Tensor, height: int, width: int, flip: Tensor | None = None) -> Tensor:
    """Affine matrices [n, 2, 3] taking output coordinates to the boxes, for `F.affine_grid`.

    With align_corners=False, the box [left, left + w) x [top, top + h) in pixels spans
    x in [2 left / W - 1, 2 (left + w) / W - 1] in normalised coordinates, so
    x_in = (w / W) x_out + (2 left + w) / W - 1 (and likewise for y). A horizontal flip
    negates the x scale, which mirrors the output for free.
    """
    top, left, h, w = boxes.double().unbind(dim=1)  # [n] each
    theta = torch.zeros(boxes.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    if flip is not None:
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
    return theta.float()


def resized_crop(
    images: Tensor | ImagePyramid,
    boxes: Tensor,
    size: int,
    flip: Tensor | None = None,
    antialias: bool = True,
) -> Tensor:
    """Crop each image to its box and resize to [n, 3, size, size] (bilinear).

    One `F.grid_sample` per pyramid level used (the grid `F.affine_grid` would give); equal to
    `F.interpolate(box, size, mode="bilinear", align_corners=False)` of each box, except
    at the box edge when upsampling (grid_sample reads the pixel outside the box where
    interpolate repeats the edge one). With `antialias`, boxes shrunk by sqrt(2) or more are
    sampled from the matching `ImagePyramid` level (see its docstring).
    """
    pyramid = images if isinstance(images, ImagePyramid) else ImagePyramid(images)
    base = pyramid.level(0)  # [n, 3, H, W]
    height, width = base.shape[-2:]
    theta = crop_theta(boxes, height, width, flip).to(base.device)  # [n, 2, 3]
    shrink = boxes[:, 2:].max(dim=1).values.double() / size  # [n] > 1: downscaled
    levels = torch.zeros_like(shrink, dtype=torch.long)
    if antialias:
        max_level = int(math.log2(min(height, width)))
        levels = (
            torch.floor(torch.log2(shrink.clamp(min=1.0)) + MIP_BIAS).long().clamp(0, max_level)
        )
    # grid_sample's cost follows the output, not the source: sample every image at level 0,
    # then redo the (few) images that need a coarser level from that level alone
    out = _sample(base, theta, size)  # [n, 3, size, size]
    for k in torch.unique(levels).tolist():
        if k == 0:
            continue
        idx_d = (levels == k).nonzero().squeeze(1).to(base.device)  # [m]
        coarse = pyramid.level(k).index_select(0, idx_d)  # [m, 3, H / 2^k, W / 2^k]
        out.index_copy_(0, idx_d, _sample(coarse, theta[idx_d], size))
    return out


def _sample(images: Tensor, theta: Tensor, size: int) -> Tensor:
    # theta is axis-aligned, so the grid is an outer product of per-image x and y coordinates:
    # cheaper than F.affine_grid's [n, size^2, 3] x [n, 3, 2] matmul, and the same values.
    steps = (torch.arange(size, device=images.device, dtype=theta.dtype) * 2 + 1) / size - 1
    gx = theta[:, 0, 0, None] * steps + theta[:, 0, 2, None]  # [n, size] input x per column
    gy = theta[:, 1, 1, None] * steps + theta[:, 1, 2, None]  # [n, size] input y per row
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(  # grid [n, size, size, 2] (x, y)
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror the images where mask [n] (bool, CPU) is True. (make_views folds the flip into
    the crop's affine matrix instead; this is the standalone op.)"""
    return apply_where(images, mask, lambda x: x.flip(-1))


# --- photometric ops, images float [n, 3, H, W] in [0, 1] ---------------------------------


def grayscale(images: Tensor) -> Tensor:
    """Luma [n, 1, H, W] = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)."""
    r, g, b = images.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def grayscale_rgb(images: Tensor) -> Tensor:
    """[n, 3, H, W] with every channel the luma (RandomGrayscale keeps 3 channels)."""
    return grayscale(images).repeat(1, 3, 1, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """clamp(f x): a blend with black, as torchvision. factor [n] (f = 1: identity)."""
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """clamp(f x + (1 - f) m), m the mean luma of each image, as torchvision. factor [n]."""
    weights = images.new_tensor(GRAY_WEIGHTS)  # [3]
    mean = (images.mean(dim=(-2, -1)) @ weights).view(-1, 1, 1, 1)  # [n, 1, 1, 1] mean luma
    return _blend(images, mean, _per_sample(factor, images))


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """clamp(f x + (1 - f) luma(x)): f = 0 gives grayscale, f = 1 identity. factor [n]."""
    return _blend(images, grayscale(images), _per_sample(factor, images))


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by shift [n] (fraction of the colour circle, in [-0.5, 0.5]).

    Same result as rgb_to_hsv -> hue + shift -> hsv_to_rgb (torchvision's adjust_hue; tested
    against kornia.color's pair) in one pass, 3x faster on CPU: a hue rotation keeps each
    pixel's max and min channel, so with h in sextants [0, 6),
    channel_c = min + (max - min) * clamp(|(h + k_c) mod 6 - 3| - 1, 0, 1), k = (0, 4, 2).
    """
    top, bottom = images.amax(dim=1), images.amin(dim=1)  # [n, H, W]
    delta = top - bottom  # [n, H, W], 0 for gray pixels (their hue is irrelevant)
    r, g, b = images.unbind(dim=1)  # [n, H, W] each; ties pick R then G, as rgb_to_hsv
    h = torch.where(top == r, g - b, torch.where(top == g, b - r + 2 * delta, r - g + 4 * delta))
    h = h.div_(torch.where(delta > 0, delta, 1.0))  # [n, H, W] sextants in [-1, 5]
    h = h.add_(6.0 * shift.to(images.device, images.dtype).view(-1, 1, 1))
    phase = torch.tensor([0.0, 4.0, 2.0], dtype=images.dtype).to(images.device).view(1, 3, 1, 1)
    ramp = (h.unsqueeze(1) + phase).remainder_(6.0).sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return ramp.mul_(delta.unsqueeze(1)).add_(bottom.unsqueeze(1))  # [n, 3, H, W]


_JITTER_OPS = {
    BRIGHTNESS: adjust_brightness,
    CONTRAST: adjust_contrast,
    SATURATION: adjust_saturation,
    HUE: adjust_hue,
}


def color_jitter(images: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Apply the four jitter ops to every image, image i in the order order[i] ([n, 4]).

    Images are grouped by their permutation (24 at most): each group is gathered once, runs
    its four ops and is written back once, with factors[:, op] as each op's factor.
    """
    code = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)  # [n] one id per permutation
    out = images.clone()
    for perm_code in torch.unique(code).tolist():
        idx = (code == perm_code).nonzero().squeeze(1)  # [m] CPU
        idx_d = idx.to(images.device)
        x = images.index_select(0, idx_d)  # [m, 3, H, W]
        for op in order[idx[0]].tolist():
            x = _JITTER_OPS[op](x, factors[idx, op])
        out.index_copy_(0, idx_d, x)
    return out


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur image i with an isotropic Gaussian of std sigma[i] pixels, reflect padding.

    kernel_size is odd; the kernel is truncated there and renormalised. kornia builds one
    separable kernel per image (measured as fast as our own grouped conv on CPU).
    """
    # a CPU sigma lets kornia check sigma > 0 without waiting on the device
    sigma_xy = sigma.float().unsqueeze(1).expand(-1, 2).contiguous()  # [n, 2] (y, x)
    return gaussian_blur2d(images, (kernel_size, kernel_size), sigma_xy, border_type="reflect")


def blur_kernel_size(crop_size: int, max_sigma: float) -> int:
    """Odd kernel side: SimCLR's 10% of the crop (23 for 224), but no wider than +-3 max_sigma
    (13 for sigma 2), where the cut tails hold 0.27% of the weight; the time is linear in
    the side. 1 (no blur) for crops under 30 px."""
    ten_percent = int(0.1 * crop_size) // 2 * 2 + 1
    return min(ten_percent, 2 * math.ceil(3 * max_sigma) + 1)


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """x if x < threshold else 1 - x (BYOL's solarisation on [0, 1] images)."""
    return torch.where(images >= threshold, 1.0 - images, images)


def cutout(images: Tensor, boxes: Tensor, fill: float = 0.0) -> Tensor:
    """Fill the box (top, left, box_height, box_width) of each image [n, C, H, W] with `fill`,
    in place; boxes [n, 4] int64 as from `sample_cutout_boxes`."""
    n, _, height, width = images.shape
    b = boxes.to(images.device)
    rows = torch.arange(height, device=images.device).view(1, height, 1)  # [1, H, 1]
    cols = torch.arange(width, device=images.device).view(1, 1, width)  # [1, 1, W]
    top, left, bh, bw = (b[:, i].view(n, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)  # [n, H, W]
    return images.masked_fill_(inside.unsqueeze(1), fill)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel, in place on `images`."""
    m, s = _channel_stats(images, mean, std)
    return images.sub_(m).div_(s)


def denormalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Inverse of `normalize`: x std + mean (out of place)."""
    m, s = _channel_stats(images, mean, std)
    return images * s + m


# --- helpers -----------------------------------------------------------------------------


def apply_where(images: Tensor, mask: Tensor, fn, *params: Tensor) -> Tensor:
    """Return images with fn(images[mask], *params[mask]) written where mask [n] (CPU bool) is
    True. The op only runs on the selected images; `images` is modified in place."""
    idx = mask.nonzero().squeeze(1)  # [m] CPU
    if idx.numel() == 0:
        return images
    if idx.numel() == images.shape[0]:
        return fn(images, *params)
    idx_d = idx.to(images.device)
    picked = fn(images.index_select(0, idx_d), *(p[idx] for p in params))
    return images.index_copy_(0, idx_d, picked)


def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    return values.to(images.device, images.dtype).view(-1, 1, 1, 1)  # [n, 1, 1, 1]


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * images + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _channel_stats(images: Tensor, mean: tuple, std: tuple) -> tuple[Tensor, Tensor]:
    m = torch.tensor(mean, dtype=images.dtype).to(images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).to(images.device).view(1, -1, 1, 1)
    return m, s
