"""Command line: `wildsight pretrain | eval linear|mlp|knn|transfer|finetune|lowshot | distill | report | embed | shards | models | demo`. Thin: it turns
flags into config overrides and calls `wildsight.api`. Errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from wildsight import config as config_lib

if TYPE_CHECKING:
    from wildsight.eval.finetune import FinetuneConfig

_Config = TypeVar("_Config")  # a frozen config dataclass

# flag -> dotted config key (every flag is also settable from YAML under that key)
PRETRAIN_FLAGS = {
    "data": "data.sources", "method": "method.name", "backbone": "backbone.name", "out": "train.out",
    "steps": "train.steps", "epochs": "train.epochs", "time_budget": "train.time_budget_s",
    "batch_size": "train.batch_size", "precision": "train.precision",
    "checkpoint_every": "train.checkpoint_every_steps", "seed": "train.seed", "device": "train.device",
    "lr": "optim.lr", "workers": "data.num_workers", "image_size": "data.image_size",
    "init_from": "train.init_from",
    "memory": "method.memory",
}  # fmt: skip
STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as a shell reports it

# `eval` flags -> the protocols that read them; a flag given to another protocol is refused
# rather than ignored (--checkpoint, --train, --test, --json, --device and --name serve all)
_PROBES = ("linear", "mlp", "knn", "transfer")
_TRAINED = ("finetune", "lowshot")
_LOWSHOT_ONLY = (
    "fractions", "seeds", "probe", "jobs", "self_train", "unlabelled", "self_train_steps",
    "threshold", "cutout", "ema", "distill", "distill_steps", "distill_temperature",
    "distill_alpha", "distill_teachers", "distill_flip",
)  # fmt: skip
EVAL_FLAG_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "k": ("knn",), "temperature": ("knn",), "solver": ("linear", "transfer"), "layers": _PROBES,
    "random_init": (*_PROBES, "finetune"), "fraction": ("finetune",), "seed": ("finetune",),
    "save": ("finetune",), "keep_head_layers": _TRAINED,
    **dict.fromkeys(("steps", "epochs", "batch_size", "lr", "weight_decay", "warmup", "precision"),
                    _TRAINED),
    **dict.fromkeys(_LOWSHOT_ONLY, ("lowshot",)),
}  # fmt: skip


def _parser(*, only_given: bool = False) -> argparse.ArgumentParser:
    """The argument parser; `only_given=True`: an `eval` flag the user left out is absent from
    the namespace instead of holding its default (see `_given_eval_flags`)."""
    from wildsight.eval.distill import DEFAULT_DISTILL
    from wildsight.eval.finetune import DEFAULT_FINETUNE
    from wildsight.eval.selftrain import DEFAULT_SELF_TRAIN

    p = argparse.ArgumentParser(
        prog="wildsight", description="Self-supervised visual features from unlabelled images."
    )
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain an encoder on unlabelled images")
    pre.add_argument("--config", help="YAML config (or a run directory to reproduce)")
    pre.add_argument("--recipe", help="a named recipe shipped with wildsight, e.g. fmnist_demo")
    pre.add_argument(
        "--data",
        action="append",
        help="image source (repeatable): folder, list.txt, fmnist:train, shard folder or "
        "'dir/shard-{000000..000099}.tar'",
    )
    pre.add_argument("--method")
    pre.add_argument("--backbone")
    pre.add_argument("--out", help="run directory")
    budget = pre.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int)
    budget.add_argument("--epochs", type=float)
    budget.add_argument("--time-budget", type=float, metavar="SECONDS")
    budget.add_argument(
        "--online", action="store_true",
        help="SEER online: train on the endless stream until stopped (SIGTERM/Ctrl-C), LR halved "
        "on loss plateaus, a checkpoint every 30 min of wall time (train.checkpoint_every_s)",
    )  # fmt: skip
    pre.add_argument("--batch-size", type=int)
    pre.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    pre.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    pre.add_argument("--seed", type=int)
    pre.add_argument("--device", choices=["auto", "cpu", "cuda"])
    pre.add_argument("--lr", type=float, help="LR per 256 images (scaled with the batch)")
    pre.add_argument("--workers", type=int, help="data loader worker processes")
    pre.add_argument("--image-size", type=int)
    pre.add_argument(
        "--memory", type=int, metavar="N", help="simclr: MoCo-style queue of N negatives"
    )
    pre.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. method.epsilon=0.03",
    )
    pre.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    pre.add_argument(
        "--init-from", metavar="RUN_OR_CHECKPOINT", help="new run from these trained weights"
    )
    pre.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="evaluate frozen features")
    ev.add_argument("protocol", choices=["linear", "mlp", "knn", "transfer", "finetune", "lowshot"])
    ev.add_argument("--checkpoint", required=True, help="run directory of a pretrain run")
    ev.add_argument("--train", required=True, help="labelled source to fit the probe on")
    ev.add_argument("--test", required=True, help="labelled source to report accuracy on")
    ev.add_argument("--json", help="write the result to this JSON file")
    ev.add_argument(
        "--random-init", action="store_true", help="probe the same backbone at random init"
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--k", type=int, nargs="+", default=[20], help="k-NN: k (one row each)")
    ev.add_argument("--solver", choices=["lbfgs", "sgd"], default="lbfgs", help="linear/transfer")
    ev.add_argument("--layers", nargs="+", default=None,
                    help="stage1 ... pre_logits (pooled), stage1_grid ... (maps pooled to ~9k values, Goyal et al. 2019), all or grids")  # fmt: skip
    ev.add_argument("--name", help="result name: RUN_DIR/eval/NAME.json (default from the options)")
    ev.add_argument("--temperature", type=float, default=0.07, help="k-NN: vote temperature")
    ev.add_argument("--fraction", type=float, help="finetune: class-balanced share of the labels")
    ev.add_argument("--seed", type=int, default=0, help="finetune: label subset and training seed")
    ev.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1], help="lowshot")
    ev.add_argument("--seeds", type=int, default=3, help="lowshot: seeds 0 .. N-1 per fraction")
    ev.add_argument("--probe", action="store_true", help="lowshot: linear probe, not fine-tuning")
    ev.add_argument("--jobs", type=int, default=1, help="lowshot: fine-tune N runs at once, one "
                    "process each, with THREADS/N threads (runs are independent; default 1)")  # fmt: skip
    ev.add_argument("--keep-head-layers", type=int, help="simclr: fine-tune from head layer N")
    _finetune_flags(ev, DEFAULT_FINETUNE)
    ev.add_argument("--self-train", action="store_true",
                    help="lowshot: then self-train each fine-tuned model on unlabelled images "
                         "(FixMatch pseudo-labels), one more row per model")  # fmt: skip
    ev.add_argument("--unlabelled", help="lowshot --self-train/--distill: images without labels "
                                         "(default: the --train images, labels unused)")  # fmt: skip
    ev.add_argument(
        "--self-train-steps",
        type=int,
        help=f"lowshot --self-train: steps (default {DEFAULT_SELF_TRAIN.train.steps})",
    )
    ev.add_argument("--threshold", type=float, help="lowshot --self-train: confidence a pseudo-"
                    f"label needs (default {DEFAULT_SELF_TRAIN.threshold:g})")  # fmt: skip
    ev.add_argument("--cutout", type=float, help="lowshot --self-train: side of the square the "
                    "strong view blanks, as a fraction of the image; 0 = none (default "
                    f"{DEFAULT_SELF_TRAIN.strong_cutout:g})")  # fmt: skip
    ev.add_argument("--ema", type=float, help="lowshot --self-train: test a moving average of the "
                    f"weights with this decay per step; 0 = the last weights (default "
                    f"{DEFAULT_SELF_TRAIN.ema_decay:g})")  # fmt: skip

    ev.add_argument("--distill", action="store_true",
                    help="lowshot: then distil each run's last model (fine-tuned or self-trained) "
                         "into a fresh one on the unlabelled images (SimCLR v2 step 3), one more "
                         "row per model")  # fmt: skip
    ev.add_argument("--distill-steps", type=int, help="lowshot --distill: steps (default "
                    f"{DEFAULT_DISTILL.train.steps})")  # fmt: skip
    ev.add_argument("--distill-temperature", type=float, help="lowshot --distill: temperature "
                    f"(default {DEFAULT_DISTILL.temperature:g})")  # fmt: skip
    ev.add_argument("--distill-alpha", type=float, help="lowshot --distill: weight of the "
                    "distillation term, 1 - alpha that of the subset's labels (default "
                    f"{DEFAULT_DISTILL.alpha:g})")  # fmt: skip
    ev.add_argument("--distill-teachers", type=int, metavar="N", help="lowshot --distill: N "
                    "models teach together, their probabilities averaged: the run's last model "
                    "and N - 1 more trained the same way with other seeds (default "
                    f"{DEFAULT_DISTILL.teachers})")  # fmt: skip
    ev.add_argument("--distill-flip", action="store_const", const=True, help="lowshot --distill: "
                    "the teacher's probabilities averaged over the view and its left-right flip")  # fmt: skip

    di = sub.add_parser("distill", help="SimCLR v2 step 3: a fine-tuned teacher -> a student")
    di.add_argument("--teacher", required=True, nargs="+", metavar="DIR",
                    help="folder of `eval finetune --save DIR`; several teach together, their "
                         "probabilities averaged")  # fmt: skip
    di.add_argument("--teacher-flip", action="store_true", help="the teacher's probabilities "
                    "averaged over the view and its left-right flip")  # fmt: skip
    di.add_argument(
        "--unlabelled", required=True, help="images the teacher labels, e.g. fmnist:train"
    )
    di.add_argument("--test", required=True, help="labelled source to report both accuracies on")
    student = di.add_mutually_exclusive_group()
    student.add_argument("--student-checkpoint", help="pretrain run to start the student from "
                                                      "(default: the teacher's own run)")  # fmt: skip
    student.add_argument("--student-backbone", help="a backbone name, trained from random init")
    di.add_argument("--temperature", type=float, default=1.0, help="T of P(y|x; T)")
    di.add_argument("--alpha", type=float, default=1.0, help="weight of distillation vs labels")
    di.add_argument(
        "--train",
        help="labelled source for alpha < 1 (default: the labels the teachers were fine-tuned on)",
    )
    di.add_argument("--json", help="write the result to this JSON file")
    di.add_argument("--device", default="auto")
    _finetune_flags(di, DEFAULT_DISTILL.train)

    em = sub.add_parser("embed", help="write features of images to a .npy file")
    em.add_argument("--checkpoint", required=True)
    em.add_argument("--data", required=True)
    em.add_argument("--out", required=True)
    em.add_argument("--device", default="auto")
    em.add_argument("--keep-head-layers", type=int,
                    help="simclr: embed with the first N head layers (default: the run's own)")  # fmt: skip

    rp = sub.add_parser("report", help="(re)build RUN_DIR/report.html from RUN_DIR/eval/*.json")
    rp.add_argument("run_dir")

    mo = sub.add_parser("models", help="list backbones with parameters and GFLOPs")
    mo.add_argument("--json", action="store_true")

    sh = sub.add_parser("shards", help="pack image sources into WebDataset tar shards")
    sh.add_argument("--data", action="append", required=True, help="image source (repeatable)")
    sh.add_argument("--out", required=True, help="folder for shard-000000.tar ... and index.json")
    sh.add_argument("--shard-size", type=int, required=True, metavar="N", help="images per shard")
    sh.add_argument("--reencode", choices=["none", "png", "jpeg"], default="none",
                    help="none: keep each file's bytes (IDX images become PNG)")  # fmt: skip
    sh.add_argument("--workers", type=int, default=0, help="decoding processes")

    de = sub.add_parser("demo", help="SwAV on Fashion-MNIST, then probes (what `make demo` runs)")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    if only_given:
        for action in ev._actions:
            if action.option_strings and action.dest != "help":
                action.default = argparse.SUPPRESS
    return p


def _given_eval_flags(argv: Sequence[str] | None) -> set[str]:
    """The dests of the `eval` flags present on the command line (defaults do not count)."""
    return set(vars(_parser(only_given=True).parse_args(argv)))


def check_eval_flags(protocol: str, given: set[str]) -> None:
    """Refuse a flag that `eval PROTOCOL` would not read, naming the protocols that do."""
    for dest in sorted(given):
        users = EVAL_FLAG_PROTOCOLS.get(dest)
        if users is not None and protocol not in users:
            flag = "--" + dest.replace("_", "-")
            where = " / ".join(f"`eval {u}`" for u in users)
            raise ValueError(f"`eval {protocol}` does not use {flag}: it is a flag of {where}")


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse an output path that cannot be written before any work starts: --json must name
    a file (not a folder), --save a folder (not a file)."""
    from wildsight.fileio import check_file_target, check_folder_target

    if args.command in ("shards", "demo"):  # folders they create
        check_folder_target(args.out, "--out")
        return
    if args.command not in ("eval", "distill"):
        return
    if args.json:
        check_file_target(args.json, "--json")
    if args.save:
        from wildsight.eval.models import CLASSIFIER_FILES

        check_folder_target(args.save, "--save", own_files=CLASSIFIER_FILES)


