"""Fashion-MNIST benchmark: pretrain each method for the same time budget, then linear-probe and
k-NN test accuracy of its features, next to the same backbone at random init and raw pixels, all
in one run; with images/s and peak memory. Prints one table and writes one JSON file.

    .venv/bin/python benchmarks/fmnist.py --budget 540                  # SwAV (what make demo runs)
    .venv/bin/python benchmarks/fmnist.py --method all --budget 540     # every method, one table
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from wildsight import api
from wildsight import config as config_lib
from wildsight.demo import (
    DEMO_TIME_BUDGET_S,
    FMNIST_RECIPES,
    pretrain_fmnist,
    pretrain_summary,
    probe_row,
)
from wildsight.eval import format_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=DEMO_TIME_BUDGET_S, help="pretraining seconds")
    p.add_argument("--method", default="swav", help=f"one of {sorted(FMNIST_RECIPES)}, or 'all'")
    p.add_argument("--out", default="runs/bench", help="parent of the run directories")
    p.add_argument("--json", default=None, help="default: OUT/fmnist_METHOD.json")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    p.add_argument("--train", default="fmnist:train")
    p.add_argument("--test", default="fmnist:test")
    args = p.parse_args(argv)
    methods = list(FMNIST_RECIPES) if args.method == "all" else [args.method]
    overrides: dict = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        overrides = config_lib.set_path(overrides, key, config_lib.yaml12_value(raw))

    started = time.perf_counter()
    rows, runs = [], {}
    for method in methods:
        out = Path(args.out) / f"fmnist_{method}"
        result = pretrain_fmnist(
            method, out, time_budget_s=args.budget, train=args.train, overrides=overrides
        )
        row = probe_row(method, api.load_encoder(out), args.train, args.test)
        pre = pretrain_summary(result, args.budget)
        rows.append({**row, "steps": pre["steps"], "images_per_s": pre["images_per_s"],
                     "peak_memory_mb": pre["peak_memory_mb"]})  # fmt: skip
        runs[method] = {"run_dir": str(out), "pretrain": pre}
        print(format_table(rows[-1:], ["features", "linear_top1", "knn_top1", "images_per_s"]))
    reference = Path(args.out) / f"fmnist_{methods[0]}"  # same backbone, fresh weights
    rows.append(probe_row("random init", api.load_encoder(reference, random_init=True),
                          args.train, args.test))  # fmt: skip
    rows.append(probe_row("raw pixels", None, args.train, args.test))
    columns = [
        "features",
        "dim",
        "linear_top1",
        "knn_top1",
        "steps",
        "images_per_s",
        "peak_memory_mb",
    ]
    table = format_table(rows, columns, title=f"benchmarks/fmnist.py --method {args.method} "
                         f"--budget {args.budget:g}: Fashion-MNIST test accuracy")  # fmt: skip
    print(table)
    record = {
        "benchmark": "fmnist", "method": args.method, "budget_s": args.budget,
        "overrides": overrides, "runs": runs, "rows": rows,
        "total_s": time.perf_counter() - started,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__},
    }  # fmt: skip
    path = Path(args.json or Path(args.out) / f"fmnist_{args.method}.json")
    api.write_json(path, record)
    print(f"wrote {path} ({record['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
