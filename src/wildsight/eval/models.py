"""Models and data for evaluation, from run directories and sources; fine-tuned models on disk.

* ``load_encoder(run)``: a run's backbone (latest checkpoint, or random init) with the input
  transform it was trained for (``Encoder``);
* ``load_images(source)``: a whole labelled source in memory (uint8), its class names;
* ``build_encoder(cfg, backbone, keep_head_layers, state)``: the module to fine-tune, the
  backbone or (SimCLR v2, "fine-tune from a middle layer of the projection head") backbone + the
  first head layers of the pretrained method;
* ``save_classifier`` / ``load_classifier``: a fine-tuned classifier as a folder,

    DIR/model.safetensors   Classifier.state_dict() (encoder + head), never pickle
    DIR/classifier.json     {"format", "config" (the pretrain run's resolved config),
                             "keep_head_layers", "feature_dim", "num_classes", "classes",
                             "run" (the pretrain run directory), "labels" (source, fraction,
                             seed of the labelled subset), "result"}

  self-contained: the architecture is rebuilt from the stored config, so the pretrain run is not
  needed to load it (only to start a student from the same run). Files are written under
  temporary names and renamed, the JSON last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from wildsight import config as config_lib
from wildsight.backbones import Backbone, build_backbone
from wildsight.config import Config
from wildsight.data import Loader, open_dataset
from wildsight.eval.finetune import Classifier, InputSpec
from wildsight.fileio import save_tensors_atomically, write_json
from wildsight.methods import build_method
from wildsight.train import checkpoint
from wildsight.views import eval_view

CLASSIFIER_FILES = ("classifier.json", "model.safetensors")  # what save_classifier writes
FORMAT = "wildsight-classifier/1"


@dataclass
class Encoder:
    """A backbone with the input transform it was trained for."""

    backbone: Backbone
    config: Config
    step: int  # training step of the weights; -1 = random init
    run_dir: Path | None
    weights_id: str = ""  # sha1 of the backbone weights loaded ("" = random init)
    checkpoint: Path | None = None  # the ckpt-* directory the weights came from

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
    """The backbone of a run directory (its latest checkpoint) or of one of its
    RUN/checkpoints/ckpt-* directories, built from the run's own config.

    Weights are read from safetensors only and loaded with strict=True; `random_init=True` gives
    the same architecture with freshly initialised weights (the reference row of every table).
    """
    run_dir, ckpt_path = _locate(run)
    cfg = config_lib.load(config_lib.read_yaml(run_dir / "config.yaml"))
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.backbone.name, small_input=bool(cfg.backbone.small_input))
    step, weights_id, ckpt = -1, "", None
    if not random_init:
        ckpt = _checkpoint_dir(ckpt_path)
        tensors, state = checkpoint.load_checkpoint(ckpt)
        model = checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]
        prefix = "backbone."
        weights = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
        _load_strict(backbone, weights, f"run {str(run_dir)!r}: the weights of {ckpt}",
                     f"config.yaml's backbone {cfg.backbone.name!r}")  # fmt: skip
        step = int(state["train"]["step"])
        weights_id = _weights_id(weights)
    backbone.eval()
    if cfg.backbone.channels_last:
        backbone.to(memory_format=torch.channels_last)
    return Encoder(backbone=backbone, config=cfg, step=step, run_dir=run_dir,
                   weights_id=weights_id, checkpoint=ckpt)  # fmt: skip


_CKPT_NAME = "ckpt-"


def run_directory(run: str | Path) -> Path:
    """The run directory of RUN or of one of its checkpoints/ckpt-* (where eval/ and the
    report go); ConfigError for anything else."""
    return _locate(run)[0]


def _locate(run: str | Path) -> tuple[Path, Path]:
    """(run directory, where its weights are): RUN -> (RUN, RUN/checkpoints);
    RUN/checkpoints/ckpt-N -> (RUN, that checkpoint)."""
    path = Path(run)
    if (path / "config.yaml").is_file():
        return path, path / "checkpoints"
    root = path.parent.parent
    if path.name.startswith(_CKPT_NAME) and path.is_dir() and (root / "config.yaml").is_file():
        return root, path
    raise config_lib.ConfigError(
        f"{str(run)!r} is not a wildsight run directory (no config.yaml); pass the --out of a "
        "pretrain run or one of its checkpoints/ckpt-* directories"
    )


def _checkpoint_dir(path: Path) -> Path:
    """The ckpt-* directory that `load_checkpoint(path)` reads (``latest`` followed), kept in
    Encoder.checkpoint so that heads (pretrained_state) come from the same checkpoint as the
    backbone; unresolvable = `path` (load_checkpoint then explains)."""
    if path.name.startswith(_CKPT_NAME):
        return path
    latest = checkpoint.latest_checkpoint(path) if path.is_dir() else None
    return latest if latest is not None and latest.is_dir() else path


def _weights_id(weights: dict[str, Tensor]) -> str:
    """sha1 of the tensors (names, dtypes, shapes, bytes): names these weights in cache keys."""
    digest = hashlib.sha1()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_strict(
    module: nn.Module, state: dict[str, Tensor], what: str, expected: str,
    remedy: str = "restore the config.yaml the run was trained with, or pass the run these "
    "weights belong to",
) -> None:  # fmt: skip
    """module.load_state_dict(state, strict=True), a mismatch told in one line (a few keys)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("other shape", shapes)) if keys]  # fmt: skip
        raise config_lib.ConfigError(
            f"{what} do not match {expected} ({'; '.join(parts)}); {remedy}"
        )
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class LabelledImages:
    """Every decodable image of a source, in source order: images uint8 [N, 3, S, S], labels [N]."""

    source: str
    images: Tensor
    labels: Tensor  # int64 [N], -1 = unknown
    classes: list[str] | None

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1


