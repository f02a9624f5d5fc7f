"""The typed API of the label-efficiency protocols (SEER's fine-tuning, low-shot, SimCLR v2's
distillation); `wildsight.api` re-exports every public name, so callers use `api.eval_finetune`.

doc = api.eval_lowshot("runs/demo", "fmnist:train", "fmnist:test", fractions=(0.01, 0.1), seeds=3)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from wildsight import config as config_lib
from wildsight.backbones import build_backbone
from wildsight.data import open_dataset
from wildsight.data.sources import fingerprint
from wildsight.eval.distill import DEFAULT_DISTILL, DistillConfig
from wildsight.eval.distill import distill as distill_classifier
from wildsight.eval.finetune import (
    DEFAULT_FINETUNE,
    Classifier,
    FinetuneConfig,
    InputSpec,
    feature_dim,
    finetune,
    predict,
)
from wildsight.eval.html import result_path, save_result
from wildsight.eval.lowshot import (
    LowshotRow,
    check_fraction,
    check_jobs,
    check_plan,
    check_seed,
    class_balanced_subset,
    run_lowshot,
    summarize,
)
from wildsight.eval.models import (
    CLASSIFIER_FILES,
    Encoder,
    LabelledImages,
    align_labels,
    build_encoder,
    head_layers_to_keep,
    load_classifier,
    load_encoder,
    load_images,
    pretrained_state,
    run_directory,
    save_classifier,
)
from wildsight.eval.report import confusion_matrix, top1_accuracy
from wildsight.eval.selftrain import SelfTrainConfig
from wildsight.fileio import (
    check_file_target,
    check_folder_target,
    write_atomically,
    write_json,
)
from wildsight.train.trainer import pick_device

__all__ = ["distill", "eval_finetune", "eval_lowshot", "finetune_classifier"]


def finetune_classifier(
    encoder: Encoder, num_classes: int, *, keep_head_layers: int | None = None
) -> tuple[Classifier, InputSpec, int]:
    """A new linear classifier on a run's encoder: the backbone, or backbone + the first
    `keep_head_layers` SimCLR v2 projection-head layers (None = the run's own setting).
    Returns (model, its input, the number of head layers kept)."""
    k = head_layers_to_keep(encoder.config, keep_head_layers)
    source = encoder.checkpoint or encoder.run_dir  # the heads of the backbone's own checkpoint
    state = pretrained_state(source) if k and encoder.step >= 0 and source else None
    module = build_encoder(encoder.config, encoder.backbone, k, state)
    inputs = InputSpec.from_config(encoder.config)
    return Classifier(module, feature_dim(module, inputs), num_classes), inputs, k


def _labelled_sets(
    train: str, test: str, size: int
) -> tuple[LabelledImages, LabelledImages, torch.Tensor]:
    train_set, test_set = load_images(train, size), load_images(test, size)
    return train_set, test_set, align_labels(train_set.classes, test_set, reference=repr(train))


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)


def _append_jsonl(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines and fsync, so a crash right after keeps them."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_jsonl(records))
        f.flush()
        os.fsync(f.fileno())


def _read_partial(path: Path, settings: dict) -> list[LowshotRow]:
    """The runs an interrupted eval_lowshot kept in `path`, if it had these settings; [] if
    there is no such file. A file from other settings is an error: it is never overwritten."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1 or i == 0:  # only the last run's line can be cut by a crash
                parsed = []
                break
    head = parsed[0].get("settings") if parsed and isinstance(parsed[0], dict) else None
    if head is None:
        raise ValueError(f"{path} is not a low-shot progress file; move it away or pass "
                         f"another --name")  # fmt: skip
    records = parsed[1:]
    if head != settings:
        differ = sorted(k for k in head.keys() | settings.keys() if head.get(k) != settings.get(k))
        if "source_fingerprints" in differ or "weights_id" in differ:
            why = "the images or the weights changed since"
        else:
            why = f"other settings: {', '.join(differ)}"
        raise ValueError(f"{path} holds runs of a low-shot call with {why}; rerun that call to "
                         "finish it, pass another --name, or delete the file to start over")  # fmt: skip
    return [LowshotRow(**r) for r in records]


def _check_outputs(json_path: str | Path | None, save_dir: str | Path | None = None) -> None:
    """Refuse unwritable output paths before training, not after it."""
    if json_path is not None:
        check_file_target(json_path, "json_path")
    if save_dir is not None:
        check_folder_target(save_dir, "save_dir", own_files=CLASSIFIER_FILES)


def _shown(classes: list[str] | None, most: int = 10) -> str:
    """A class list for a message: the first `most` names, then how many more."""
    if not classes:
        return "(numbered, no names)"
    more = f" and {len(classes) - most} more" if len(classes) > most else ""
    return str(list(classes[:most])) + more


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
    _check_outputs(json_path, save_dir)
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
        name = (  # runs that differ in labels, init or head layers do not overwrite each other
            "finetune"
            + (f"-{fraction:g}" if fraction else "")
            + (f"-seed{seed}" if seed and fraction else "")
            + ("-random-init" if random_init else "")
            + (f"-head{k}" if keep_head_layers is not None else "")
        )
    save_result(encoder.run_dir or run, name, doc)  # RUN_DIR also when `run` is a ckpt-*
    if json_path is not None:
        write_json(json_path, doc)
    if save_dir is not None:
        save_classifier(save_dir, model, {**meta, "run": str(run), "classes": classes,
                                          "config": config_lib.to_dict(encoder.config),
                                          "result": result.to_dict()})  # fmt: skip
    return doc


@dataclasses.dataclass(frozen=True)
class _FreshClassifier:
    """make_classifier of `run_lowshot`: a new classifier on the run's encoder, pretrained or
    drawn from `seed`. A class, not a closure, so that --jobs can send it to a worker process."""

    run: str
    num_classes: int
    keep_head_layers: int

    def __call__(self, model: str, seed: int) -> Classifier:
        fresh = load_encoder(self.run, random_init=model == "random init", seed=seed)
        return finetune_classifier(fresh, self.num_classes,
                                   keep_head_layers=self.keep_head_layers)[0]  # fmt: skip


def eval_lowshot(
    run: str | Path, train: str, test: str, *, fractions: Sequence[float] = (0.01, 0.1),
    seeds: int = 3, protocol: str = "finetune", keep_head_layers: int | None = None,
    config: FinetuneConfig = DEFAULT_FINETUNE, self_training: SelfTrainConfig | None = None,
    distillation: DistillConfig | None = None, unlabelled: str | None = None,
    json_path: str | Path | None = None, name: str = "lowshot", jobs: int = 1,
) -> dict:  # fmt: skip
    """Low-shot table: for each fraction and seed 0 .. seeds-1, the same class-balanced subset
    for the pretrained model and for the same backbone at random init, fine-tuned (or probed,
    protocol="linear"); rows = mean and std over seeds per (model, fraction), runs = every run.
    self_training: each fine-tuned model then self-trains on the `unlabelled` source's images
    (default: the train images, labels unused), rows "<model> + self-training".
    distillation: then the run's last model teaches a fresh classifier of the same kind on those
    unlabelled images (SimCLR v2 step 3), rows "<...> + distillation".
    Saved as RUN_DIR/eval/<name>.json; the report draws accuracy vs label fraction. Each finished
    run is kept in RUN_DIR/eval/<name>.partial.jsonl until then: the same call after a crash or a
    stop reuses the runs it holds (removed once the result is saved). jobs > 1 fine-tunes that
    many runs at once, one process each (`run_lowshot`); each run is seeded by itself, so it
    matches the one-process call's run when both use the same threads per run."""
    started = time.perf_counter()
    _check_outputs(json_path)
    check_plan(fractions, seeds)
    check_jobs(jobs, protocol)
    encoder = load_encoder(run)
    run_dir = encoder.run_dir or Path(run)  # RUN_DIR also when `run` is one of its ckpt-*
    partial = result_path(run_dir, name, ".partial.jsonl")
    train_set, test_set, test_y = _labelled_sets(train, test, encoder.config.data.image_size)
    k = head_layers_to_keep(encoder.config, keep_head_layers)

    size = encoder.config.data.image_size
    # what the kept runs were made of: a changed source or retrained weights refuse them
    files = {name: fingerprint(open_dataset([src], size))
             for name, src in (("train", train), ("test", test), ("unlabelled", unlabelled)) if src}  # fmt: skip
    settings = {"protocol": "lowshot", "evaluation": protocol, "checkpoint": str(run),
                "checkpoint_step": encoder.step, "weights_id": encoder.weights_id,
                "source_fingerprints": files, "train": train, "test": test,
                "fractions": list(fractions), "seeds": seeds, "keep_head_layers": k,
                "finetune": dataclasses.asdict(config) if protocol == "finetune" else None,
                "self_training": None if self_training is None else {
                    **dataclasses.asdict(self_training), "unlabelled": unlabelled or train},
                "distillation": None if distillation is None else {
                    **dataclasses.asdict(distillation), "unlabelled": unlabelled or train}}  # fmt: skip
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    done = _read_partial(partial, settings)
    if done:
        print(f"low-shot: {len(done)} runs kept from the interrupted call in {partial}")
    # rewritten whole and atomically: drops a cut last line, never loses the kept runs
    write_atomically(partial, _jsonl([{"settings": settings}, *(r.to_dict() for r in done)]))
    unlabelled_images = None
    if (self_training is not None or distillation is not None) and unlabelled is not None:
        unlabelled_images = load_images(unlabelled, encoder.config.data.image_size,
                                        labelled=False).images  # fmt: skip
    make = _FreshClassifier(str(run), train_set.num_classes, k)
    runs = run_lowshot(make, InputSpec.from_config(encoder.config), train_set, test_set.images,
                       test_y, fractions=fractions, seeds=seeds, protocol=protocol, cfg=config,
                       self_training=self_training, distillation=distillation,
                       unlabelled=unlabelled_images, done=done,
                       on_rows=lambda rows: _append_jsonl(partial, [r.to_dict() for r in rows]),
                       jobs=jobs)  # fmt: skip
    doc = {**settings, "rows": summarize(runs), "runs": [r.to_dict() for r in runs],
           "elapsed_s": time.perf_counter() - started}  # fmt: skip
    save_result(run_dir, name, doc)
    partial.unlink(missing_ok=True)
    if json_path is not None:
        write_json(json_path, doc)
    return doc


def _labelled_subset(meta: dict, train: str | None) -> tuple[str | None, tuple[float, int] | None]:
    """(source, (fraction, seed)) of the labels that alpha < 1 mixes in, for a teacher of metadata
    `meta`: the subset it was fine-tuned on, or all of `train` where that is another source.
    (fraction, seed) None = every image of the source: a teacher fine-tuned on all labels (its
    seed then picks no labels), or one whose folder records none (older folders, students saved
    by `distill`), as with one teacher."""
    was = meta.get("labels") or {}
    source, fraction = train or was.get("source"), was.get("fraction")
    if source != was.get("source") or fraction is None or fraction == 1.0:
        return source, None  # fraction 1 draws every image too, whatever the seed
    return source, (fraction, was["seed"])


def _labels_shown(meta: dict) -> str:
    """The labels a teacher was fine-tuned on, for a message."""
    was = meta.get("labels")
    if not was:
        return "labels not recorded"
    if was.get("fraction") is None:
        return f"all labels of {was.get('source')!r}"
    return f"fraction {was['fraction']:g} of {was.get('source')!r}, seed {was.get('seed')}"


def _existing_run_directory(run: str | None) -> Path | None:
    """RUN_DIR of a run or ckpt-* path that still exists, else None (moved or deleted)."""
    if not run:
        return None
    try:
        return run_directory(run)
    except config_lib.ConfigError:
        return None


def distill(
    teacher: str | Path | Sequence[str | Path], unlabelled: str, test: str, *,
    student_checkpoint: str | Path | None = None,
    student_backbone: str | None = None, train: str | None = None,
    config: DistillConfig = DEFAULT_DISTILL, json_path: str | Path | None = None,
    save_dir: str | Path | None = None,
) -> dict:  # fmt: skip
    """SimCLR v2 step 3: the fine-tuned `teacher` (a folder from `eval_finetune(save_dir=...)`)
    labels the `unlabelled` images with P^T(y|x; T); a student learns them. The student is, by
    default, a new classifier on the teacher's own pretrained run (self-distillation); else on
    `student_checkpoint` (another run, e.g. a smaller pretrained model) or a random-init
    `student_backbone`. config.alpha < 1 mixes in the teacher's labelled subset (or `train`).
    Several teacher folders teach together, their probabilities averaged (the first one's run and
    classes are the reference; all must take the same input and, with alpha < 1, have been
    fine-tuned on the same labels)."""
    started = time.perf_counter()
    _check_outputs(json_path, save_dir)
    if student_checkpoint is not None and student_backbone is not None:
        raise ValueError("give --student-checkpoint or --student-backbone, not both")
    paths = [teacher] if isinstance(teacher, (str, Path)) else list(teacher)
    if not paths:
        raise ValueError("distillation needs a teacher: --teacher DIR (of `eval finetune --save`)")
    if train is not None and config.alpha >= 1.0:
        raise ValueError("--train gives the labelled images of a distillation with --alpha < 1; "
                         f"with alpha {config.alpha:g} no label is used: drop --train or lower --alpha")  # fmt: skip
    if config.teachers != 1:
        raise ValueError(f"DistillConfig.teachers={config.teachers} is how many teachers `eval "
                         "lowshot` trains; give `distill` its teachers as folders (--teacher DIR "
                         "DIR ...)")  # fmt: skip
    loaded = [load_classifier(path) for path in paths]
    teacher_model, teacher_inputs, meta = loaded[0]
    for path, (model_i, inputs_i, meta_i) in zip(paths[1:], loaded[1:], strict=True):
        if (meta_i.get("classes"), model_i.num_classes) != (meta.get("classes"),
                                                           teacher_model.num_classes):  # fmt: skip
            raise ValueError(f"teacher {path} predicts other classes than teacher {paths[0]}: "
                             "teachers must be fine-tuned on the same labels")  # fmt: skip
        if (inputs_i.size, inputs_i.mean, inputs_i.std) != (
            teacher_inputs.size, teacher_inputs.mean, teacher_inputs.std,
        ):  # fmt: skip
            raise ValueError(f"teacher {path} takes another input (size, mean, std) than teacher "
                             f"{paths[0]}: teachers must come from runs of the same image size")  # fmt: skip
    subsets = [_labelled_subset(meta_i, train) for _, _, meta_i in loaded]  # what alpha < 1 uses
    if config.alpha < 1.0 and len(set(subsets)) > 1:
        shown = "; ".join(f"{path}: {_labels_shown(meta_i)}"
                          for path, (_, _, meta_i) in zip(paths, loaded, strict=True))  # fmt: skip
        raise ValueError(f"alpha {config.alpha:g} mixes in the teachers' labels, but they were "
                         f"fine-tuned on different labels ({shown}): give teachers fine-tuned on "
                         "the same labels, or --alpha 1")  # fmt: skip
    source, drawn = subsets[0]
    if config.alpha < 1.0 and source is None:
        raise ValueError("distillation alpha < 1 needs labelled images: pass --train SOURCE")
    names = str(paths[0]) if len(paths) == 1 else [str(path) for path in paths]
    t_cfg = config_lib.load(meta["config"])
    size, classes = t_cfg.data.image_size, meta.get("classes")
    images = load_images(unlabelled, size, labelled=False).images
    test_y_set = load_images(test, size)
    known = f"the teacher's classes {_shown(classes)}"
    test_y = align_labels(classes, test_y_set, reference=known)
    labelled = None
    if config.alpha < 1.0:
        assert source is not None
        lab = load_images(source, size)
        lab_y = align_labels(classes, lab, reference=known)
        idx = torch.arange(len(lab_y)) if drawn is None else class_balanced_subset(lab_y, *drawn)
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
        found = _existing_run_directory(s_run)  # a run or one of its ckpt-* folders
        if student_checkpoint is not None and found is None:
            raise FileNotFoundError(
                f"--student-checkpoint {str(s_run)!r} is not a pretrain run (no config.yaml in "
                "it); pass the --out folder of `wildsight pretrain`"
            )
        if found is None:
            raise FileNotFoundError(
                f"the student starts from the teacher's pretrain run {s_run!r}, which is not there; "
                "pass --student-checkpoint RUN or --student-backbone NAME"
            )
        s_encoder = load_encoder(s_run, seed=config.train.seed)
        own = None if student_checkpoint is not None else int(meta["keep_head_layers"])
        student, s_inputs, k = finetune_classifier(s_encoder, num_classes, keep_head_layers=own)
        s_cfg = s_encoder.config
    result = distill_classifier([m for m, _, _ in loaded], student, images, test_y_set.images, test_y,
                                inputs=s_inputs, teacher_inputs=teacher_inputs, labelled=labelled,
                                cfg=config)  # fmt: skip
    student_name = student_backbone or str(s_run)
    rows = [{"model": "teacher", "features": meta.get("checkpoint"), "top1": result.teacher_top1}]
    if len(loaded) > 1:  # the ensemble's row above, then each teacher alone
        kw = {"batch_size": config.train.eval_batch_size, "precision": config.train.precision,
              "device": pick_device(config.train.device)}  # fmt: skip
        rows = [{**rows[0], "model": f"{len(loaded)} teachers together", "features": None}]
        for path, (model_i, inputs_i, meta_i) in zip(paths, loaded, strict=True):
            pred = predict(model_i, test_y_set.images, inputs_i, **kw)  # [M]
            rows.append({"model": f"teacher {path}", "features": meta_i.get("checkpoint"),
                         "top1": top1_accuracy(pred, test_y)})  # fmt: skip
    doc = {"protocol": "distill", "teacher": names, "student": student_name,
           "unlabelled": unlabelled, "test": test,
           "train": None if labelled is None else source,
           "rows": [*rows, {"model": "student", "features": student_name, "top1": result.top1}],
           **result.to_dict(), "elapsed_s": time.perf_counter() - started}  # fmt: skip
    teacher_run = _existing_run_directory(meta.get("run"))
    if teacher_run is not None:  # the teacher's run (its RUN_DIR, also from a ckpt-*) keeps it
        save_result(teacher_run, "distill", doc)
    if json_path is not None:
        write_json(json_path, doc)
    if save_dir is not None:
        save_classifier(save_dir, student, {"run": str(s_run) if s_run else None, "classes": classes,
                                            "config": config_lib.to_dict(s_cfg), "keep_head_layers": k,
                                            "teacher": names, "result": result.to_dict()})  # fmt: skip
    return doc
