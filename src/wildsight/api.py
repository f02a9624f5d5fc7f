"""The typed Python API. The CLI is a thin layer over these functions, and the README uses them.

from wildsight import api, config
result = api.pretrain(config.load({"train": {"steps": 100}}))
doc = api.eval_linear("runs/pretrain", train="fmnist:train", test="fmnist:test")  # doc["top1"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wildsight import config as config_lib
from wildsight.backbones import Backbone, build_backbone
from wildsight.config import Config
from wildsight.data import Loader, PackResult, open_dataset, write_shards
from wildsight.eval.distill import DEFAULT_DISTILL, DistillConfig
from wildsight.eval.distill import distill as distill_classifier
from wildsight.eval.features import PRE_LOGITS, extract_features, extract_layers, resolve_layers
from wildsight.eval.finetune import (
    DEFAULT_FINETUNE,
    Classifier,
    FinetuneConfig,
    InputSpec,
    feature_dim,
    finetune,
)
from wildsight.eval.html import save_result, write_report
from wildsight.eval.lowshot import (
    check_fraction,
    check_plan,
    check_seed,
    class_balanced_subset,
    run_lowshot,
    summarize,
)
from wildsight.eval.models import (
    LabelledImages,
    align_labels,
    build_encoder,
    head_layers_to_keep,
    load_classifier,
    load_images,
    pretrained_state,
    save_classifier,
)
from wildsight.eval.protocols import (
    LabelledFeatures,
    align_classes,
    headline_index,
    result_document,
    run_probes,
)
from wildsight.eval.report import confusion_matrix
from wildsight.fileio import write_atomically
from wildsight.train import checkpoint
from wildsight.train.trainer import TrainResult, pick_device, pretrain
from wildsight.views import eval_view

__all__ = [
    "Encoder",
    "distill",
    "embed",
    "eval_finetune",
    "eval_knn",
    "eval_linear",
    "eval_lowshot",
    "evaluate",
    "finetune_classifier",
    "load_encoder",
    "make_shards",
    "pretrain",
    "report",
    "source_features",
    "source_layers",
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
    layer: str = PRE_LOGITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 and labels [N] of a data source; encoder None = raw pixels in [0, 1].

    Features of a trained encoder are cached under `cache_dir` (default RUN_DIR/features), keyed
    by source, image size, checkpoint step and layer, so probing again costs nothing.
    """
    feats, labels, _ = source_layers(encoder, source, [layer], image_size=image_size,
                                     device=device, batch_size=batch_size, cache_dir=cache_dir)  # fmt: skip
    return feats[layer], labels


