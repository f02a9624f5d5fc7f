"""Published view recipes as plain values, and `default_views` for a method and image size.

Every preset is a frozen dataclass value: a config overrides any field with
`dataclasses.replace`, e.g. `replace(SWAV_VIEWS.groups[1], count=4)`.
"""

from __future__ import annotations

from dataclasses import replace

from wildsight.views.multicrop import AugmentSpec, CropGroup, ViewSpec

# SwAV (Caron et al., 2020), github.com/facebookresearch/swav main_swav.py and
# src/multicropdataset.py:
# size_crops 224/96, nmb_crops 2/6, min_scale 0.14/0.05, max_scale 1/0.14; colour distortion
# of strength 1 (jitter 0.8, 0.8, 0.8, 0.2 with p 0.8, grayscale p 0.2), PIL Gaussian blur
# p 0.5 with radius in [0.1, 2]. AugmentSpec's defaults are exactly this.
SWAV_AUGMENT = AugmentSpec()
SWAV_GLOBAL = CropGroup(count=2, size=224, scale=(0.14, 1.0), augment=SWAV_AUGMENT)
SWAV_LOCAL = CropGroup(count=6, size=96, scale=(0.05, 0.14), augment=SWAV_AUGMENT)
SWAV_VIEWS = ViewSpec((SWAV_GLOBAL, SWAV_LOCAL))

# SEER (Goyal et al., 2021, "Self-supervised Pretraining of Visual Features in the Wild"),
# training details: SwAV's augmentations with 2 x 224 + 4 x 96 crops.
SEER_VIEWS = ViewSpec((SWAV_GLOBAL, replace(SWAV_LOCAL, count=4)))

# SimCLR (Chen et al., 2020a), App. A: random crop (area 0.08-1, ratio 3/4-4/3) to 224, flip,
# colour distortion of strength s = 1 (jitter 0.8s, 0.8s, 0.8s, 0.2s, p 0.8; grayscale p 0.2),
# Gaussian blur p 0.5, sigma in [0.1, 2.0], kernel 10% of the image side. SimCLR v2 keeps it.
SIMCLR_AUGMENT = AugmentSpec(blur_p=0.5, blur_sigma=(0.1, 2.0))
SIMCLR_VIEWS = ViewSpec((CropGroup(count=2, size=224, scale=(0.08, 1.0), augment=SIMCLR_AUGMENT),))

# BYOL (Grill et al., 2020), App. B, Table 6: crop 0.08-1 to 224, flip p 0.5, colour jitter
# p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale p 0.2; the two
# views differ: blur p 1.0 / 0.1 (sigma in [0.1, 2.0], 23 x 23 kernel), solarise p 0.0 / 0.2.
BYOL_AUGMENT_1 = AugmentSpec(
    brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, blur_p=1.0, solarize_p=0.0
)
BYOL_AUGMENT_2 = replace(BYOL_AUGMENT_1, blur_p=0.1, solarize_p=0.2)
BYOL_VIEWS = ViewSpec(
    (
        CropGroup(count=1, size=224, scale=(0.08, 1.0), augment=BYOL_AUGMENT_1),
        CropGroup(count=1, size=224, scale=(0.08, 1.0), augment=BYOL_AUGMENT_2),
    )
)

# The pretext tasks of "Revisiting" (Kolesnikov et al., 2019), from its released configs
# (github.com/google/revisiting-self-supervised, config/*/imagenet.sh and preprocess.py).
# Rotation: Inception preprocessing at 224 px -- crop of area 0.05-1, ratio 3/4-4/3, flip,
# "fast" colour distortion (brightness +-32/255, saturation 0.5-1.5; brightness is a factor
# here, so 0.125 stands in for +-32/255), values in [-1, 1] (mean = std = 0.5).
REVISITING_AUGMENT = AugmentSpec(
    color_jitter_p=1.0, brightness=0.125, contrast=0.0, saturation=0.5, hue=0.0,
    grayscale_p=0.0, blur_p=0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)  # fmt: skip
ROTATION_VIEWS = ViewSpec(
    (CropGroup(count=1, size=224, scale=(0.05, 1.0), augment=REVISITING_AUGMENT),)
)
# Exemplar: 8 such copies of each image, grayscale with p 0.66 (the copies' standardisation
# is the method's `standardize`).
EXEMPLAR_VIEWS = ViewSpec(
    (
        CropGroup(
            count=8, size=224, scale=(0.05, 1.0),
            augment=replace(REVISITING_AUGMENT, grayscale_p=0.66),
        ),
    )
)  # fmt: skip
# Jigsaw and relative patch location: resize to 292 px, a random 255 px square crop (area
# (255 / 292)^2 = 0.763 of the image), grayscale p 0.66, no flip, no colour jitter. The method
# cuts 3 x 3 tiles from the crop (85 px cells, 64 px tiles) and standardises each tile.
PATCH_AUGMENT = AugmentSpec(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.66, blur_p=0.0)
JIGSAW_VIEWS = ViewSpec(
    (CropGroup(count=1, size=255, scale=(0.763, 0.763), ratio=(1.0, 1.0), augment=PATCH_AUGMENT),)
)
RPL_VIEWS = JIGSAW_VIEWS

