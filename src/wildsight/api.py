"""The typed Python API. The CLI is a thin layer over these functions, and the README uses them.

from wildsight import api, config
result = api.pretrain(config.load({"train": {"steps": 100}}))
doc = api.eval_linear("runs/pretrain", train="fmnist:train", test="fmnist:test")  # doc["top1"]
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wildsight.api_finetune import distill, eval_finetune, eval_lowshot, finetune_classifier
from wildsight.data import Loader, PackResult, open_dataset, write_shards
from wildsight.eval.features import PRE_LOGITS, extract_features, extract_layers, resolve_layers
from wildsight.eval.html import save_result, write_report
from wildsight.eval.models import (
    Encoder,
    build_encoder,
    head_layers_to_keep,
    load_encoder,
    pretrained_state,
)
from wildsight.eval.protocols import (
    LabelledFeatures,
    align_classes,
    headline_index,
    result_document,
    run_probes,
)
from wildsight.fileio import write_json
from wildsight.train.trainer import TrainResult, pick_device, pretrain

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


# re-exported: `from wildsight.api import pretrain, TrainResult, eval_finetune, ...`
_ = (pretrain, TrainResult, distill, eval_finetune, eval_lowshot, finetune_classifier, write_json)


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
