"""Low-shot evaluation: fine-tune (or probe) on class-balanced label subsets, several seeds.

SimCLR v2 and SEER report accuracy with 1% and 10% of ImageNet's labels. Here a subset is a
function of the labels and the seed only, never of the model, so every model of a comparison
(and every later run) sees exactly the same images:

* ``label_order(labels, seed)`` ranks all N images: round r takes the r-th image of every class,
  classes in a seeded order, images within a class in a seeded order. The subset of size n is
  the first n of that ranking, hence
* class-balanced: class counts differ by at most one (until a class runs out of images; the
  others then keep taking turns);
* exactly n = round(fraction * N) images;
* NESTED: for one seed, the 1% subset is contained in the 10% subset (a controlled comparison:
  more labels add images, they do not swap them);
* stable: the seeded orders come from a fixed integer hash (splitmix64) of (seed, index), not
  from a library RNG whose stream could change between versions.
"""

from __future__ import annotations

import copy
import math
import signal
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wildsight.eval.distill import TEACHER_SEED_STRIDE, DistillConfig, distill
from wildsight.eval.features import extract_features
from wildsight.eval.finetune import (
    DEFAULT_FINETUNE,
    Classifier,
    FinetuneConfig,
    InputSpec,
    finetune,
)
from wildsight.eval.linear import linear_probe
from wildsight.eval.models import LabelledImages
from wildsight.eval.selftrain import SelfTrainConfig, SelfTrainResult, self_train
from wildsight.train.trainer import pick_device

