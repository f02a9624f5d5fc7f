"""Fashion-MNIST benchmark: pretrain for a time budget, then linear-probe and k-NN test accuracy of
the SSL features, of the same backbone at random init and of raw pixels, all in one run; with
images/s and peak memory. Prints one table and writes one JSON file.

    .venv/bin/python benchmarks/fmnist.py --budget 480 --json runs/bench/fmnist.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from wildsight.demo import DEMO_TIME_BUDGET_S, run_demo
from wildsight.eval import format_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=DEMO_TIME_BUDGET_S, help="pretraining seconds")
    p.add_argument(
        "--method", default="swav", help="method to pretrain (the demo recipe's views and backbone)"
    )
    p.add_argument("--out", default="runs/bench/fmnist", help="run directory")
    p.add_argument("--json", default="runs/bench/fmnist.json")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    args = p.parse_args(argv)

    import yaml

    from wildsight import config as config_lib

    overrides: dict = {"method": {"name": args.method}} if args.method != "swav" else {}
    for item in args.set:
        key, _, raw = item.partition("=")
        overrides = config_lib.set_path(overrides, key, yaml.safe_load(raw))
    summary = run_demo(args.out, time_budget_s=args.budget, overrides=overrides)
    pre = summary["pretrain"]
    rows = [
        {**{k: r[k] for k in ("features", "dim", "linear_top1", "knn_top1")},
         "images_per_s": pre["images_per_s"] if r["features"] == "swav" else None,
         "peak_memory_mb": pre["peak_memory_mb"] if r["features"] == "swav" else None}
        for r in summary["rows"]
    ]  # fmt: skip
    print(
        format_table(
            rows,
            list(rows[0]),
            title=f"benchmarks/fmnist.py --budget {args.budget:g} ({args.method})",
        )
    )
    record = {
        "benchmark": "fmnist", "method": args.method, "budget_s": args.budget, "overrides": overrides,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        **summary,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