def load_images(source: str, image_size: int, *, labelled: bool = True) -> LabelledImages:
    """Decode a whole source into memory; `labelled` requires a class for every image."""
    dataset = open_dataset([source], image_size)
    batches = list(Loader(dataset, batch_size=1024, seed=0, shuffle=False, drop_last=False))
    if not batches:
        raise ValueError(f"no image of {source!r} could be decoded")
    images = torch.cat([b.images for b in batches])  # [N, 3, S, S]
    labels = torch.cat([b.labels for b in batches])  # [N]
    unknown = int((labels < 0).sum())
    if labelled and unknown:
        raise ValueError(
            f"{source!r}: {unknown:,} of {len(labels):,} images have no label; fine-tuning needs a "
            "labelled source (class sub-folders, a list of path<TAB>label, or fmnist:train)"
        )
    return LabelledImages(source, images, labels, dataset.classes)


def align_labels(
    classes: list[str] | None, other: LabelledImages, *, reference: str = "the training set"
) -> Tensor:
    """other's labels [M] in the class indices of `classes` (matched by class name). None on
    a side: labels that are bare numbers (tar shards without index.json), matched by number
    against numbers and refused against names (`protocols.check_class_names`)."""
    if classes is None or other.classes is None:
        from wildsight.eval.protocols import check_class_names

        check_class_names(reference, classes, other.source, other.classes)
        return other.labels
    if classes == other.classes:
        return other.labels
    missing = sorted(set(other.classes) - set(classes))
    if missing:
        raise ValueError(f"classes {missing[:5]} of {other.source!r} do not occur in {reference}")
    remap = torch.tensor([classes.index(name) for name in other.classes])
    return torch.where(other.labels >= 0, remap[other.labels.clamp(min=0)], other.labels)


def pretrained_state(run_dir: str | Path) -> dict[str, Tensor]:
    """The whole pretrained method's state dict (backbone AND heads) of a run's latest
    checkpoint, or of the checkpoint given (RUN/checkpoints/ckpt-N)."""
    path = Path(run_dir)
    ckpt = path / "checkpoints" if (path / "config.yaml").is_file() else path
    tensors, state = checkpoint.load_checkpoint(ckpt)
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]


