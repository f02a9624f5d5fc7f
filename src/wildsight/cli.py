"""Command line: `wildsight pretrain | eval linear|knn | embed | models | demo`. Thin: it turns
flags into config overrides and calls `wildsight.api`. Errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from wildsight import config as config_lib

# flag -> dotted config key (every flag is also settable from YAML under that key)
PRETRAIN_FLAGS = {
    "data": "data.sources", "method": "method.name", "backbone": "backbone.name", "out": "train.out",
    "steps": "train.steps", "epochs": "train.epochs", "time_budget": "train.time_budget_s",
    "batch_size": "train.batch_size", "precision": "train.precision",
    "checkpoint_every": "train.checkpoint_every_steps", "seed": "train.seed", "device": "train.device",
    "lr": "optim.lr", "workers": "data.num_workers", "image_size": "data.image_size",
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wildsight", description="Self-supervised visual features from unlabelled images."
    )
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain an encoder on unlabelled images")
    pre.add_argument("--config", help="YAML config (or a run directory to reproduce)")
    pre.add_argument("--recipe", help="a named recipe shipped with wildsight, e.g. fmnist_demo")
    pre.add_argument(
        "--data", action="append", help="image source (repeatable): folder, list.txt, fmnist:train"
    )
    pre.add_argument("--method")
    pre.add_argument("--backbone")
    pre.add_argument("--out", help="run directory")
    budget = pre.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int)
    budget.add_argument("--epochs", type=float)
    budget.add_argument("--time-budget", type=float, metavar="SECONDS")
    pre.add_argument("--batch-size", type=int)
    pre.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    pre.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    pre.add_argument("--seed", type=int)
    pre.add_argument("--device", choices=["auto", "cpu", "cuda"])
    pre.add_argument("--lr", type=float, help="LR per 256 images (scaled with the batch)")
    pre.add_argument("--workers", type=int, help="data loader worker processes")
    pre.add_argument("--image-size", type=int)
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
    pre.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="evaluate frozen features")
    ev.add_argument("protocol", choices=["linear", "knn"])
    ev.add_argument("--checkpoint", required=True, help="run directory of a pretrain run")
    ev.add_argument("--train", required=True, help="labelled source to fit the probe on")
    ev.add_argument("--test", required=True, help="labelled source to report accuracy on")
    ev.add_argument("--json", help="write the result to this JSON file")
    ev.add_argument(
        "--random-init", action="store_true", help="probe the same backbone at random init"
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--k", type=int, default=20, help="k-NN: neighbours")
    ev.add_argument("--temperature", type=float, default=0.07, help="k-NN: vote temperature")

    em = sub.add_parser("embed", help="write features of images to a .npy file")
    em.add_argument("--checkpoint", required=True)
    em.add_argument("--data", required=True)
    em.add_argument("--out", required=True)
    em.add_argument("--device", default="auto")

    mo = sub.add_parser("models", help="list backbones with parameters and GFLOPs")
    mo.add_argument("--json", action="store_true")

    de = sub.add_parser("demo", help="SwAV on Fashion-MNIST, then probes (what `make demo` runs)")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    return p


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
    if args.no_progress:
        tree = config_lib.set_path(tree, "train.progress", False)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise config_lib.ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        tree = config_lib.set_path(tree, key.strip(), yaml.safe_load(raw))
    return tree


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # one line, exit code 2
        print(f"wildsight: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wildsight: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from wildsight import api

    if args.command == "pretrain":
        tree = pretrain_tree(args)
        if args.resume and args.out and not args.config:
            if (
                Path(args.out) / "config.yaml"
            ).exists():  # resume = the run's own config + new flags
                tree = config_lib.merge(config_lib.read_yaml(args.out), tree)
        result = api.pretrain(config_lib.load(tree), resume=args.resume)
        print(f"done: {result.steps} steps, {result.images_per_s:.0f} img/s, last loss {result.last_loss:.4f}; "
              f"run in {result.run_dir}")  # fmt: skip
    elif args.command == "eval":
        from wildsight.eval import format_table

        kwargs = {"k": args.k, "temperature": args.temperature} if args.protocol == "knn" else {}
        fn = api.eval_linear if args.protocol == "linear" else api.eval_knn
        result = fn(args.checkpoint, args.train, args.test, random_init=args.random_init,
                    json_path=args.json, device=args.device, **kwargs)  # fmt: skip
        row = {"checkpoint": args.checkpoint, "protocol": args.protocol, "top1": result.top1,
               "val_top1": result.val_top1, "params": json.dumps(result.params)}  # fmt: skip
        print(format_table([row], list(row)))
    elif args.command == "embed":
        n, d = api.embed(args.checkpoint, args.data, args.out, device=args.device)
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
    elif args.command == "demo":
        from wildsight.demo import DEMO_TIME_BUDGET_S, run_demo

        run_demo(args.out, time_budget_s=args.time_budget or DEMO_TIME_BUDGET_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