PROTOCOLS = ("finetune", "linear")
MODELS = ("pretrained", "random init")
SELF_TRAINED = " + self-training"  # row model of a fine-tuned model self-trained afterwards
DISTILLED = " + distillation"  # row model of a fresh model distilled from the run's last model

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s SplitMix64 finaliser on uint64 [n] (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _keys(seed: int, values: np.ndarray, salt: int) -> np.ndarray:
    """A pseudo-random uint64 key per value, fixed by (seed, salt, value)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed * 2 + salt], dtype=np.uint64))
        return _splitmix64(values.astype(np.uint64) ^ base)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"a label-subset seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def label_order(labels: Tensor, seed: int) -> Tensor:
    """int64 [N]: every index of labels [N], ranked class-round-robin (module docstring)."""
    seed = check_seed(seed)
    y = torch.as_tensor(labels).cpu().numpy().astype(np.int64)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"label subsets need labels [N] with N > 0, got shape {y.shape}")
    if (y < 0).any():
        raise ValueError(f"{int((y < 0).sum()):,} images have no label (-1); subsets need labels")
    classes = np.unique(y)  # [C]
    class_rank = np.argsort(np.argsort(_keys(seed, classes, salt=1), kind="stable"), kind="stable")
    index = np.arange(len(y))
    within = np.lexsort((index, _keys(seed, index, salt=0), y))  # by class, then by key
    position = np.empty(len(y), dtype=np.int64)  # position of each image within its class
    sorted_y = y[within]
    starts = np.searchsorted(sorted_y, sorted_y, side="left")  # first slot of each class
    position[within] = np.arange(len(y)) - starts
    key = position * len(classes) + class_rank[np.searchsorted(classes, y)]  # unique per image
    return torch.from_numpy(np.argsort(key, kind="stable"))


def check_fraction(fraction: float) -> float:
    """A label fraction must be a number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or math.isnan(fraction):
        raise ValueError(f"a label fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"a label fraction must be in (0, 1] (0.01 = 1% of the labels), got {fraction}"
        )
    return float(fraction)


def check_plan(fractions: Sequence[float], seeds: int) -> None:
    """Low-shot arguments: at least one valid fraction; `seeds` (a count: seeds 0 .. seeds-1) >= 1."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds is how many seeds to run (0, 1, ...), must be >= 1, got {seeds}")
    if not fractions:
        raise ValueError("low-shot needs at least one label fraction, e.g. 0.01 0.1")
    for fraction in fractions:
        check_fraction(fraction)


def subset_size(num_images: int, fraction: float, num_classes: int) -> int:
    """round(fraction * N), checked: 0 < fraction <= 1 and at least one image per class."""
    n = round(check_fraction(fraction) * num_images)
    if n < num_classes:
        raise ValueError(
            f"fraction {fraction} of {num_images:,} images is {n} labels, fewer than the "
            f"{num_classes} classes; use a fraction >= {num_classes / num_images:.2g}"
        )
    return n


def class_balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted int64 indices [round(fraction * N)] of a class-balanced, seed-fixed label subset."""
    labels = torch.as_tensor(labels)
    n = subset_size(len(labels), fraction, int(torch.unique(labels[labels >= 0]).numel()))
    return label_order(labels, seed)[:n].sort().values


@dataclass(frozen=True)
class LowshotRow:
    """One (model, fraction, seed) run."""

    model: str  # "pretrained" | "random init"
    fraction: float
    seed: int
    num_labels: int
    top1: float
    seconds: float | None  # training time of a fine-tune; None for a probe
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(rows: Sequence[LowshotRow]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (n - 1; 0 for one seed) of top-1 per (model, fraction).

    Rows of the result (top-1 fractions): model, fraction, num_labels, seeds, mean, std, min,
    max -- the rows of the report's accuracy-vs-label-fraction plot (``svg.plot_label_fraction``).
    """
    groups: dict[tuple[str, float], list[LowshotRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.fraction), []).append(row)
    out = []
    for (model, fraction), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [m.top1 for m in members]
        out.append({
            "model": model, "fraction": fraction, "num_labels": members[0].num_labels,
            "seeds": len(accs), "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs),
        })  # fmt: skip
    return out


def _finetune_run(
    make_classifier: Callable[[str, int], Classifier], inputs: InputSpec, train: LabelledImages,
    test_images: Tensor, test_labels: Tensor, cfg: FinetuneConfig,
    self_training: SelfTrainConfig | None, distillation: DistillConfig | None, unlabelled: Tensor,
    model: str, fraction: float, seed: int, idx: Tensor, log: Callable[[str], None],
) -> list[LowshotRow]:  # fmt: skip
    """One (model, fraction, seed) fine-tune on the subset idx, then its self-training and its
    distillation into a fresh make_classifier(model, seed) if asked: its rows."""
    classifier = make_classifier(model, seed)
    result = finetune(classifier, train.images[idx], train.labels[idx], test_images, test_labels,
                      inputs=inputs, cfg=replace(cfg, seed=seed))  # fmt: skip
    rows = [LowshotRow(model, fraction, seed, len(idx), result.top1, result.seconds,
                       {"total_steps": result.params["total_steps"]})]  # fmt: skip
    log(f"low-shot finetune: {model}, {fraction:g} of the labels ({len(idx):,} images), "
        f"seed {seed}: top-1 {100 * result.top1:.1f}%")  # fmt: skip
    extra = 0 if distillation is None else distillation.teachers - 1
    fine_tuned = copy.deepcopy(classifier.state_dict()) if extra and self_training else None

    def continue_training(model_: Classifier, seed_: int) -> SelfTrainResult:
        return self_train(model_, train.images[idx], train.labels[idx], unlabelled, test_images,
                          test_labels, inputs=inputs, top1_before=result.top1,
                          cfg=replace(self_training, train=replace(self_training.train, seed=seed_)))  # fmt: skip

    if self_training is not None:
        st = continue_training(classifier, seed)
        params = {k: st.params[k] for k in ("total_steps", "threshold", "unlabelled_ratio")}
        params["pseudo_label_rate_end"] = st.pseudo_label_rate_end
        params["top1_last_weights"] = st.top1_last  # top1: the average, if any
        rows.append(LowshotRow(model + SELF_TRAINED, fraction, seed, len(idx), st.top1,
                               st.seconds, params))  # fmt: skip
        log(f"low-shot self-training: {model}, {fraction:g} of the labels, seed {seed}: "
            f"top-1 {100 * result.top1:.1f}% -> {100 * st.top1:.1f}%")  # fmt: skip
    if distillation is not None:  # SimCLR v2 step 3: the last model teaches a fresh one
        teachers, teacher_top1s, seconds = [classifier], [rows[-1].top1], 0.0
        for i in range(1, distillation.teachers):  # the same training, other seeds, same labels
            seed_i = seed + i * TEACHER_SEED_STRIDE
            if self_training is not None:  # from the same fine-tuned model
                member = make_classifier(model, seed)
                member.load_state_dict(fine_tuned)
                done = continue_training(member, seed_i)
            else:
                member = make_classifier(model, seed_i)
                done = finetune(member, train.images[idx], train.labels[idx], test_images,
                                test_labels, inputs=inputs, cfg=replace(cfg, seed=seed_i))  # fmt: skip
            teachers.append(member)
            teacher_top1s.append(done.top1)
            seconds += done.seconds
            log(f"low-shot distillation: {rows[-1].model}, {fraction:g} of the labels, seed "
                f"{seed}: teacher {i + 1} (seed {seed_i}) top-1 {100 * done.top1:.1f}%")  # fmt: skip
        labelled = (train.images[idx], train.labels[idx]) if distillation.alpha < 1.0 else None
        student = make_classifier(model, seed)
        d = distill(teachers, student, unlabelled, test_images, test_labels, inputs=inputs,
                    labelled=labelled,
                    cfg=replace(distillation, train=replace(distillation.train, seed=seed)))  # fmt: skip
        params = {k: d.params[k] for k in ("total_steps", "temperature", "alpha", "teachers",
                                           "teacher_flip")}  # fmt: skip
        params.update(teacher_top1=d.teacher_top1, agreement=d.agreement)
        if len(teachers) > 1:  # each teacher alone; the student's seconds include their training
            params.update(teacher_top1s=teacher_top1s, teacher_seconds=seconds)
        rows.append(LowshotRow(rows[-1].model + DISTILLED, fraction, seed, len(idx), d.top1,
                               d.seconds + seconds, params))  # fmt: skip
        log(f"low-shot distillation: {rows[-2].model}, {fraction:g} of the labels, seed {seed}: "
            f"teacher {100 * d.teacher_top1:.1f}% -> student {100 * d.top1:.1f}%")  # fmt: skip
    return rows


_WORKER: dict[str, Any] = {}  # a --jobs worker process's arguments of _finetune_run


def _worker_start(threads: int, arguments: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool
    torch.set_num_threads(threads)
    _WORKER.update(arguments)


def _worker_run(task: tuple[int, str, float, int, Tensor]) -> tuple[int, list[LowshotRow]]:
    number, model, fraction, seed, idx = task
    return number, _finetune_run(**_WORKER, model=model, fraction=fraction, seed=seed, idx=idx,
                                 log=print)  # fmt: skip


def check_jobs(jobs: int, protocol: str) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs is how many fine-tunes run at once, must be >= 1, got {jobs!r}")
    if jobs > 1 and protocol != "finetune":
        raise ValueError("--jobs runs fine-tunes in parallel; a low-shot probe runs in one process "
                         "(leave --jobs out with --probe)")  # fmt: skip
    return jobs


def run_lowshot(
    make_classifier: Callable[[str, int], Classifier],
    inputs: InputSpec,
    train: LabelledImages,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    fractions: Sequence[float] = (0.01, 0.1),
    seeds: int = 3,
    protocol: str = "finetune",
    cfg: FinetuneConfig = DEFAULT_FINETUNE,
    models: Sequence[str] = MODELS,
    self_training: SelfTrainConfig | None = None,
    distillation: DistillConfig | None = None,
    unlabelled: Tensor | None = None,
    done: Sequence[LowshotRow] = (),
    on_rows: Callable[[list[LowshotRow]], None] | None = None,
    jobs: int = 1,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[LowshotRow]:
    """Every model x fraction x seed: a subset fixed by (labels, seed), then fine-tune or probe.

    make_classifier(model, seed) builds a fresh Classifier ("pretrained" or "random init"; the
    random init is drawn from `seed`). Fine-tuning seeds the crops and the batch order with the
    subset's seed too. protocol "linear" fits the L-BFGS probe on frozen features of the subset
    (features extracted once per model; the random-init encoder of seed 0).
    self_training (fine-tuning only): each fine-tuned model then self-trains on its subset and
    the uint8 `unlabelled` images (default: all of train's images, labels unused), one more row
    per run, model "<model> + self-training".
    distillation (fine-tuning only): then the run's last model (self-trained, if self-training)
    teaches a fresh make_classifier(model, seed) on the `unlabelled` images (SimCLR v2 step 3;
    alpha < 1 mixes in the subset's labels), one more row, "<last row's model> + distillation".
    With distillation.teachers = n > 1, n - 1 more models are trained as the last one was (self-
    trained from the same fine-tuned model, or fine-tuned), with seeds seed + i * 1000, and the n
    teach together; the row's params give each one's top-1 and its seconds include their training.
    done: rows of an interrupted call with the same settings; a (model, fraction, seed) run they
    hold whole (all its rows) is reused, not run again.
    on_rows: called with the new rows of each finished run, so the caller can keep them.
    jobs > 1 (fine-tuning only): that many runs at once, each in a spawned process with `threads`
    threads (default: this process's threads // jobs, at least 1). make_classifier must then
    pickle (a module-level class, not a closure); the rows come back in the same order.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown low-shot protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    if self_training is not None and protocol != "finetune":
        raise ValueError(
            "low-shot self-training continues a fine-tuned model: use protocol finetune"
        )
    if distillation is not None and protocol != "finetune":
        raise ValueError(
            "low-shot distillation learns from a fine-tuned model: use protocol finetune"
        )
    check_jobs(jobs, protocol)
    if unlabelled is None:
        unlabelled = train.images
    check_plan(fractions, seeds)
    for model in models:
        if model not in MODELS:
            raise ValueError(f"unknown low-shot model {model!r}; choose from {list(MODELS)}")
    subsets = {(f, s): class_balanced_subset(train.labels, f, s)  # fails early on bad fractions
               for f in fractions for s in range(seeds)}  # fmt: skip
    kept = {(r.model, r.fraction, r.seed): r for r in done}
    results: dict[int, list[LowshotRow]] = {}  # task number -> its rows, in the task order
    tasks: list[tuple[int, str, float, int, Tensor]] = []  # number, model, fraction, seed, subset
    for model in models:
        for (fraction, seed), idx in subsets.items():
            names = [model] + ([model + SELF_TRAINED] if self_training is not None else [])
            if distillation is not None:
                names.append(names[-1] + DISTILLED)
            number = len(results) + len(tasks)
            if all((name, fraction, seed) in kept for name in names):
                results[number] = [kept[(name, fraction, seed)] for name in names]
                log(f"low-shot {protocol}: {model}, {fraction:g} of the labels, seed {seed}: "
                    f"kept from the interrupted call")  # fmt: skip
            else:
                tasks.append((number, model, fraction, seed, idx))

    def finished(number: int, rows: list[LowshotRow]) -> None:
        results[number] = rows
        if on_rows is not None:
            on_rows(rows)

    if protocol == "linear":
        features: dict[str, tuple[Tensor, Tensor]] = {}
        for number, model, fraction, seed, idx in tasks:
            if model not in features:  # train [N, D], test [M, D]
                encoder, device = make_classifier(model, 0).encoder, pick_device(cfg.device)
                features[model] = tuple(
                    extract_features(encoder, x, transform=inputs.eval, device=device)
                    for x in (train.images, test_images)
                )  # type: ignore[assignment]
            train_x, test_x = features[model]
            probe = linear_probe(train_x[idx], train.labels[idx], test_x, test_labels)
            log(f"low-shot linear: {model}, {fraction:g} of the labels ({len(idx):,} images), "
                f"seed {seed}: top-1 {100 * probe.top1:.1f}%")  # fmt: skip
            finished(number, [LowshotRow(model, fraction, seed, len(idx), probe.top1, None,
                                         dict(probe.params))])  # fmt: skip
    else:
        arguments = {"make_classifier": make_classifier, "inputs": inputs, "train": train,
                     "test_images": test_images, "test_labels": test_labels, "cfg": cfg,
                     "self_training": self_training, "distillation": distillation,
                     "unlabelled": unlabelled}  # fmt: skip
        if jobs == 1 or len(tasks) <= 1:
            for number, model, fraction, seed, idx in tasks:
                finished(number, _finetune_run(**arguments, model=model, fraction=fraction,
                                               seed=seed, idx=idx, log=log))  # fmt: skip
        else:
            per_job = threads if threads is not None else max(1, torch.get_num_threads() // jobs)
            log(f"low-shot: {len(tasks)} runs, {jobs} at a time, {per_job} thread(s) each")
            context = torch.multiprocessing.get_context("spawn")  # tensors travel in shared memory
            pool = context.Pool(min(jobs, len(tasks)), _worker_start, (per_job, arguments))
            try:
                for number, rows in pool.imap_unordered(_worker_run, tasks):
                    finished(number, rows)
            except BaseException:
                pool.terminate()  # a failed run or Ctrl-C stops the others; finished ones are kept
                pool.join()
                raise
            pool.close()  # all done: the workers exit on their own (no kill mid-exit)
            pool.join()
    return [row for number in sorted(results) for row in results[number]]
