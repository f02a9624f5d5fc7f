"""The typed Python API. The CLI is a thin layer over these functions, and the README uses them.

from wildsight import api, config
result = api.pretrain(config.load({"train": {"steps": 100}}))
doc = api.eval_linear("runs/pretrain", train="fmnist:train", test="fmnist:test")  # doc["top1"]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wildsight.api_finetune import distill, eval_finetune, eval_lowshot, finetune_classifier
from wildsight.config import DataConfig
from wildsight.data import (
    DataError,
    ImageDataset,
    Loader,
    PackResult,
    ShardDataset,
    SkipLog,
    open_dataset,
    write_shards,
)
from wildsight.data.loader import tsv_field
from wildsight.data.sources import fingerprint
from wildsight.eval.features import PRE_LOGITS, extract_features, extract_layers, resolve_layers
from wildsight.eval.html import result_path, save_result, write_report
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
from wildsight.fileio import (
    check_file_target,
    save_tensors_atomically,
    write_atomically,
    write_atomically_with,
    write_json,
)
from wildsight.train.trainer import TrainResult, pick_device, pretrain

DEFAULT_MAX_SKIP_FRACTION = DataConfig().max_skip_fraction  # what pretrain uses

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
    skip_log: SkipLog | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 and labels [N] of a data source; encoder None = raw pixels in [0, 1].

    Features of a trained encoder are cached under `cache_dir` (default RUN_DIR/features), keyed
    by the source's files (paths, sizes, mtimes), image size, the weights and layer, so probing
    again costs nothing. Undecodable images: see `source_layers`.
    """
    feats, labels, _ = source_layers(encoder, source, [layer], image_size=image_size,
                                     device=device, batch_size=batch_size, cache_dir=cache_dir,
                                     skip_log=skip_log)  # fmt: skip
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
    skip_log: SkipLog | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({layer: float32 [N, D_layer]}, labels int64 [N], dataset index int64 [N] of each row).

    Layers are names from `eval.features.layer_names` ("stage1" ... "pre_logits"); all missing
    ones come from one forward pass. Raw pixels (encoder None) are the one layer "pre_logits".
    Undecodable images are dropped, hence the row -> dataset index map; they are added to
    `skip_log` (None: a warning line on stderr), and a source where nothing decodes, or more
    than `data.max_skip_fraction` (the run's, else the default) fails, is a DataError.
    """
    dataset = open_dataset([source], image_size)
    return _source_layers(encoder, dataset, source, layers, device=device, batch_size=batch_size,
                          cache_dir=cache_dir, skip_log=skip_log)  # fmt: skip


def _source_layers(
    encoder: Encoder | None,
    dataset: ImageDataset | ShardDataset,
    source: str,
    layers: list[str],
    *,
    device: str,
    batch_size: int,
    cache_dir: Path | None,
    skip_log: SkipLog | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """source_layers of an opened dataset."""
    if encoder is None and list(layers) != [PRE_LOGITS]:
        raise ValueError(
            f"raw pixels have no layers {list(layers)}; probe them with --layers {PRE_LOGITS}"
        )
    run_device = pick_device(device)  # checked whether or not the features are cached
    skips = SkipLog()  # this source's; added to skip_log (eval: train and test) at the end
    fraction = (
        encoder.config.data.max_skip_fraction if encoder is not None else DEFAULT_MAX_SKIP_FRACTION
    )
    caches: dict[str, Path] = {}
    if encoder is not None and encoder.weights_id and (cache_dir or encoder.run_dir):
        # keyed by what the rows are: the images' files and the weights, not the text typed
        # (no stale rows after images change, from another folder, or after retraining)
        assert encoder.config.views is not None
        aug = encoder.config.views.groups[0].augment
        base = (f"{fingerprint(dataset)}|{encoder.weights_id}|{encoder.input_size}|"
                f"{tuple(aug.mean)}|{tuple(aug.std)}|{fraction}")  # fmt: skip
        folder = Path(cache_dir or Path(encoder.run_dir or ".") / "features")
        for layer in layers:
            key = hashlib.sha1(f"{base}|{layer}".encode())
            caches[layer] = folder / f"{key.hexdigest()[:20]}.safetensors"
        if all(path.is_file() for path in caches.values()):
            saved = {layer: load_file(str(path)) for layer, path in caches.items()}
            with safe_open(str(caches[layers[0]]), "pt") as f:
                for key, reason in json.loads((f.metadata() or {}).get("skipped", "[]")):
                    skips.add(key, reason)
            _pass_skips(skips, source, skip_log, warn=True)
            first = saved[layers[0]]
            return {k: v["features"] for k, v in saved.items()}, first["labels"], first["indices"]
    try:
        images, labels, rows = _all_images(dataset, source, fraction, skips)  # [N,3,S,S], [N], [N]
    except DataError:
        _pass_skips(skips, source, skip_log, warn=False)  # the error names the first one
        raise
    _pass_skips(skips, source, skip_log, warn=True)
    if encoder is None:
        pixels = images[:, :1] if _is_grey(images) else images
        feats = {PRE_LOGITS: pixels.flatten(1).float() / 255}
    else:
        feats = extract_layers(
            encoder.backbone, images, layers, transform=encoder.transform, batch_size=batch_size,
            device=run_device, precision="fp32",
        )  # fmt: skip
    listed = json.dumps(list(skips.reasons.items()))
    for layer, cache in caches.items():
        tensors = {"features": feats[layer].contiguous(), "labels": labels.contiguous(),
                   "indices": rows.contiguous()}  # fmt: skip
        save_tensors_atomically(tensors, cache, metadata={"skipped": listed})
    return feats, labels, rows


def _all_images(
    dataset: ImageDataset | ShardDataset, source: str, max_skip_fraction: float, skips: SkipLog
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every decodable image of `dataset` (uint8 [N, 3, S, S], labels [N], dataset index [N]);
    the others go to `skips`. Nothing decodable, or more than `max_skip_fraction` of a source
    undecodable, is a one-line DataError (checked once the whole source was read)."""
    loader = Loader(dataset, batch_size=1024, seed=0, shuffle=False, drop_last=False,
                    max_skip_fraction=1.0, skip_log=skips)  # fmt: skip
    batches = list(loader)
    if not batches:
        first = next(iter(skips.reasons.items()), None)
        why = f" (first: {first[0]}: {first[1]})" if first else ""
        raise DataError(
            f"no image in {source!r} could be decoded: {loader.skipped} of {loader.attempted} "
            f"failed{why}; check that it holds pictures Pillow can read (a .txt list: one image "
            "path per line, relative to the list's folder)"
        )
    loader.max_skip_fraction = max_skip_fraction
    loader.check_skip_fraction()
    return (torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
            torch.cat([b.indices for b in batches]))  # fmt: skip


def _pass_skips(skips: SkipLog, source: str, skip_log: SkipLog | None, *, warn: bool) -> None:
    """Hand a source's skips to the caller's log, or (none given) warn in one line here."""
    if skip_log is not None:
        for key, reason in skips.reasons.items():
            skip_log.add(key, reason)
    elif skips.count and warn:
        first = next(iter(skips.reasons))
        print(f"wildsight: warning: {skips.summary()} of {source!r} could not be decoded and "
              f"were left out (first: {first}: {skips.reasons[first]})", file=sys.stderr)  # fmt: skip


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
    Undecodable images are left out, listed in RUN_DIR/eval/<name>.skipped.tsv and counted in
    a warning; a source where nothing decodes or too many fail is a one-line error.
    """
    started = time.perf_counter()
    if json_path is not None:  # before the work, not after it
        check_file_target(json_path, "json_path")
    run_dev = pick_device(device)
    encoder = load_encoder(run, random_init=random_init)
    run_dir = encoder.run_dir or Path(run)  # RUN_DIR also when `run` is one of its ckpt-*
    chosen = resolve_layers(encoder.backbone, layers or [PRE_LOGITS])
    size = encoder.config.data.image_size
    kind = "linear" if protocol == "transfer" else protocol
    if name is None:  # e.g. "linear", "linear-sgd-layers", "knn-random-init"
        tags = {"sgd": kind == "linear" and solver == "sgd", "layers": len(chosen) > 1,
                "random-init": random_init}  # fmt: skip
        name = "-".join([protocol] + [tag for tag, on in tags.items() if on])
    skips = SkipLog()
    with _skips_reported(skips, result_path(run_dir, name, ".skipped.tsv")):
        features = [_labelled(encoder, src, chosen, size, device, skips) for src in (train, test)]
    train_f, test_f = features[0], align_classes(*features)
    label = "random init" if random_init else "pretrained"
    rows, results = run_probes(kind, train_f, test_f, layers=chosen, features_name=label, solver=solver,
                               ks=ks or [20], temperature=temperature, device=run_dev)  # fmt: skip
    headline = results[headline_index(rows)]
    if protocol == "transfer" and not random_init:
        reference = load_encoder(run, random_init=True)
        ref = [_labelled(reference, src, chosen, size, device, SkipLog()) for src in (train, test)]
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
    save_result(run_dir, name, doc)
    if json_path is not None:
        write_json(json_path, doc)
    return doc


@contextlib.contextmanager
def _skips_reported(skips: SkipLog, path: Path) -> Iterator[None]:
    """List `skips` in `path` (TSV key, reason, as RUN_DIR/skipped.tsv) and say so in one
    warning line, or (a DataError: too many) in the error's line; no skips: a stale list goes."""
    try:
        yield
    except DataError as err:  # too many skipped: the error says where they are listed
        if not skips.count:
            raise
        skips.write(path)
        raise DataError(f"{err}; all {skips.count} are listed in {path}") from None
    if skips.count:
        skips.write(path)
        print(f"wildsight: warning: {skips.summary()} could not be decoded and were left "
              f"out; they are listed in {path}", file=sys.stderr)  # fmt: skip
    else:
        path.unlink(missing_ok=True)


def _labelled(
    encoder: Encoder, source: str, layers: list[str], size: int, device: str, skips: SkipLog
) -> LabelledFeatures:
    dataset = open_dataset([source], size)
    feats, labels, rows = _source_layers(encoder, dataset, source, layers, device=device,
                                         batch_size=512, cache_dir=None, skip_log=skips)  # fmt: skip
    classes = list(dataset.classes or [str(c) for c in range(int(labels.max()) + 1)])

    if not isinstance(dataset, ImageDataset):  # tar shards are read in order, not by index:
        return LabelledFeatures(source, feats, labels, classes)  # no nearest-neighbour grid

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
    projection-head layers on top; None = the run's own `method.keep_head_layers`.

    Beside it, OUT.keys.txt names row i's image on line i (its path, `<idx file>#<n>` or
    `<shard>[<n>]`; tab, newline and backslash escaped as in skipped.tsv), and undecodable
    images, left out, are listed in OUT.skipped.tsv. `run`: a run directory or one of its
    checkpoints/ckpt-* directories."""
    out = Path(out)
    keys_path, skipped_path = Path(f"{out}.keys.txt"), Path(f"{out}.skipped.tsv")
    for path, what in ((out, "--out"), (keys_path, "--out's keys file"),
                       (skipped_path, "--out's list of skipped images")):  # fmt: skip
        if path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a folder; give a file name, e.g. "
                             f"{str(out / 'features.npy')!r}")  # fmt: skip
        check_file_target(path, what)  # a parent that is a file
    run_device = pick_device(device)
    encoder = load_encoder(run)
    k = head_layers_to_keep(encoder.config, keep_head_layers)
    dataset = open_dataset([data], encoder.config.data.image_size)
    skips = SkipLog()
    with _skips_reported(skips, skipped_path):
        if k == 0:
            feats, _, rows = _source_layers(encoder, dataset, data, [PRE_LOGITS], device=device,
                                            batch_size=512, cache_dir=None, skip_log=skips)  # fmt: skip
            feats = feats[PRE_LOGITS]
        else:
            fraction = encoder.config.data.max_skip_fraction
            images, _, rows = _all_images(dataset, data, fraction, skips)
            module = build_encoder(encoder.config, encoder.backbone, k,
                                   pretrained_state(encoder.checkpoint or run)).eval()  # fmt: skip
            feats = extract_features(module, images, transform=encoder.transform,
                                     device=run_device)  # fmt: skip
    keys = "".join(f"{tsv_field(dataset.key(int(i)))}\n" for i in rows)
    # the old keys go first and the new ones come last: a kill in between leaves features
    # without a keys file, never new features beside old keys (or the reverse)
    keys_path.unlink(missing_ok=True)
    write_atomically_with(out, lambda f: np.save(f, feats.numpy()))
    write_atomically(keys_path, keys)
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
