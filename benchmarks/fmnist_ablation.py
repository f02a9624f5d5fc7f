"""One ablation run for the Fashion-MNIST demo recipe: pretrain with `key=value` overrides, then
k-NN and linear-probe test accuracy; appends one JSON line to --results.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/fmnist_ablation.py b64 t500 train.batch_size=64

BUDGET is a step count (`600`) or seconds (`t500`). Overrides are dotted config keys, plus two
shorthands for the views: `gscale=LO,HI` (scale of the global crops) and `local=N,SIZE,LO,HI`
(adds N local crops). One thread per run, runs in sequence: that is how README's ablation table
was measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wildsight import api
from wildsight import config as config_lib
from wildsight.eval import knn_probe, linear_probe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("budget", help="steps (600) or seconds (t500)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--runs", default="runs/ablation")
    p.add_argument("--results", default="runs/ablation/results.jsonl")
    args = p.parse_args()
    tree = config_lib.read_yaml(config_lib.recipe_path("fmnist_demo"))
    budget = args.budget
    by_time = budget.startswith("t")
    out = Path(args.runs) / args.name
    tree = config_lib.merge(tree, {"train": {
        "out": str(out), "steps": None if by_time else int(budget),
        "time_budget_s": float(budget[1:]) if by_time else None,
        "progress": False, "checkpoint_every_steps": 100_000}})  # fmt: skip
    for item in args.overrides:
        key, _, raw = item.partition("=")
        if key == "gscale":
            tree["views"]["groups"][0]["scale"] = [float(x) for x in raw.split(",")]
        elif key == "local":
            n, size, lo, hi = raw.split(",")
            group = dict(tree["views"]["groups"][0])
            group.update(count=int(n), size=int(size), scale=[float(lo), float(hi)])
            tree["views"]["groups"].append(group)
        else:
            tree = config_lib.set_path(tree, key, config_lib.yaml12_value(raw))
    started = time.time()
    result = api.pretrain(config_lib.load(tree))
    pretrain_s = time.time() - started
    encoder = api.load_encoder(out)
    train_x, train_y = api.source_features(encoder, "fmnist:train", image_size=28)
    test_x, test_y = api.source_features(encoder, "fmnist:test", image_size=28)
    knn = knn_probe(train_x, train_y, test_x, test_y)
    linear = linear_probe(train_x, train_y, test_x, test_y, l2_grid=(1e-4, 1e-3), max_iter=200)
    row = {"name": args.name, "steps": result.steps, "img_s": round(result.images_per_s),
           "loss": round(result.last_loss, 3), "knn": knn.top1, "linear": linear.top1,
           "l2": linear.params, "pretrain_s": round(pretrain_s),
           "total_s": round(time.time() - started), "over": args.overrides}  # fmt: skip
    print(json.dumps(row))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