def head_layers_to_keep(cfg: Any, requested: int | None) -> int:
    """How many projection-head layers go under the classifier: `requested`, or (None) the run's
    own `method.keep_head_layers`; 0 for methods without that option (swav, byol, ...)."""
    has_field = any(f.name == "keep_head_layers" for f in dataclasses.fields(cfg.method))
    if requested is None:
        return int(cfg.method.keep_head_layers) if has_field else 0
    if requested < 0:
        raise ValueError(f"keep_head_layers must be >= 0, got {requested}")
    if requested > 0 and not has_field:
        raise ValueError(
            f"method {cfg.method.name!r} has no projection-head layers to keep; "
            "--keep-head-layers needs a run pretrained with a method that has them (simclr)"
        )
    return requested


def build_encoder(
    cfg: Any, backbone: nn.Module, keep_head_layers: int, model_state: dict | None
) -> nn.Module:
    """The module to fine-tune: the backbone, or (SimCLR v2) backbone + the first
    `keep_head_layers` projection-head layers (see `head_layers_to_keep`). model_state: the
    pretrained method's state dict, loaded strictly; None = the heads at random init."""
    k = head_layers_to_keep(cfg, keep_head_layers)
    if k == 0:
        return backbone
    method = build_method(dataclasses.replace(cfg.method, keep_head_layers=k), backbone, cfg.views)
    if model_state is not None:
        _load_strict(method, model_state, "the pretrained weights",
                     f"the config's backbone {cfg.backbone.name!r} and method {cfg.method.name!r}")  # fmt: skip
    return method.encoder()


def save_classifier(out: str | Path, model: Classifier, meta: dict[str, Any]) -> Path:
    """Write `model` and `meta` (must hold "config" and "keep_head_layers") to the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    missing = {"config", "keep_head_layers"} - set(meta)
    if missing:
        raise ValueError(f"classifier metadata lacks {sorted(missing)}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    doc = {"format": FORMAT, "feature_dim": model.feature_dim, "num_classes": model.num_classes,
           **meta}  # fmt: skip
    # classifier.json goes first and comes back last: a kill in between leaves a folder that
    # load_classifier refuses (no classifier.json), never old metadata over new weights
    (out / "classifier.json").unlink(missing_ok=True)
    save_tensors_atomically(state, out / "model.safetensors")
    write_json(out / "classifier.json", doc)
    return out


def load_classifier(path: str | Path) -> tuple[Classifier, InputSpec, dict[str, Any]]:
    """(model in eval mode, its input, the metadata) of a folder written by `save_classifier`."""
    folder = Path(path)
    doc_path = folder / "classifier.json"
    if not doc_path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} holds no fine-tuned classifier (no classifier.json); write one with "
            "`wildsight eval finetune ... --save DIR`"
        )
    redo = "write it again with `wildsight eval finetune ... --save DIR`"
    try:
        meta = json.loads(doc_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{doc_path} is not readable JSON ({err}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{doc_path} has format {found!r}, expected {FORMAT!r}")
    missing = sorted({"config", "keep_head_layers", "feature_dim", "num_classes"} - set(meta))
    if missing:
        raise ValueError(f"{doc_path} lacks {missing}; {redo}")
    cfg = config_lib.load(meta["config"])
    backbone = build_backbone(cfg.backbone.name, small_input=bool(cfg.backbone.small_input))
    encoder = build_encoder(cfg, backbone, int(meta["keep_head_layers"]), model_state=None)
    model = Classifier(encoder, int(meta["feature_dim"]), int(meta["num_classes"]))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has classifier.json but no model.safetensors; {redo}"
        )
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors' own error type: a damaged or foreign file
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); {redo}") from None
    _load_strict(model, state, f"the weights in {weights}", "the classifier classifier.json "
                 "describes", remedy=redo)  # fmt: skip
    inputs = InputSpec.from_config(cfg)
    if inputs.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval(), inputs, meta