def _report_path(checkpoint: str) -> Path:
    """RUN_DIR/report.html of `--checkpoint` RUN or RUN/checkpoints/ckpt-N."""
    from wildsight.eval.models import run_directory

    return run_directory(checkpoint) / "report.html"


def pretrain_tree(args: argparse.Namespace) -> dict:
    """The config mapping of a pretrain command: recipe < --config < flags < --set."""
    tree: dict = {}
    if args.recipe:
        tree = config_lib.read_yaml(config_lib.recipe_path(args.recipe))
    if args.config:
        tree = config_lib.merge(tree, config_lib.read_yaml(args.config))
    for flag, key in PRETRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            tree = config_lib.set_path(tree, key, list(value) if flag == "data" else value)
    if args.steps is not None or args.epochs is not None or args.time_budget is not None:
        for flag, key in (
            ("steps", "steps"),
            ("epochs", "epochs"),
            ("time_budget", "time_budget_s"),
        ):
            if getattr(args, flag) is None:
                tree = config_lib.set_path(tree, f"train.{key}", None)
    if args.online:  # no budget: the run ends on a signal; SEER's fixed LR halved on plateau
        for key in ("steps", "epochs", "time_budget_s"):
            tree = config_lib.set_path(tree, f"train.{key}", None)
        tree = config_lib.set_path(tree, "train.online", True)
        tree = config_lib.set_path(tree, "optim.schedule", "plateau")
        if tree.get("train", {}).get("checkpoint_every_s") is None:
            tree = config_lib.set_path(tree, "train.checkpoint_every_s", 1800.0)
    if args.no_progress:
        tree = config_lib.set_path(tree, "train.progress", False)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise config_lib.ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        tree = config_lib.set_path(tree, key.strip(), config_lib.yaml12_value(raw))
    return tree


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"wildsight: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # type: ignore[assignment]  # no source lines
    args = _parser().parse_args(argv)
    try:
        if args.command == "eval":
            check_eval_flags(args.protocol, _given_eval_flags(argv))
        check_output_paths(args)
        return _run(args)
    except (ValueError, OSError, RuntimeError) as err:  # one line, exit code 2
        print(f"wildsight: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wildsight: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from wildsight import api

    if args.command == "pretrain":
        tree = pretrain_tree(args)
        run_config = Path(args.out or ".") / "config.yaml"
        if args.resume and args.out and not args.config and run_config.exists():
            # resume = the run's own config + new flags; an error of the file itself names it
            saved = config_lib.read_yaml(args.out)
            try:
                config_lib.load(saved)
            except config_lib.ConfigError as err:
                raise config_lib.ConfigError(f"{run_config}: {err}") from None
            tree = config_lib.merge(saved, tree)
        cfg = config_lib.load(tree)
        result = api.pretrain(cfg, resume=args.resume)
        print(f"done: {result.steps} steps, {result.images_per_s:.0f} img/s, last loss {result.last_loss:.4f}; "
              f"run in {result.run_dir}")  # fmt: skip
        if result.stopped_by in STOP_EXIT_CODES:  # preempted: checkpoint saved, --resume goes on
            return STOP_EXIT_CODES[result.stopped_by]
    elif args.command == "eval" and args.protocol in ("linear", "mlp", "knn", "transfer"):
        from wildsight.eval import format_table

        doc = api.evaluate(args.protocol, args.checkpoint, args.train, args.test, layers=args.layers,
                           solver=args.solver, ks=args.k, temperature=args.temperature,
                           random_init=args.random_init, device=args.device, json_path=args.json,
                           name=args.name)  # fmt: skip
        rows = [{**r, "params": json.dumps(r["params"])} for r in doc["rows"]]
        shown = ("features", "layer", "k", "top1", "val_top1", "params")
        columns = [c for c in shown if c in rows[0]]
        print(format_table(rows, columns, title=f"{args.protocol}: {args.train} -> {args.test}"))
        print(f"report: {_report_path(args.checkpoint)}")
    elif args.command == "eval":  # finetune | lowshot
        _run_finetune(args)
    elif args.command == "distill":
        _run_distill(args)
    elif args.command == "report":
        print(f"report: {api.report(args.run_dir)}")
    elif args.command == "embed":
        n, d = api.embed(args.checkpoint, args.data, args.out, device=args.device,
                         keep_head_layers=args.keep_head_layers)  # fmt: skip
        print(f"wrote {n} x {d} features to {args.out}")
    elif args.command == "models":
        from wildsight.backbones import describe_backbones
        from wildsight.eval import format_table

        rows = describe_backbones()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            shown = [{**r, "params_M": r["params"] / 1e6} for r in rows]
            print(format_table(shown, ["name", "family", "params_M", "gflops", "feature_dim"]))
    elif args.command == "shards":
        packed = api.make_shards(args.data, args.out, shard_size=args.shard_size,
                                 reencode=args.reencode, workers=args.workers)  # fmt: skip
        print(f"packed {packed.total} images in {len(packed.shards)} shards into {packed.out_dir} "
              f"({packed.skipped} skipped" + (", see skipped.tsv)" if packed.skipped else ")"))  # fmt: skip
    elif args.command == "demo":
        from wildsight.demo import DEMO_TIME_BUDGET_S, run_demo

        budget = DEMO_TIME_BUDGET_S if args.time_budget is None else args.time_budget
        run_demo(args.out, time_budget_s=budget)
    return 0


def _finetune_flags(p: argparse.ArgumentParser, defaults: FinetuneConfig) -> None:
    """Flags of the fine-tuning optimisation (eval finetune | lowshot, distill); None = the
    value in `defaults`, which the help shows."""
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument(
        "--epochs", type=float, help="passes over the training images (wins over --steps)"
    )
    p.add_argument(
        "--batch-size", type=int, help=f"images per step (default {defaults.batch_size})"
    )
    decay = ", ".join(f"{f:.3g}" for f in defaults.lr_decay_at)
    p.add_argument("--lr", type=float, help=f"SGD LR per 256 images (default {defaults.lr:g}), "
                   f"x{defaults.lr_decay_factor:g} at {decay} of the steps")  # fmt: skip
    p.add_argument("--weight-decay", type=float, help=f"default {defaults.weight_decay:g} (SEER)")
    p.add_argument("--warmup", type=float, metavar="FRACTION", help="linear LR warm-up over this "
                   f"share of the steps (default {defaults.warmup_fraction:g})")  # fmt: skip
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="default auto")
    p.add_argument("--save", metavar="DIR", help="write the trained classifier to DIR")