PRESETS = {
    "swav": SWAV_VIEWS, "seer": SEER_VIEWS, "simclr": SIMCLR_VIEWS, "byol": BYOL_VIEWS,
    "rotation": ROTATION_VIEWS, "jigsaw": JIGSAW_VIEWS, "rpl": RPL_VIEWS,
    "exemplar": EXEMPLAR_VIEWS,
}  # fmt: skip

# Tiny images (side <= TINY_MAX_SIDE, e.g. Fashion-MNIST's 28 px): ours, not published, tunable.
# Global crops are upsampled to 32 px and local ones are 16 px; the scales are wider than the
# published ones because a 5% crop of a 28 px image is a 6 x 6 patch with nothing in it.
# Blur is off: at 32 px the 10% kernel is 3 taps, and blurring the few strokes of a
# Fashion-MNIST item removes most of what tells the classes apart.
TINY_MAX_SIDE = 64
TINY_GLOBAL_SIZE = 32
TINY_LOCAL_SIZE = 16
TINY_GLOBAL_SCALE = (0.25, 1.0)
TINY_LOCAL_SCALE = (0.1, 0.4)
TINY_LOCAL_COUNT = 4
TINY_BLUR_P = 0.0


# Pretext tasks on tiny images (ours, not published; measured on Fashion-MNIST, see the
# fmnist_* recipes). Jigsaw and RPL upsample the image to a 48 px crop: 16 px cells, 12 px
# tiles after a 4 px gap (0.25 of the cell), +-2 px jitter. Cut from a 32 px crop the tiles
# would be 8 px, of which a small-stem RegNet keeps one pixel after its second stage; the
# tiles are then as large in pixels as the whole 28 px item is in the exemplar and rotation
# views, and the encoder is evaluated at 48 px, the scale it learnt on. Flip is on (the
# puzzle does not change under it). Rotation and exemplar keep the tiny global crop.
TINY_PATCH_SIZE = 48
TINY_PATCH_VIEWS = ViewSpec(
    (
        CropGroup(
            count=1, size=TINY_PATCH_SIZE, scale=(0.5, 1.0),
            augment=replace(PATCH_AUGMENT, flip_p=0.5),
        ),
    )
)  # fmt: skip
TINY_PRESETS = {
    "rotation": ViewSpec(
        (
            CropGroup(
                count=1, size=TINY_GLOBAL_SIZE, scale=TINY_GLOBAL_SCALE,
                augment=replace(REVISITING_AUGMENT, brightness=0.4, contrast=0.4),
            ),
        )
    ),
    "jigsaw": TINY_PATCH_VIEWS,
    "rpl": TINY_PATCH_VIEWS,
    "exemplar": ViewSpec(
        (
            CropGroup(
                count=4, size=TINY_GLOBAL_SIZE, scale=(0.2, 1.0),
                augment=AugmentSpec(
                    brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.66,
                    blur_p=TINY_BLUR_P,
                ),
            ),
        )
    ),
}  # fmt: skip


def _tiny(spec: ViewSpec) -> ViewSpec:
    """The same recipe at tiny-image sizes: first-size groups -> global, others -> local."""
    groups = []
    for group in spec.groups:
        is_global = group.size == spec.groups[0].size
        groups.append(
            replace(
                group,
                size=TINY_GLOBAL_SIZE if is_global else TINY_LOCAL_SIZE,
                scale=TINY_GLOBAL_SCALE if is_global else TINY_LOCAL_SCALE,
                count=group.count if is_global else TINY_LOCAL_COUNT,
                augment=replace(group.augment, blur_p=TINY_BLUR_P),
            )
        )
    return ViewSpec(tuple(groups))


def default_views(image_size: int, method: str = "swav") -> ViewSpec:
    """The published views of `method` for images of side `image_size` (the loader's fixed
    side); images of side <= 64 px get the tiny-image variant (swav: 2 x 32 + 4 x 16 px;
    the pretext tasks: TINY_PRESETS)."""
    if method not in PRESETS:
        raise ValueError(f"unknown view preset {method!r}; choose from {sorted(PRESETS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1 pixel, got {image_size}")
    spec = PRESETS[method]
    if image_size <= TINY_MAX_SIDE:
        return TINY_PRESETS[method] if method in TINY_PRESETS else _tiny(spec)
    return spec
