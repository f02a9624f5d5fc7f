"""The typed Python API. The CLI is a thin layer over these functions, and the README uses them.

from wildsight import api, config
result = api.pretrain(config.load({"train": {"steps": 100}}))
probe = api.eval_linear("runs/pretrain", train="fmnist:train", test="fmnist:test")
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wildsight import config as config_lib
from wildsight.backbones import Backbone, build_backbone
from wildsight.config import Config
from wildsight.data import Loader, open_dataset
from wildsight.eval import ProbeResult, extract_features, knn_probe, linear_probe
from wildsight.train import checkpoint
from wildsight.train.trainer import TrainResult, pick_device, pretrain
from wildsight.views import eval_view

__all__ = [
    "Encoder",
    "embed",
    "eval_knn",
    "eval_linear",
    "load_encoder",
    "pretrain",
    "source_features",
]


@dataclass
class Encoder:
    """A backbone with the input transform it was trained for."""

    backbone: Backbone
    config: Config
    step: int  # training step of the weights; -1 = random init
    run_dir: Path | None

    @property
    def input_size(self) -> int:
        assert self.config.views is not None
        return self.config.views.groups[0].size

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> normalised float [B,3,s,s] at the size of the global crops."""
        assert self.config.views is not None
        aug = self.config.views.groups[0].augment
        view = eval_view(images, self.input_size, mean=aug.mean, std=aug.std)
        return view.contiguous(memory_format=self.memory_format)

    @property
    def memory_format(self) -> torch.memory_format:
        return (
            torch.channels_last if self.config.backbone.channels_last else torch.contiguous_format
        )


def load_encoder(run: str | Path, *, random_init: bool = False, seed: int = 0) -> Encoder:
    """The backbone of a run directory (its latest checkpoint), built from the run's own config.

    Weights are read from safetensors only and loaded with strict=True; `random_init=True` gives
    the same architecture with freshly initialised weights (the reference row of every table).
    """
    run_dir = Path(run)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise config_lib.ConfigError(
            f"{str(run)!r} is not a wildsight run directory (no config.yaml); pass the --out of a pretrain run"
        )
    cfg = config_lib.load(config_lib.read_yaml(cfg_path))
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.backbone.name, small_input=bool(cfg.backbone.small_input))
    step = -1
    if not random_init:
        tensors, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
        model = checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]
        prefix = "backbone."
        weights = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
        backbone.load_state_dict(weights, strict=True)
        step = int(state["train"]["step"])
    backbone.eval()
    if cfg.backbone.channels_last:
        backbone.to(memory_format=torch.channels_last)
    return Encoder(backbone=backbone, config=cfg, step=step, run_dir=run_dir)


def source_features(
    encoder: Encoder | None,
    source: str,
    *,
    image_size: int,
    device: str = "auto",
    batch_size: int = 512,
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 and labels [N] of a data source; encoder None = raw pixels in [0, 1].

    Features of a trained encoder are cached under `cache_dir` (default RUN_DIR/features), keyed
    by source, image size and checkpoint step, so probing again costs nothing.
    """
    dataset = open_dataset([source], image_size)
    cache = None
    if encoder is not None and encoder.step >= 0 and (cache_dir or encoder.run_dir):
        key = hashlib.sha1(
            f"{source}|{image_size}|{encoder.step}|{encoder.input_size}".encode()
        ).hexdigest()[:16]
        cache = Path(cache_dir or Path(encoder.run_dir or ".") / "features") / f"{key}.safetensors"
        if cache.is_file():
            saved = load_file(str(cache))
            return saved["features"], saved["labels"]
    images, labels = _all_images(
        dataset
    )  # uint8 [N, 3, S, S], int64 [N] (undecodable images dropped)
    if encoder is None:
        feats = (
            images[:, :1].flatten(1).float() / 255
            if _is_grey(images)
            else images.flatten(1).float() / 255
        )
    else:
        feats = extract_features(
            encoder.backbone, images, transform=encoder.transform, batch_size=batch_size,
            device=pick_device(device), precision="fp32",
        )  # fmt: skip
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp))
        tmp.replace(cache)
    return feats, labels


def _all_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    batches = list(Loader(dataset, batch_size=1024, seed=0, shuffle=False, drop_last=False))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def _is_grey(images: torch.Tensor) -> bool:
    return bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())


def _probe(kind: str, run: str | Path | None, train: str, test: str, *, random_init: bool = False,
           json_path: str | Path | None = None, device: str = "auto", **kwargs) -> ProbeResult:  # fmt: skip
    encoder = None if run is None else load_encoder(run, random_init=random_init)
    size = encoder.config.data.image_size if encoder else 28
    train_x, train_y = source_features(encoder, train, image_size=size, device=device)
    test_x, test_y = source_features(encoder, test, image_size=size, device=device)
    fn = linear_probe if kind == "linear" else knn_probe
    result = fn(train_x, train_y, test_x, test_y, **kwargs)
    if json_path is not None:
        write_json(json_path, {"probe": kind, "checkpoint": str(run), "train": train, "test": test,
                               "random_init": random_init, **result.to_dict()})  # fmt: skip
    return result


def eval_linear(run: str | Path | None, train: str, test: str, **kwargs) -> ProbeResult:
    """Full-batch L-BFGS logistic regression on frozen features (Kolesnikov et al., 2019)."""
    return _probe("linear", run, train, test, **kwargs)


def eval_knn(run: str | Path | None, train: str, test: str, **kwargs) -> ProbeResult:
    """Weighted k-NN on cosine similarity (k=20, T=0.07; Wu et al., 2018)."""
    return _probe("knn", run, train, test, **kwargs)


def embed(run: str | Path, data: str, out: str | Path, *, device: str = "auto") -> tuple[int, int]:
    """Writes the features of every image of `data` to a float32 .npy file [N, D]."""
    encoder = load_encoder(run)
    feats, _ = source_features(
        encoder, data, image_size=encoder.config.data.image_size, device=device
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, feats.numpy())
    tmp.replace(out)
    return tuple(feats.shape)  # type: ignore[return-value]


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# re-exported for `from wildsight.api import pretrain, TrainResult`
_ = (pretrain, TrainResult)
