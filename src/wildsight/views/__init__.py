"""Views: batched, seeded multi-crop augmentation on the training device.

from wildsight.views import make_views, default_views
views = make_views(images, default_views(224, "swav"), generator)  # 8 float views
"""

from wildsight.views.multicrop import (
    AugmentSpec,
    CropGroup,
    SpecError,
    ViewParams,
    ViewSpec,
    apply_view,
    eval_view,
    make_views,
    sample_view_params,
)
from wildsight.views.presets import (
    BYOL_VIEWS,
    PRESETS,
    SEER_VIEWS,
    SIMCLR_VIEWS,
    SWAV_VIEWS,
    default_views,
)

__all__ = [
    "AugmentSpec",
    "BYOL_VIEWS",
    "CropGroup",
    "PRESETS",
    "SEER_VIEWS",
    "SIMCLR_VIEWS",
    "SWAV_VIEWS",
    "SpecError",
    "ViewParams",
    "ViewSpec",
    "apply_view",
    "default_views",
    "eval_view",
    "make_views",
    "sample_view_params",
]
