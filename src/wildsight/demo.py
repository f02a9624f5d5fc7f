"""`wildsight demo` / `make demo`: SwAV on Fashion-MNIST's training images (labels unused) for a
fixed CPU time budget, then linear-probe and k-NN accuracy on the test set for three feature sets
measured in the same run: the SwAV features, the same backbone at random init, and raw pixels.
"""

from __future__ import annotations

import time
from pathlib import Path

from wildsight import api
from wildsight import config as config_lib
from wildsight.eval import format_table, knn_probe, linear_probe

DEMO_TIME_BUDGET_S = 480.0  # pretraining; the whole demo stays under 15 minutes on 2 CPU cores
# The demo's probe searches a shorter L2 grid than `eval linear` (1e-6 ... 1) to keep the whole
# demo short; the chosen value sits inside it for all three feature sets (results.json: params).
DEMO_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def run_demo(out: str | Path = "runs/demo", *, time_budget_s: float = DEMO_TIME_BUDGET_S,
             train: str = "fmnist:train", test: str = "fmnist:test", overrides: dict | None = None) -> dict:  # fmt: skip
    started = time.perf_counter()
    tree = config_lib.read_yaml(config_lib.recipe_path("fmnist_demo"))
    tree = config_lib.merge(tree, {"data": {"sources": [train]},
                                   "train": {"out": str(out), "time_budget_s": time_budget_s, "steps": None}})  # fmt: skip
    tree = config_lib.merge(tree, overrides or {})
    result = api.pretrain(config_lib.load(tree))
    if result.stopped_by in ("SIGINT", "SIGTERM"):  # the user stopped it (checkpoint saved)
        raise KeyboardInterrupt
    print(
        f"pretrained {result.steps} steps ({result.images_seen:,} images, {result.images_per_s:.0f} img/s) "
        f"in {result.images_seen / max(result.images_per_s, 1e-9):.0f} s; evaluating ..."
    )
    encoders = {
        "swav": api.load_encoder(out),
        "random init": api.load_encoder(out, random_init=True),
        "raw pixels": None,
    }
    rows = []
    for name, encoder in encoders.items():
        size = 28 if encoder is None else encoder.config.data.image_size
        train_x, train_y = api.source_features(encoder, train, image_size=size)
        test_x, test_y = api.source_features(encoder, test, image_size=size)
        linear = linear_probe(train_x, train_y, test_x, test_y, l2_grid=DEMO_L2_GRID, max_iter=300)
        knn = knn_probe(train_x, train_y, test_x, test_y)
        rows.append({
            "features": name, "dim": train_x.shape[1], "linear_top1": linear.top1, "knn_top1": knn.top1,
            "linear": linear.to_dict(), "knn": knn.to_dict(),
        })  # fmt: skip
    print(format_table(rows, ["features", "dim", "linear_top1", "knn_top1"],
                       title=f"Fashion-MNIST test accuracy ({result.steps} SwAV steps on {train})"))  # fmt: skip
    summary = {
        "pretrain": {"steps": result.steps, "images_seen": result.images_seen,
                     "images_per_s": result.images_per_s, "peak_memory_mb": result.peak_memory_mb,
                     "time_budget_s": time_budget_s, "last_loss": result.last_loss},
        "rows": rows,
        "total_s": time.perf_counter() - started,
    }  # fmt: skip
    api.write_json(Path(out) / "results.json", summary)
    print(f"results written to {Path(out) / 'results.json'} ({summary['total_s']:.0f} s in all)")
    return summary