def source_layers(
    encoder: Encoder | None,
    source: str,
    layers: list[str],
    *,
    image_size: int,
    device: str = "auto",
    batch_size: int = 512,
    cache_dir: Path | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({layer: float32 [N, D_layer]}, labels int64 [N], dataset index int64 [N] of each row).

    Layers are names from `eval.features.layer_names` ("stage1" ... "pre_logits"); all missing
    ones come from one forward pass. Undecodable images are dropped, hence the row -> dataset
    index map. Raw pixels (encoder None) are the one layer "pre_logits".
    """
    if encoder is None and list(layers) != [PRE_LOGITS]:
        raise ValueError(
            f"raw pixels have no layers {list(layers)}; probe them with --layers {PRE_LOGITS}"
        )
    caches: dict[str, Path] = {}
    if encoder is not None and encoder.step >= 0 and (cache_dir or encoder.run_dir):
        base = f"{source}|{image_size}|{encoder.step}|{encoder.input_size}"
        for layer in layers:
            key = hashlib.sha1((base + ("" if layer == PRE_LOGITS else f"|{layer}")).encode())
            folder = Path(cache_dir or Path(encoder.run_dir or ".") / "features")
            caches[layer] = folder / f"{key.hexdigest()[:16]}.safetensors"
        if all(path.is_file() for path in caches.values()):
            saved = {layer: load_file(str(path)) for layer, path in caches.items()}
            first = saved[layers[0]]
            rows = first.get("indices", torch.arange(first["labels"].numel()))
            return {k: v["features"] for k, v in saved.items()}, first["labels"], rows
    images, labels, rows = _all_images(open_dataset([source], image_size))  # [N, 3, S, S], [N], [N]
    if encoder is None:
        pixels = images[:, :1] if _is_grey(images) else images
        feats = {PRE_LOGITS: pixels.flatten(1).float() / 255}
    else:
        feats = extract_layers(
            encoder.backbone, images, layers, transform=encoder.transform, batch_size=batch_size,
            device=pick_device(device), precision="fp32",
        )  # fmt: skip
    for layer, cache in caches.items():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"features": feats[layer].contiguous(), "labels": labels.contiguous(),
                   "indices": rows.contiguous()}, str(tmp))  # fmt: skip
        tmp.replace(cache)
    return feats, labels, rows


def _all_images(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    batches = list(Loader(dataset, batch_size=1024, seed=0, shuffle=False, drop_last=False))
    return (torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
            torch.cat([b.indices for b in batches]))  # fmt: skip


def _is_grey(images: torch.Tensor) -> bool:
    return bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())


def evaluate(
    protocol: str,
    run: str | Path,
    train: str,
    test: str,
    *,
    layers: list[str] | None = None,
    solver: str = "lbfgs",
    ks: list[int] | None = None,
    temperature: float = 0.07,
    random_init: bool = False,
    device: str = "auto",
    json_path: str | Path | None = None,
    name: str | None = None,
) -> dict:
    """Probe the frozen features of a run: protocol "linear" | "mlp" | "knn" | "transfer".

    One row per layer (``layers``: names or ["all"]; default the pre-logits) and per k (k-NN).
    "transfer" is the linear probe of a labelled source other than the pretraining data, for
    the pretrained backbone and the same backbone at random init. The document (rows, the
    headline row's top1 etc., confusion matrix, nearest-neighbour grid) is saved as
    RUN_DIR/eval/<name>.json, RUN_DIR/report.html is rebuilt, and ``json_path`` gets a copy.
    """
    started = time.perf_counter()
    encoder = load_encoder(run, random_init=random_init)
    chosen = resolve_layers(encoder.backbone, layers or [PRE_LOGITS])
    size = encoder.config.data.image_size
    run_dev = pick_device(device)
    features = [_labelled(encoder, src, chosen, size, device) for src in (train, test)]
    train_f, test_f = features[0], align_classes(*features)
    kind = "linear" if protocol == "transfer" else protocol
    label = "random init" if random_init else "pretrained"
    rows, results = run_probes(kind, train_f, test_f, layers=chosen, features_name=label, solver=solver,
                               ks=ks or [20], temperature=temperature, device=run_dev)  # fmt: skip
    headline = results[headline_index(rows)]
    if protocol == "transfer" and not random_init:
        reference = load_encoder(run, random_init=True)
        ref = [_labelled(reference, src, chosen, size, device) for src in (train, test)]
        more, _ = run_probes(kind, ref[0], align_classes(*ref), layers=chosen, features_name="random init",
                             solver=solver, device=run_dev)  # fmt: skip
        rows += more
    meta = {"checkpoint": str(run), "checkpoint_step": encoder.step, "random_init": random_init,
            "pretrained_on": list(encoder.config.data.sources)}  # fmt: skip
    if kind == "linear":
        meta["solver"] = solver
    doc = result_document(
        protocol, rows, headline, train_f, test_f, layer=rows[headline_index(rows)]["layer"], **meta
    )
    doc["elapsed_s"] = time.perf_counter() - started
    if name is None:  # e.g. "linear", "linear-sgd-layers", "knn-random-init"
        tags = {"sgd": kind == "linear" and solver == "sgd", "layers": len(chosen) > 1,
                "random-init": random_init}  # fmt: skip
        name = "-".join([protocol] + [tag for tag, on in tags.items() if on])
    save_result(run, name, doc)
    if json_path is not None:
        write_json(json_path, doc)
    return doc


def _labelled(
    encoder: Encoder, source: str, layers: list[str], size: int, device: str
) -> LabelledFeatures:
    feats, labels, rows = source_layers(encoder, source, layers, image_size=size, device=device)
    dataset = open_dataset([source], size)
    classes = list(dataset.classes or [str(c) for c in range(int(labels.max()) + 1)])

    def image(row: int) -> torch.Tensor:
        loaded = dataset.load(int(rows[row]))
        assert isinstance(loaded, torch.Tensor)  # rows index images that decoded before
        return loaded

    return LabelledFeatures(source, feats, labels, classes, image)


def eval_linear(run: str | Path, train: str, test: str, **kwargs) -> dict:
    """Logistic regression on frozen features: L-BFGS (Kolesnikov et al., 2019) or solver="sgd"."""
    return evaluate("linear", run, train, test, **kwargs)


def eval_knn(run: str | Path, train: str, test: str, **kwargs) -> dict:
    """Weighted k-NN on cosine similarity (ks=[20], T=0.07; Wu et al., 2018)."""
    return evaluate("knn", run, train, test, **kwargs)


def report(run: str | Path) -> Path:
    """(Re)build RUN_DIR/report.html from RUN_DIR/eval/*.json and RUN_DIR/metrics.jsonl."""
    return write_report(run)


def embed(
    run: str | Path, data: str, out: str | Path, *, device: str = "auto",
    keep_head_layers: int | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Writes the features of every image of `data` to a float32 .npy file [N, D]: the backbone's
    pre-logits, or (SimCLR v2's exported encoder) the output of the first `keep_head_layers`
    projection-head layers on top; None = the run's own `method.keep_head_layers`."""
    encoder = load_encoder(run)
    k = head_layers_to_keep(encoder.config, keep_head_layers)
    if k == 0:
        feats, _ = source_features(
            encoder, data, image_size=encoder.config.data.image_size, device=device
        )
    else:
        module = build_encoder(encoder.config, encoder.backbone, k, pretrained_state(run)).eval()
        images = _all_images(open_dataset([data], encoder.config.data.image_size))[0]
        feats = extract_features(module, images, transform=encoder.transform,
                                 device=pick_device(device))  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, feats.numpy())
    tmp.replace(out)
    return tuple(feats.shape)  # type: ignore[return-value]


def write_json(path: str | Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2) + "\n")


# re-exported for `from wildsight.api import pretrain, TrainResult`
_ = (pretrain, TrainResult)


def make_shards(
    data: list[str] | str,
    out: str | Path,
    *,
    shard_size: int,
    reencode: str = "none",
    workers: int = 0,
) -> PackResult:
    """Packs image sources into WebDataset tar shards OUT/shard-000000.tar ... + OUT/index.json.

    Every image is decoded once by wildsight's decoder; broken ones are left out and listed in
    OUT/skipped.tsv; good ones keep their bytes (reencode="none") or become PNG/JPEG. Stream the
    result with `--data OUT` or `--data 'OUT/shard-{000000..000099}.tar'` (data/shards.py).
    """
    return write_shards(data, out, shard_size=shard_size, reencode=reencode, workers=workers)


# ---- fine-tuning, low-shot, distillation: SEER's and SimCLR v2's label-efficiency protocols ----


def finetune_classifier(
    encoder: Encoder, num_classes: int, *, keep_head_layers: int | None = None
) -> tuple[Classifier, InputSpec, int]:
    """A new linear classifier on a run's encoder: the backbone, or backbone + the first
    `keep_head_layers` SimCLR v2 projection-head layers (None = the run's own setting).
    Returns (model, its input, the number of head layers kept)."""
    k = head_layers_to_keep(encoder.config, keep_head_layers)
    state = (
        pretrained_state(encoder.run_dir) if k and encoder.step >= 0 and encoder.run_dir else None
    )
    module = build_encoder(encoder.config, encoder.backbone, k, state)
    inputs = InputSpec.from_config(encoder.config)
    return Classifier(module, feature_dim(module, inputs), num_classes), inputs, k


def _labelled_sets(
    train: str, test: str, size: int
) -> tuple[LabelledImages, LabelledImages, torch.Tensor]:
    train_set, test_set = load_images(train, size), load_images(test, size)
    return train_set, test_set, align_labels(train_set.classes, test_set, reference=repr(train))


def _class_names(classes: list[str] | None, num_classes: int) -> list[str]:
    return list(classes) if classes else [str(c) for c in range(num_classes)]


def eval_finetune(
    run: str | Path, train: str, test: str, *, fraction: float | None = None, seed: int = 0,
    random_init: bool = False, keep_head_layers: int | None = None,
    config: FinetuneConfig = DEFAULT_FINETUNE, json_path: str | Path | None = None,
    save_dir: str | Path | None = None, name: str | None = None,
) -> dict:  # fmt: skip
    """Fine-tune the whole network of a run on the labels of `train` (all of them, or the
    class-balanced `fraction` fixed by `seed`) and report the test accuracy once. The document is
    saved as RUN_DIR/eval/<name>.json (report rebuilt), the model in `save_dir` (a teacher for
    `distill`)."""
    started = time.perf_counter()
    check_seed(seed)
    if fraction is not None:
        check_fraction(fraction)
    encoder = load_encoder(run, random_init=random_init, seed=seed)
    train_set, test_set, test_y = _labelled_sets(train, test, encoder.config.data.image_size)
    idx = (torch.arange(len(train_set.labels)) if fraction is None
           else class_balanced_subset(train_set.labels, fraction, seed))  # fmt: skip
    model, inputs, k = finetune_classifier(
        encoder, train_set.num_classes, keep_head_layers=keep_head_layers
    )
    result = finetune(model, train_set.images[idx], train_set.labels[idx], test_set.images, test_y,
                      inputs=inputs, cfg=dataclasses.replace(config, seed=seed))  # fmt: skip
    features = "random init" if random_init else "pretrained"
    labels = {"source": train, "fraction": fraction, "seed": seed, "num_labels": len(idx)}
    meta = {"checkpoint": str(run), "checkpoint_step": encoder.step, "random_init": random_init,
            "keep_head_layers": k, "labels": labels}  # fmt: skip
    classes = _class_names(train_set.classes, train_set.num_classes)
    assert result.predictions is not None
    doc = {"protocol": "finetune", **meta, "train": train, "test": test,
           "rows": [{"features": features, "fraction": fraction, "seed": seed, **result.to_dict()}],
           "top1": result.top1,
           "confusion": {"labels": classes, "of": f"fine-tuned, {features}", "counts": confusion_matrix(
               test_y, result.predictions, range(len(classes)))},
           "elapsed_s": time.perf_counter() - started}  # fmt: skip
    if name is None:
        name = (
            "finetune"
            + (f"-{fraction:g}" if fraction else "")
            + ("-random-init" if random_init else "")
        )
    save_result(run, name, doc)
    if json_path is not None:
        write_json(json_path, doc)
    if save_dir is not None:
        save_classifier(save_dir, model, {**meta, "run": str(run), "classes": classes,
                                          "config": config_lib.to_dict(encoder.config),
                                          "result": result.to_dict()})  # fmt: skip
    return doc


def eval_lowshot(
    run: str | Path, train: str, test: str, *, fractions: Sequence[float] = (0.01, 0.1),
    seeds: int = 3, protocol: str = "finetune", keep_head_layers: int | None = None,
    config: FinetuneConfig = DEFAULT_FINETUNE, json_path: str | Path | None = None,
    name: str = "lowshot",
) -> dict:  # fmt: skip
    """Low-shot table: for each fraction and seed 0 .. seeds-1, the same class-balanced subset
    for the pretrained model and for the same backbone at random init, fine-tuned (or probed,
    protocol="linear"); rows = mean and std over seeds per (model, fraction), runs = every run.
    Saved as RUN_DIR/eval/<name>.json; the report draws accuracy vs label fraction."""
    started = time.perf_counter()
    check_plan(fractions, seeds)
    encoder = load_encoder(run)
    train_set, test_set, test_y = _labelled_sets(train, test, encoder.config.data.image_size)
    k = head_layers_to_keep(encoder.config, keep_head_layers)

    def make(model: str, seed: int) -> Classifier:
        fresh = load_encoder(run, random_init=model == "random init", seed=seed)
        return finetune_classifier(fresh, train_set.num_classes, keep_head_layers=k)[0]

    runs = run_lowshot(make, InputSpec.from_config(encoder.config), train_set, test_set.images,
                       test_y, fractions=fractions, seeds=seeds, protocol=protocol, cfg=config)  # fmt: skip
    doc = {"protocol": "lowshot", "evaluation": protocol, "checkpoint": str(run),
           "checkpoint_step": encoder.step, "train": train, "test": test,
           "fractions": list(fractions), "seeds": seeds, "keep_head_layers": k,
           "finetune": dataclasses.asdict(config) if protocol == "finetune" else None,
           "rows": summarize(runs), "runs": [r.to_dict() for r in runs],
           "elapsed_s": time.perf_counter() - started}  # fmt: skip
    save_result(run, name, doc)
    if json_path is not None:
        write_json(json_path, doc)
    return doc


def distill(
    teacher: str | Path, unlabelled: str, test: str, *, student_checkpoint: str | Path | None = None,
    student_backbone: str | None = None, train: str | None = None,
    config: DistillConfig = DEFAULT_DISTILL, json_path: str | Path | None = None,
    save_dir: str | Path | None = None,
) -> dict:  # fmt: skip
    """SimCLR v2 step 3: the fine-tuned `teacher` (a folder from `eval_finetune(save_dir=...)`)
    labels the `unlabelled` images with P^T(y|x; T); a student learns them. The student is, by
    default, a new classifier on the teacher's own pretrained run (self-distillation); else on
    `student_checkpoint` (another run, e.g. a smaller pretrained model) or a random-init
    `student_backbone`. config.alpha < 1 mixes in the teacher's labelled subset (or `train`)."""
    started = time.perf_counter()
    if student_checkpoint is not None and student_backbone is not None:
        raise ValueError("give --student-checkpoint or --student-backbone, not both")
    teacher_model, teacher_inputs, meta = load_classifier(teacher)
    t_cfg = config_lib.load(meta["config"])
    size, classes = t_cfg.data.image_size, meta.get("classes")
    images = load_images(unlabelled, size, labelled=False).images
    test_y_set = load_images(test, size)
    test_y = align_labels(classes, test_y_set, reference=f"the teacher's classes ({teacher})")
    labelled = None
    if config.alpha < 1.0:
        was = meta.get("labels") or {}
        source = train or was.get("source")
        if source is None:
            raise ValueError("distillation alpha < 1 needs labelled images: pass --train SOURCE")
        lab = load_images(source, size)
        lab_y = align_labels(classes, lab, reference=f"the teacher's classes ({teacher})")
        same = source == was.get("source") and was.get("fraction") is not None
        idx = (
            class_balanced_subset(lab_y, was["fraction"], was["seed"])
            if same
            else torch.arange(len(lab_y))
        )
        labelled = (lab.images[idx], lab_y[idx])
    num_classes = teacher_model.num_classes
    if student_backbone is not None:
        torch.manual_seed(config.train.seed)
        s_cfg = dataclasses.replace(
            t_cfg, backbone=dataclasses.replace(t_cfg.backbone, name=student_backbone)
        )
        backbone = build_backbone(student_backbone, small_input=bool(t_cfg.backbone.small_input))
        if s_cfg.backbone.channels_last:
            backbone.to(memory_format=torch.channels_last)
        s_inputs, k, s_run = InputSpec.from_config(s_cfg), 0, None
        student = Classifier(backbone, feature_dim(backbone, s_inputs), num_classes)
    else:
        s_run = student_checkpoint or meta.get("run")
        if not s_run or not (Path(s_run) / "config.yaml").is_file():
            raise FileNotFoundError(
                f"the student starts from the teacher's pretrain run {s_run!r}, which is not there; "
                "pass --student-checkpoint RUN or --student-backbone NAME"
            )
        s_encoder = load_encoder(s_run, seed=config.train.seed)
        own = None if student_checkpoint is not None else int(meta["keep_head_layers"])
        student, s_inputs, k = finetune_classifier(s_encoder, num_classes, keep_head_layers=own)
        s_cfg = s_encoder.config
    result = distill_classifier(teacher_model, student, images, test_y_set.images, test_y,
                                inputs=s_inputs, teacher_inputs=teacher_inputs, labelled=labelled,
                                cfg=config)  # fmt: skip
    student_name = student_backbone or str(s_run)
    doc = {"protocol": "distill", "teacher": str(teacher), "student": student_name,
           "unlabelled": unlabelled, "test": test, "train": meta.get("labels", {}).get("source"),
           "rows": [{"model": "teacher", "features": meta.get("checkpoint"), "top1": result.teacher_top1},
                    {"model": "student", "features": student_name, "top1": result.top1}],
           **result.to_dict(), "elapsed_s": time.perf_counter() - started}  # fmt: skip
    if meta.get("run") and Path(meta["run"]).is_dir():
        save_result(meta["run"], "distill", doc)
    if json_path is not None:
        write_json(json_path, doc)
    if save_dir is not None:
        save_classifier(save_dir, student, {"run": str(s_run) if s_run else None, "classes": classes,
                                            "config": config_lib.to_dict(s_cfg), "keep_head_layers": k,
                                            "teacher": str(teacher), "result": result.to_dict()})  # fmt: skip
    return doc