def _given(base: _Config, **flags: Any) -> _Config:
    """`base` with the flags the user gave; a flag left out (None) keeps base's value."""
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


def _finetune_config(args: argparse.Namespace, base: FinetuneConfig) -> FinetuneConfig:
    return _given(base, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, weight_decay=args.weight_decay, warmup_fraction=args.warmup,
                  precision=args.precision, device=args.device)  # fmt: skip


def _run_finetune(args: argparse.Namespace) -> None:
    """eval finetune | eval lowshot: the whole network trained on (a subset of) the labels."""
    from wildsight import api
    from wildsight.eval import format_table
    from wildsight.eval.distill import DEFAULT_DISTILL
    from wildsight.eval.finetune import DEFAULT_FINETUNE
    from wildsight.eval.selftrain import DEFAULT_SELF_TRAIN

    cfg = _finetune_config(args, DEFAULT_FINETUNE)
    self_flags = [f"--{k}" for k in ("self_train_steps", "threshold", "cutout", "ema")
                  if getattr(args, k) is not None]  # fmt: skip
    if self_flags and not args.self_train:
        raise ValueError(f"{' '.join(self_flags).replace('_', '-')} need --self-train")
    for flag in ("self_train_steps", "distill_steps"):  # named here, not as "fine-tuning steps"
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.unlabelled is not None and not (args.self_train or args.distill):
        raise ValueError("--unlabelled is the images of --self-train or --distill: add one")
    if args.self_train and (args.protocol != "lowshot" or args.probe):
        raise ValueError("--self-train continues fine-tuned models: use it with `eval lowshot` "
                         "(without --probe)")  # fmt: skip
    distill_flags = [f"--{k}" for k in ("distill_steps", "distill_temperature", "distill_alpha",
                                        "distill_teachers", "distill_flip")
                     if getattr(args, k) is not None]  # fmt: skip
    if distill_flags and not args.distill:
        raise ValueError(f"{' '.join(distill_flags).replace('_', '-')} need --distill")
    if args.distill and (args.protocol != "lowshot" or args.probe):
        raise ValueError("--distill learns from fine-tuned models: use it with `eval lowshot` "
                         "(without --probe); for one teacher, `wildsight distill`")  # fmt: skip
    if args.jobs != 1 and args.protocol != "lowshot":
        raise ValueError(
            "--jobs runs several low-shot fine-tunes at once: use it with `eval lowshot`"
        )
    shared = {"precision": cfg.precision, "device": cfg.device, "batch_size": cfg.batch_size}
    self_training = None
    if args.self_train:
        train = _given(DEFAULT_SELF_TRAIN.train, **shared, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, steps=args.self_train_steps)  # fmt: skip
        self_training = _given(DEFAULT_SELF_TRAIN, train=train, threshold=args.threshold,
                               strong_cutout=args.cutout, ema_decay=args.ema)  # fmt: skip
    distillation = None
    if args.distill:
        train = _given(DEFAULT_DISTILL.train, **shared, steps=args.distill_steps)
        distillation = _given(DEFAULT_DISTILL, train=train, temperature=args.distill_temperature,
                              alpha=args.distill_alpha, teachers=args.distill_teachers,
                              teacher_flip=args.distill_flip)  # fmt: skip
    if args.protocol == "finetune":
        doc = api.eval_finetune(args.checkpoint, args.train, args.test, fraction=args.fraction,
                                seed=args.seed, random_init=args.random_init,
                                keep_head_layers=args.keep_head_layers, config=cfg,
                                json_path=args.json, save_dir=args.save, name=args.name)  # fmt: skip
        columns = ["features", "fraction", "num_train", "steps", "seconds", "train_top1", "top1"]
        print(format_table(doc["rows"], columns, title=f"fine-tune: {args.train} -> {args.test}"))
    else:
        doc = api.eval_lowshot(args.checkpoint, args.train, args.test, fractions=args.fractions,
                               seeds=args.seeds, protocol="linear" if args.probe else "finetune",
                               keep_head_layers=args.keep_head_layers, config=cfg,
                               self_training=self_training, distillation=distillation,
                               unlabelled=args.unlabelled,
                               json_path=args.json, name=args.name or "lowshot",
                               jobs=args.jobs)  # fmt: skip
        rows = [{**r, "mean_top1": r["mean"], "std_top1": r["std"]} for r in doc["rows"]]
        columns = ["model", "fraction", "num_labels", "seeds", "mean_top1", "std_top1"]
        print(format_table(rows, columns, title=f"low-shot {doc['evaluation']}: {args.train} -> "
                                                f"{args.test}, mean +- std over seeds"))  # fmt: skip
    print(f"report: {_report_path(args.checkpoint)}")


def _run_distill(args: argparse.Namespace) -> None:
    from wildsight import api
    from wildsight.eval import format_table
    from wildsight.eval.distill import DEFAULT_DISTILL, DistillConfig

    cfg = DistillConfig(temperature=args.temperature, alpha=args.alpha,
                        teacher_flip=args.teacher_flip,
                        train=_finetune_config(args, DEFAULT_DISTILL.train))  # fmt: skip
    doc = api.distill(args.teacher, args.unlabelled, args.test,
                      student_checkpoint=args.student_checkpoint,
                      student_backbone=args.student_backbone, train=args.train, config=cfg,
                      json_path=args.json, save_dir=args.save)  # fmt: skip
    print(format_table(doc["rows"], ["model", "features", "top1"],
                       title=f"distillation on {args.unlabelled} (T={args.temperature}, "
                             f"alpha={args.alpha}), test {args.test}"))  # fmt: skip
    print(f"student agrees with the teacher on {100 * doc['agreement']:.1f}% of the test images")


if __name__ == "__main__":
    sys.exit(main())
