"""Multi-crop views described as data: a ViewSpec is crop groups, each with its augmentation.

    views = make_views(images, spec, generator)   # uint8 [B, 3, H, W] -> list of float views

SwAV's multi-crop (Caron et al., 2020, §3.2): "we use two standard resolution crops and
sample V additional low resolution crops that cover only small parts of the image". Each
crop is: random resized crop, horizontal flip, colour jitter (random order), grayscale,
Gaussian blur, solarisation, normalisation -- in that order, as SwAV/SimCLR/BYOL's
torchvision pipelines. Parameters are drawn per image from the CPU generator passed in
(seeded from (seed, step, rank) by the trainer); the ops run batched on the images' device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from wildsight.views import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpecError(ValueError):
    """A bad field of a view spec: "crop count must be >= 1, got 0". `field` and `problem` let
    the config loader name the key path instead: "views.groups[0].count must be >= 1, got 0"."""

    def __init__(self, owner: str, field: str, problem: str):
        super().__init__(f"{owner} {field} {problem}")
        self.field, self.problem = field, problem


def _pair(value, owner: str, name: str) -> tuple:
    value = tuple(value)  # YAML gives lists; the spec stays hashable
    if len(value) != 2:
        raise SpecError(owner, name, f"must be a pair (lo, hi), got {value}")
    return value


@dataclass(frozen=True)
class AugmentSpec:
    """Photometric augmentation of one crop group; probabilities are per image."""

    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.8  # factor ~ U[max(0, 1 - x), 1 + x]
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2  # shift ~ U[-x, x], fraction of the colour circle, x <= 0.5
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output crop
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise SpecError("augment", name, f"must be a probability in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise SpecError("augment", name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise SpecError("augment", "hue", f"must be in [0, 0.5], got {self.hue}")
        sigma = _pair(self.blur_sigma, "augment", "blur_sigma")
        if not 0 < sigma[0] <= sigma[1]:
            raise SpecError("augment", "blur_sigma", f"must satisfy 0 < lo <= hi, got {sigma}")
        object.__setattr__(self, "blur_sigma", sigma)
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise SpecError("augment", name, f"must have 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise SpecError("augment", "std", f"must be > 0, got {self.std}")


@dataclass(frozen=True)
class CropGroup:
    """`count` crops of `size` x `size` pixels, each covering a `scale` fraction of the
    source image's area with aspect ratio (w / h) in `ratio`."""

    count: int
    size: int  # pixels
    scale: tuple[float, float]  # area fraction of the source image, 0 < lo <= hi <= 1
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise SpecError("crop", "count", f"must be >= 1, got {self.count}")
        if self.size < 1:
            raise SpecError("crop", "size", f"must be >= 1 pixel, got {self.size}")
        scale = _pair(self.scale, "crop", "scale")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise SpecError("crop", "scale", f"must satisfy 0 < lo <= hi <= 1, got {list(scale)}")
        ratio = _pair(self.ratio, "crop", "ratio")
        if not 0 < ratio[0] <= ratio[1]:
            raise SpecError("crop", "ratio", f"must satisfy 0 < lo <= hi, got {list(ratio)}")
        if not isinstance(self.augment, AugmentSpec):
            raise ValueError(f"crop augment must be an AugmentSpec, got {type(self.augment)}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)


@dataclass(frozen=True)
class ViewSpec:
    """Crop groups, global (large) crops first; views come out group by group."""

    groups: tuple[CropGroup, ...]

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups:
            raise SpecError("view", "groups", "must list at least one group")
        for group in groups:
            if not isinstance(group, CropGroup):
                raise ValueError(f"view groups must be CropGroups, got {type(group)}")
        object.__setattr__(self, "groups", groups)

    @property
    def num_views(self) -> int:
        return sum(group.count for group in self.groups)

    @property
    def num_global(self) -> int:
        """Views of the first group, plus those of the groups right after it that have the
        same crop size (BYOL's two 224 px views are two groups, to differ in augmentation)."""
        total = 0
        for group in self.groups:
            if group.size != self.groups[0].size:
                break
            total += group.count
        return total


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view of a batch of n images; CPU tensors."""

    boxes: Tensor  # [n, 4] int64 (top, left, height, width) in source pixels
    flip: Tensor  # [n] bool
    jitter: Tensor  # [n] bool, colour jitter applied
    jitter_factors: Tensor  # [n, 4] brightness, contrast, saturation factors; hue shift
    jitter_order: Tensor  # [n, 4] int64, a permutation of ops.BRIGHTNESS..HUE per image
    grayscale: Tensor  # [n] bool
    blur: Tensor  # [n] bool
    blur_sigma: Tensor  # [n] float32, pixels
    solarize: Tensor  # [n] bool


def sample_view_params(
    group: CropGroup, n: int, height: int, width: int, generator: torch.Generator,
    aspects: Tensor | None = None,
) -> ViewParams:  # fmt: skip
    """Draw one view's parameters; the draw count depends only on n, never on outcomes.
    aspects: float [n], width / height of the picture each image shows squashed (None: W / H)."""
    aug = group.augment
    boxes = ops.sample_crop_boxes(n, height, width, group.scale, group.ratio, generator, aspects)
    flip = ops.sample_bernoulli(n, aug.flip_p, generator)
    jitter = ops.sample_bernoulli(n, aug.color_jitter_p, generator)
    factors, order = ops.sample_color_jitter(
        n, aug.brightness, aug.contrast, aug.saturation, aug.hue, generator
    )
    gray = ops.sample_bernoulli(n, aug.grayscale_p, generator)
    blur = ops.sample_bernoulli(n, aug.blur_p, generator)
    sigma = ops.sample_uniform(n, aug.blur_sigma[0], aug.blur_sigma[1], generator)
    solar = ops.sample_bernoulli(n, aug.solarize_p, generator)
    return ViewParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solar)


def apply_view(source: Tensor | ops.ImagePyramid, params: ViewParams, group: CropGroup) -> Tensor:
    """One view [n, 3, size, size], normalised, from float [0, 1] images [n, 3, H, W]."""
    aug = group.augment
    x = ops.resized_crop(source, params.boxes, group.size, flip=params.flip)  # flip folded in
    x = ops.apply_where(
        x, params.jitter, ops.color_jitter, params.jitter_factors, params.jitter_order
    )
    x = ops.apply_where(x, params.grayscale, ops.grayscale_rgb)
    kernel_size = ops.blur_kernel_size(group.size, aug.blur_sigma[1])
    if kernel_size > 1:
        blur = lambda v, sigma: ops.gaussian_blur(v, sigma, kernel_size)  # noqa: E731
        x = ops.apply_where(x, params.blur, blur, params.blur_sigma)
    x = ops.apply_where(x, params.solarize, ops.solarize)
    return ops.normalize(x.contiguous(), aug.mean, aug.std)


def make_views(
    images: Tensor,
    spec: ViewSpec,
    generator: torch.Generator,
    *,
    rows: Tensor | None = None,
    num_rows: int | None = None,
    aspects: Tensor | None = None,
) -> list[Tensor]:
    """uint8 [B, 3, H, W] (or [B, 1, H, W], repeated to RGB) on any device -> spec.num_views
    tensors float32 [B, 3, size, size] on that device, group by group, view by view.

    All parameters come from `generator` (a CPU torch.Generator), so a seed gives the same
    views on every device. Upsampling (crop size above the box) is allowed.

    rows, num_rows: the images are rows `rows` (int64 [B]) of a batch of `num_rows`; the
    parameters of all `num_rows` are drawn and image i gets those of row rows[i]. A process of
    a distributed run thereby crops its share exactly as one process crops the whole global
    batch (train/parallel.py). Default: rows 0..B-1 of a batch of B.

    aspects: float [B], the width / height of the picture each image shows squashed to H x W
    (data.decode_whole); crops are then drawn with the picture's geometry (ops.sample_crop_boxes).
    None: each image is the picture itself. The draws do not depend on them.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"make_views needs a CPU torch.Generator, got {generator!r}")
    x = _to_unit_float(_check_images(images, "make_views"))  # [B, 3, H, W] in [0, 1]
    n, _, height, width = x.shape
    total = n if num_rows is None else num_rows
    if rows is not None and (rows.shape != (n,) or int(rows.min()) < 0 or int(rows.max()) >= total):
        raise ValueError(f"make_views rows must be {n} indices in [0, {total}), got {rows}")
    if aspects is not None and (aspects.shape != (n,) or not bool((aspects > 0).all())):
        raise ValueError(f"make_views aspects must be {n} ratios > 0, got {aspects}")
    every = None  # the aspects of all `total` rows (rows of other processes: 1, crops unused)
    if aspects is not None:
        every = torch.ones(total, dtype=torch.float64)
        every[torch.arange(n) if rows is None else rows] = aspects.detach().cpu().double()
    pyramid = ops.ImagePyramid(x)
    views = []
    for group in spec.groups:
        for _ in range(group.count):
            params = sample_view_params(group, total, height, width, generator, every)
            if rows is not None or total != n:
                picked = torch.arange(n) if rows is None else rows
                params = ViewParams(*(getattr(params, f.name)[picked] for f in fields(params)))
            views.append(apply_view(pyramid, params, group))  # [B, 3, size, size]
    return views


def eval_view(
    images: Tensor,
    size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, size, size]: the whole image resized (bilinear,
    antialiased; the aspect ratio is not kept) and normalised. No randomness."""
    if size < 1:
        raise ValueError(f"eval_view size must be >= 1 pixel, got {size}")
    x = _to_unit_float(_check_images(images, "eval_view"))  # [B, 3, H, W] in [0, 1]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return ops.normalize(x.contiguous(), mean, std)  # bilinear weights are >= 0: no overshoot


def _check_images(images: Tensor, caller: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, Tensor) else type(images)
        raise ValueError(f"{caller} needs uint8 images [B, 3, H, W], got {kind}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{caller} needs images shaped [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{caller} got an empty batch, shape {tuple(images.shape)}")
    return images


def _to_unit_float(images: Tensor) -> Tensor:
    x = images.float().div_(255.0)  # [B, C, H, W]
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
