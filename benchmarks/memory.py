"""Peak activation memory and step time: per-stage checkpointing on/off, RevNet vs ResNet.

    .venv/bin/python benchmarks/memory.py [--device cpu|cuda] [--batch 4] [--size 112] [--steps 5]
                                          [--threads 1] [--json benchmarks/results/memory_cpu.json]

Configurations (published ImageNet stems, train mode, a step = forward + backward of
mean(features^2), gradients kept allocated between steps):
  resnet50 and regnety_1.6gf, each plain and with per-stage activation checkpointing;
  revnet50 (reversible backward) and the same RevNet-50 with plain autograd, next to resnet50.

How memory is measured (each configuration in fresh subprocesses, so no allocator state leaks):
- cpu: peak RSS of one step above the RSS before it, after a warm-up step. The peak is Linux's
  VmHWM, reset through /proc/self/clear_refs just before the step; the process runs with
  MALLOC_MMAP_THRESHOLD_=65536 so that every tensor above 64 KiB is its own mmap and goes back to
  the OS when freed (RSS then follows live tensors; glibc's default would keep freed activations
  in its heap and hide the next step's peak). This counts everything a step holds at its worst
  moment: activations saved for backward, their gradients, and the transient tensors of a
  recomputation under checkpointing. Timing runs in another fresh process with the default
  allocator, the variants of a model alternating step by step: median of --steps steps after
  --warmup steps, by wall clock and by process CPU time; the time ratios use CPU time on a CPU
  (steadier when other jobs share the cores; revnet50 is compared across processes), wall time on
  a GPU.
- cuda: torch.cuda.max_memory_allocated() over one step minus memory_allocated() before it.
- `saved_mb` (non-checkpointed rows only): bytes of the non-parameter tensors autograd holds at
  the end of the forward, counted by torch.autograd.graph.saved_tensors_hooks (a checkpointed
  stage saves through its own inner hooks, which an outer hook does not see, hence no figure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from wildsight.backbones import build_backbone, count_params

# backbone -> variants: "plain" / "checkpoint" (per-stage activation checkpointing off / on);
# "reversible" / "plain-autograd" (RevNet's reversible backward, or every activation stored)
CONFIGS = {
    "resnet50": ["plain", "checkpoint"],
    "regnety_1.6gf": ["plain", "checkpoint"],
    "revnet50": ["reversible", "plain-autograd"],
}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status: peak RSS needs Linux")


def _set_variant(model: torch.nn.Module, variant: str) -> None:
    """plain / checkpoint: per-stage checkpointing off / on; reversible / plain-autograd: RevNet."""
    if variant in ("plain", "checkpoint"):
        model.set_grad_checkpointing(variant == "checkpoint")  # type: ignore[operator]
    else:
        for stage in model.stage_modules():  # type: ignore[operator]
            stage.reversible = variant == "reversible"


def _step(model: torch.nn.Module, x: torch.Tensor, forward_hooks: Any = None) -> None:
    """Zero the gradients in place, forward (under `forward_hooks`), backward."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    with forward_hooks or contextlib.nullcontext():
        loss = model(x).square().mean()
    loss.backward()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: 'memory' of one variant, or 'time' of the variants interleaved.

    Timing alternates the variants of one model step by step (same process, same weights), so a
    change of load on a shared machine hits them alike.
    """
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_backbone(spec["backbone"]).to(device).train()
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if spec["mode"] == "time":
        wall: dict[str, list[float]] = {v: [] for v in spec["variants"]}
        cpu: dict[str, list[float]] = {v: [] for v in spec["variants"]}
        for round_ in range(spec["warmup"] + spec["steps"]):
            for variant in spec["variants"]:
                _set_variant(model, variant)
                start, start_cpu = time.perf_counter(), time.process_time()
                _step(model, x)
                sync()
                if round_ >= spec["warmup"]:
                    wall[variant].append(time.perf_counter() - start)
                    cpu[variant].append(time.process_time() - start_cpu)
        return {
            v: {
                "step_s": statistics.median(wall[v]),
                "step_cpu_s": statistics.median(cpu[v]),
                "step_s_all": wall[v],
                "step_cpu_s_all": cpu[v],
            }
            for v in spec["variants"]
        }

    _set_variant(model, spec["variant"])
    _step(model, x)  # warm-up: allocates the gradients, picks kernels
    sync()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _step(model, x, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    sync()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    checkpointed = spec["variant"] == "checkpoint"
    return {
        "activation_peak_mb": peak / 2**20,
        "saved_mb": None if checkpointed else sum(saved.values()) / 2**20,
        "params_m": count_params(model) / 1e6,
    }


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    if spec["mode"] == "memory" and spec["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=112, help="image side in px (224 on a GPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    json_path = args.json or Path(f"benchmarks/results/memory_{args.device}.json")

    rows = []
    for backbone, variants in CONFIGS.items():
        spec = {"backbone": backbone, "device": args.device, "batch": args.batch,
                "size": args.size, "steps": args.steps, "warmup": args.warmup,
                "threads": args.threads}  # fmt: skip
        times = _run(spec | {"mode": "time", "variants": variants})
        for variant in variants:
            row = {"model": backbone, "variant": variant}
            row |= _run(spec | {"mode": "memory", "variant": variant})
            rows.append(row | times[variant])
            print(f"  measured {backbone} {variant}", file=sys.stderr)

    # On a CPU the process CPU time is the steadier figure when other jobs share the cores;
    # on a GPU the wall time (synchronised) is what counts.
    time_key = "step_cpu_s" if args.device == "cpu" else "step_s"
    base = {r["model"]: r for r in rows if r["variant"] in ("plain", "plain-autograd")}
    resnet = base["resnet50"]
    for r in rows:
        ref = resnet if r["model"] == "revnet50" else base[r["model"]]
        r["memory_vs_baseline"] = r["activation_peak_mb"] / ref["activation_peak_mb"]
        r["time_vs_baseline"] = r[time_key] / ref[time_key]
        r["baseline"] = f"{ref['model']} {ref['variant']}"

    print(f"\nbatch {args.batch} x {args.size} px on {args.device} ({args.threads} thread(s)), "
          f"torch {torch.__version__}")  # fmt: skip
    header = f"{'model':<14} {'variant':<15} {'params M':>8} {'act. peak MB':>12} "
    header += f"{'saved MB':>9} {'step s':>7} {'cpu s':>6} {'memory':>7} {'time':>6}  vs"
    print(header)
    for r in rows:
        saved = "-" if r["saved_mb"] is None else f"{r['saved_mb']:.0f}"
        print(f"{r['model']:<14} {r['variant']:<15} {r['params_m']:>8.1f} "
              f"{r['activation_peak_mb']:>12.0f} {saved:>9} {r['step_s']:>7.2f} "
              f"{r['step_cpu_s']:>6.2f} {r['memory_vs_baseline']:>7.2f} "
              f"{r['time_vs_baseline']:>6.2f}  {r['baseline']}")  # fmt: skip
    print(f"memory, time: ratios to the baseline row ('vs'), time from {time_key}")
    verdicts = {}
    for r in rows:
        if r["variant"] == "checkpoint":
            cut, extra = 1 - r["memory_vs_baseline"], r["time_vs_baseline"] - 1
            ok = cut >= 0.40 and extra < 0.40
            verdicts[r["model"]] = ok
            print(f"checkpointing {r['model']}: activation memory -{cut:.0%} for {extra:+.0%} "
                  f"step time (target: >= 40% less for < 40% more): {'PASS' if ok else 'FAIL'}")  # fmt: skip

    meta = {
        "device": args.device,
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "memory_method": (
            "cuda max_memory_allocated over one step minus memory_allocated before it"
            if args.device == "cuda"
            else "peak RSS (VmHWM, reset via /proc/self/clear_refs) of one step minus RSS before "
            "it, fresh process, MALLOC_MMAP_THRESHOLD_=65536, after a warm-up step"
        ),
        "time_ratio_from": time_key,
        "checkpointing_target_met": verdicts,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
