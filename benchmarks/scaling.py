"""Images per second of a recipe on 1 and 2 processes: data-parallel scaling under torchrun.

    .venv/bin/python benchmarks/scaling.py [--device cpu|cuda] [--processes 1 2] [--steps 30]
        [--threads 1] [--recipe fmnist_demo] [--syncbn] [--json benchmarks/results/scaling_cpu.json]

Each configuration is one real `torchrun --standalone --nproc_per_node N -m wildsight pretrain`
in a fresh run directory (gloo on the CPU, NCCL on GPUs), with the recipe's global batch (the
fmnist_demo recipe: SwAV, RegNetX-200MF, 28 px, batch 256), so each process gets 256 / N images
per step. Every process runs --threads intra-op threads (OMP_NUM_THREADS). Throughput is the
global images per second of the steps after the first log window (warm-up), as the trainer logs
it in metrics.jsonl: wall clock, data and augmentation included. Efficiency = ips(N) / (N x
ips(1)). `cores` is what this process may run on (sched_getaffinity): with fewer cores than
processes x threads the processes share cores, and the efficiency measures that contention,
not the code; `cpu_s_per_image` (process CPU time of all ranks / images) shows the overhead
of the extra process independently of contention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def run(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One torchrun of `n` processes; its throughput from the run's metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="wildsight-scaling-") as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", "-m", "wildsight", "pretrain", "--recipe", args.recipe,
            "--steps", str(args.steps), "--out", str(out), "--device", args.device,
            "--no-progress", "--set", f"train.log_every_steps={args.log_every}",
            "--set", f"train.checkpoint_every_steps={10 * args.steps}",
            "--set", f"train.syncbn_group_size={n if args.syncbn else 0}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"{n} processes failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    timed = rows[1:]  # the first window holds the first steps' one-off costs
    steps = [b["step"] - a["step"] for a, b in zip(rows, timed, strict=False)]
    batch = _global_batch(args.recipe)
    images = sum(s * batch for s in steps)
    seconds = sum(s * batch / r["images_per_s"] for s, r in zip(steps, timed, strict=True))
    return {
        "processes": n,
        "threads_per_process": args.threads,
        "images_per_s": images / seconds,
        "timed_steps": sum(steps),
        "global_batch": batch,
        "wall_s_whole_run": wall,  # start-up, data loading and checkpoint included
        "cpu_s_per_image": cpu_s / (args.steps * batch),  # all processes, start-up included
    }


def _global_batch(recipe: str) -> int:
    from wildsight import config

    return int(config.read_yaml(config.recipe_path(recipe))["train"]["batch_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipe", default="fmnist_demo")
    parser.add_argument("--syncbn", action="store_true", help="SyncBN over all processes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and max(args.processes) > torch.cuda.device_count():
        raise SystemExit(f"{max(args.processes)} processes need as many GPUs")
    rows = [run(n, args) for n in args.processes]
    base = next((r["images_per_s"] for r in rows if r["processes"] == 1), None)
    for r in rows:
        r["efficiency"] = r["images_per_s"] / (r["processes"] * base) if base else None
    cores = sorted(os.sched_getaffinity(0))
    print(f"{args.recipe} on {args.device}, cores {cores}, {args.threads} thread(s)/process")
    print(f"{'processes':>9} {'images/s':>9} {'efficiency':>10} {'cpu ms/img':>10} {'wall s':>7}")
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        print(f"{r['processes']:>9} {r['images_per_s']:>9.1f} {eff:>10} "
              f"{1000 * r['cpu_s_per_image']:>10.2f} {r['wall_s_whole_run']:>7.1f}")  # fmt: skip
    meta = {
        "recipe": args.recipe, "device": args.device, "steps": args.steps,
        "log_every_steps": args.log_every, "syncbn": args.syncbn, "cores": cores,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "load_average_at_end": os.getloadavg(),
    }  # fmt: skip
    path = args.json or Path(f"benchmarks/results/scaling_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
