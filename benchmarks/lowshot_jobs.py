"""Wall time of one `eval lowshot` call: N runs at once (--jobs N, one thread each) against one
process that gives all its threads to each run in turn. Same runs and seeds; only the way the
cores are shared differs, and with it the order of the sums, so the largest top-1 difference
between the two calls is printed too (same threads per run give the same results exactly).

    .venv/bin/python benchmarks/lowshot_jobs.py --checkpoint runs/bench_all/fmnist_swav \\
        [--steps 300] [--seeds 2] [--json benchmarks/results/lowshot_jobs_cpu.json]

Each call runs fine-tunes of the pretrained model and the random init on the 1% subsets of
`--seeds` seeds (2 x seeds runs of `--steps` steps), in a fresh process so that the thread
settings of one call cannot leak into the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wildsight.eval import format_table
from wildsight.fileio import write_json


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one_call(args: argparse.Namespace, jobs: int, threads: int, folder: Path) -> dict:
    out = folder / f"jobs{jobs}.json"
    cmd = [sys.executable, "-m", "wildsight", "eval", "lowshot", "--checkpoint", args.checkpoint,
           "--train", args.train, "--test", args.test, "--fractions", str(args.fraction),
           "--seeds", str(args.seeds), "--steps", str(args.steps), "--jobs", str(jobs),
           "--name", f"bench-jobs{jobs}", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    doc = json.loads(out.read_text())
    return {"jobs": jobs, "threads_per_process": threads // jobs,
            "runs": len(doc["runs"]), "wall_s": wall,
            "top1": {f"{r['model']} seed {r['seed']}": r["top1"] for r in doc["runs"]}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/bench_all/fmnist_swav")
    p.add_argument("--train", default="fmnist:train")
    p.add_argument("--test", default="fmnist:test")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in (1, args.threads):
            rows.append(one_call(args, jobs, args.threads, Path(tmp)))
            print(f"jobs {jobs}: {rows[-1]['wall_s']:.0f} s", flush=True)
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = base / r["wall_s"]
    print(format_table(rows, ["jobs", "threads_per_process", "runs", "wall_s", "speedup"],
                       title=f"eval lowshot, {args.threads} threads, {rows[0]['runs']} fine-tunes "
                             f"of {args.steps} steps"))  # fmt: skip
    worst = max(abs(rows[0]["top1"][k] - rows[1]["top1"][k]) for k in rows[0]["top1"])
    print(f"largest top-1 difference between the two calls: {100 * worst:.2f} points")
    doc = {"benchmark": "lowshot_jobs", "cpu": cpu_name(),
           "threads": args.threads, "steps": args.steps, "seeds": args.seeds,
           "fraction": args.fraction, "checkpoint": args.checkpoint, "rows": rows,
           "largest_top1_difference": worst}  # fmt: skip
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
