"""Does torch.compile speed up the demo's training step on this CPU? Eager against compiled.

    .venv/bin/python benchmarks/compile.py [--threads 2] [--rounds 5] [--steps 4] \
        [--device cpu] [--json runs/bench/compile.json]

The step is the demo recipe's backbone work: RegNetX-200MF (small input, channels-last, as
`fmnist_demo` sets it) forward and backward on 2 views x 128 images of 28 px, then an SGD step
with momentum; the backbone is nearly all of a SwAV step's arithmetic (the head is 368 -> 512 ->
128 and the 300 prototypes). Two copies of the same weights, one eager and one wrapped in
`torch.compile` (inductor, default mode), are timed in alternating rounds of `--steps` steps, so
machine noise falls on both alike; the table gives the median step time of each and their
ratio, and the compile time (the first compiled steps, which a time budget would pay). CPU time
per step is the steadier figure on a shared machine (with one thread it is the work itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from wildsight.backbones import build_backbone


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, n: int
) -> tuple[float, float]:
    """n training steps; returns (wall seconds, process CPU seconds) per step."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per round and model")
    parser.add_argument("--batch", type=int, default=256, help="images per step (2 views x 128)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (wall time is the figure)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/compile.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last
    device = torch.device(args.device)
    eager = build_backbone("regnetx_200mf", small_input=True).to(device, memory_format=fmt)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x = torch.randn(args.batch, 3, 28, 28, device=device).contiguous(memory_format=fmt)

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    opt_eager, opt_compiled = sgd(eager), sgd(compiled_module)
    t0 = time.perf_counter()
    train_steps(compiled, opt_compiled, x, 2)  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    train_steps(eager, opt_eager, x, 2)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "torch.compile": []}
    for _ in range(args.rounds):
        times["eager"].append(train_steps(eager, opt_eager, x, args.steps))
        times["torch.compile"].append(train_steps(compiled, opt_compiled, x, args.steps))
    eager_wall = statistics.median(w for w, _ in times["eager"])
    eager_cpu = statistics.median(c for _, c in times["eager"])
    rows = []
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        rows.append(
            {
                "mode": name,
                "step_ms_wall": 1000 * wall,
                "step_ms_cpu": 1000 * cpu,
                "images_per_s_wall": args.batch / wall,
                "speedup_vs_eager_wall": eager_wall / wall,
                "speedup_vs_eager_cpu": eager_cpu / cpu,
                "first_two_steps_s": compile_s if name == "torch.compile" else None,
                "round_step_ms_wall": [1000 * w for w, _ in values],
                "round_step_ms_cpu": [1000 * c for _, c in values],
            }
        )
    print(
        f"{'mode':<16}{'wall ms':>9}{'CPU ms':>9}{'img/s':>7}"
        f"{'vs eager (wall)':>17}{'(CPU)':>8}{'compile (s)':>13}"
    )
    for r in rows:
        first = f"{r['first_two_steps_s']:.0f}" if r["first_two_steps_s"] is not None else "-"
        print(
            f"{r['mode']:<16}{r['step_ms_wall']:>9.0f}{r['step_ms_cpu']:>9.0f}"
            f"{r['images_per_s_wall']:>7.0f}{r['speedup_vs_eager_wall']:>16.2f}x"
            f"{r['speedup_vs_eager_cpu']:>7.2f}x{first:>13}"
        )
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    meta = {
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "cpu_count": os.cpu_count(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "precision": "fp32",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
