"""What a run is before it starts: the config with its automatic choices filled in and the
combinations that cannot train refused, the device, and the seed of each step's crops."""

from __future__ import annotations

import dataclasses
import os

import torch

from wildsight import config as config_lib
from wildsight.config import Config
from wildsight.train import distributed
from wildsight.views import default_views

MAX_CROP_UPSAMPLING = 2.0  # a crop side may be at most this many times the loader's image side


def resolve_config(cfg: Config) -> Config:
    """Fills the automatic choices (image size, small stem, views) so config.yaml states them all,
    and refuses combinations that cannot train (no budget, crops far above the image size,
    fewer images per step than processes)."""
    data = cfg.data
    if data.image_size == 0:
        fmnist = all(s.startswith("fmnist") or "fashion" in s for s in data.sources)
        data = dataclasses.replace(data, image_size=28 if fmnist else 256)
    backbone = cfg.backbone
    if backbone.small_input is None:
        backbone = dataclasses.replace(backbone, small_input=data.image_size <= 64)
    views = cfg.views or default_views(data.image_size, cfg.method.name)
    t = cfg.train
    if t.steps is None and t.epochs is None and t.time_budget_s is None and not t.online:
        raise config_lib.ConfigError(
            "no training budget: give --steps, --epochs or --time-budget (or --online to train until stopped)"
        )
    if t.online and cfg.optim.schedule in ("cosine", "step"):
        raise config_lib.ConfigError(
            f"train.online runs without an end, so a {cfg.optim.schedule} schedule has nothing to "
            "decay to: use optim.schedule plateau (SEER online) or constant"
        )
    largest = max(group.size for group in views.groups)
    if largest > MAX_CROP_UPSAMPLING * data.image_size:
        raise config_lib.ConfigError(
            f"views: {largest} px crops are more than {MAX_CROP_UPSAMPLING:g}x the {data.image_size}"
            " px images the loader makes; lower the crop sizes or raise data.image_size"
        )
    processes = max(distributed.world_size(), int(os.environ.get("WORLD_SIZE") or 1))
    if t.batch_size < processes:
        raise config_lib.ConfigError(
            f"train.batch_size {t.batch_size} is the global batch and cannot be split over "
            f"{processes} processes; use --batch-size >= {processes}"
        )
    return dataclasses.replace(cfg, data=data, backbone=backbone, views=views)


def pick_device(name: str) -> torch.device:
    """The device a name gives: "auto" (CUDA if there is one, else CPU), "cpu", "cuda", "cuda:N"."""
    if not config_lib.DEVICE_PATTERN.fullmatch(name):
        raise config_lib.ConfigError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"
        )
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise config_lib.ConfigError(
            f"device {name!r} is not available here (no CUDA device); use 'cpu' or 'auto'"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise config_lib.ConfigError(
            f"device {name!r} is not available here: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return device


def view_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The crops of a step depend only on (seed, step, rank): a resumed run draws the same ones."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
