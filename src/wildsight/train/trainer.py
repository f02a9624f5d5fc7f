"""THE training loop. It knows no method: it calls `before_step`, `forward`, `frozen_parameters`
and `after_step` of a `Method`, in that order, and owns data, devices, precision, optimiser,
schedule, logging and checkpoints. Read it top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wildsight import config as config_lib
from wildsight.backbones import build_backbone
from wildsight.config import Config
from wildsight.data import Loader, SkipLog, open_dataset
from wildsight.log import RunLog
from wildsight.methods import Method, build_method
from wildsight.train import checkpoint, distributed, schedules
from wildsight.train.optim import build_optimizer, param_groups
from wildsight.train.precision import autocast
from wildsight.views import default_views, make_views

CALIBRATION_STEPS = 10  # with a time budget, the step count is estimated from this step on
MAX_BAD_STEPS_IN_A_ROW = 20


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    images_seen: int
    images_per_s: float
    last_loss: float
    peak_memory_mb: float
    stopped_by: str


def resolve_config(cfg: Config) -> Config:
    """Fills the automatic choices (image size, small stem, views) so config.yaml states them all."""
    data = cfg.data
    if data.image_size == 0:
        fmnist = all(s.startswith("fmnist") or "fashion" in s for s in data.sources)
        data = dataclasses.replace(data, image_size=28 if fmnist else 256)
    backbone = cfg.backbone
    if backbone.small_input is None:
        backbone = dataclasses.replace(backbone, small_input=data.image_size <= 64)
    views = cfg.views or default_views(data.image_size, cfg.method.name)
    t = cfg.train
    if t.steps is None and t.epochs is None and t.time_budget_s is None:
        raise config_lib.ConfigError("no training budget: give --steps, --epochs or --time-budget")
    return dataclasses.replace(cfg, data=data, backbone=backbone, views=views)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise config_lib.ConfigError(
            "train.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def view_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The crops of a step depend only on (seed, step, rank): a resumed run draws the same ones."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def pretrain(cfg: Config, *, resume: bool = False) -> TrainResult:
    cfg = resolve_config(cfg)
    t, o = cfg.train, cfg.optim
    if distributed.world_size() > 1:
        raise config_lib.ConfigError("multi-process training is not available yet; run one process")
    run_dir = Path(t.out)
    ckpt_dir = run_dir / "checkpoints"
    device = pick_device(t.device)
    torch.manual_seed(t.seed)

    # ---- data, model, optimiser
    dataset = open_dataset(cfg.data.sources, cfg.data.image_size)
    skips = SkipLog()
    loader = Loader(
        dataset, batch_size=t.batch_size, seed=t.seed, shuffle=True, drop_last=True,
        num_workers=cfg.data.num_workers, endless=True,
        max_skip_fraction=cfg.data.max_skip_fraction, skip_log=skips,
    )  # fmt: skip
    backbone = build_backbone(cfg.backbone.name, small_input=bool(cfg.backbone.small_input))
    backbone.set_grad_checkpointing(cfg.backbone.grad_checkpointing)
    assert cfg.views is not None
    method: Method = build_method(cfg.method, backbone, cfg.views).to(device)
    memory_format = torch.channels_last if cfg.backbone.channels_last else torch.contiguous_format
    method.to(memory_format=memory_format)
    scale = t.batch_size / o.lr_batch_reference  # linear LR scaling with the global batch
    groups = param_groups(method, o.weight_decay, exclude_bias_and_norm=o.exclude_bias_and_norm)
    for group in groups:
        group["trust_coefficient"] = o.trust_coefficient  # read by LARS only
    optimizer = build_optimizer(
        o.name, groups, lr=o.lr * scale, momentum=o.momentum, weight_decay=o.weight_decay
    )
    plateau = schedules.HalveOnPlateau(
        o.lr * scale, patience_steps=o.plateau_patience_steps, window_steps=o.plateau_window_steps,
        min_lr=o.final_lr * scale,
    )  # fmt: skip

    # ---- fresh run or resume: every piece of state that affects the next step is restored
    state = {"step": 0, "total_steps": None, "elapsed_s": 0.0, "images_seen": 0, "bad_steps": 0}
    if resume and (ckpt_dir / "latest").exists():
        tensors, saved = checkpoint.load_checkpoint(ckpt_dir)
        parts = checkpoint.unflatten_state(tensors, saved["tensor_meta"])
        method.load_state_dict(parts["model"], strict=True)
        optimizer.load_state_dict(parts["optim"])
        loader.load_state_dict(saved["loader"])
        plateau.load_state_dict(saved["plateau"])
        checkpoint.set_rng_state(saved["rng"] | {"torch": parts["rng"]["torch"]})
        state.update(saved["train"])
    elif resume:
        print(f"wildsight: --resume given but {ckpt_dir} holds no checkpoint; starting a new run")
    if t.epochs is not None or t.steps is not None:  # the config's budget rules, also on resume
        by_epochs = math.ceil(t.epochs * len(loader)) if t.epochs is not None else None
        state["total_steps"] = max(1, min(x for x in (t.steps, by_epochs) if x is not None))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.dump(cfg))

    def save() -> None:
        rng = checkpoint.rng_state()
        tensors, meta = checkpoint.flatten_state(
            {
                "model": method.state_dict(),
                "optim": optimizer.state_dict(),
                "rng": {"torch": rng.pop("torch")},
            }
        )
        checkpoint.save_checkpoint(
            ckpt_dir, int(state["step"]), tensors=tensors, keep_last=t.keep_last,
            state={"tensor_meta": meta, "train": state, "loader": loader.state_dict(),
                   "plateau": plateau.state_dict(), "rng": rng, "config": config_lib.to_dict(cfg)},
        )  # fmt: skip
        skips.write(run_dir / "skipped.tsv")

    def learning_rate(step: int, last_loss: float) -> float:
        if o.schedule == "constant":
            return o.lr * scale
        if o.schedule == "plateau":  # SEER online: fixed LR, halved when the loss stops going down
            return plateau.step(step, last_loss) if math.isfinite(last_loss) else plateau.lr
        total = state["total_steps"]
        if total is None and step >= o.warmup_steps:  # time budget not calibrated yet
            return o.lr * scale
        return schedules.warmup_cosine(
            step, base=o.lr * scale, start=o.start_lr * scale, final=o.final_lr * scale,
            warmup_steps=o.warmup_steps, total_steps=total or max(o.warmup_steps, 1),
        )  # fmt: skip

    # ---- the loop
    log = RunLog(
        run_dir, total_steps=state["total_steps"], initial_step=state["step"], progress=t.progress
    )
    method.train()
    last_loss, window_loss, window_images, window_start = float("nan"), [], 0, time.perf_counter()
    tick = window_start
    stopped_by = "steps"
    try:
        for batch in loader:
            step = int(state["step"])
            if state["total_steps"] is not None and step >= state["total_steps"]:
                if t.time_budget_s is None or t.steps is not None or t.epochs is not None:
                    break
                if state["elapsed_s"] >= t.time_budget_s:
                    stopped_by = "time_budget"
                    break
            if t.time_budget_s is not None and state["elapsed_s"] >= t.time_budget_s:
                stopped_by = "time_budget"
                break
            images = batch.images.to(device, non_blocking=True)  # uint8 [B, 3, S, S]
            views = make_views(images, cfg.views, view_generator(t.seed, step, distributed.rank()))
            views = [v.contiguous(memory_format=memory_format) for v in views]  # [B, 3, s, s] each
            lr = learning_rate(step, last_loss)
            for group in optimizer.param_groups:
                group["lr"] = lr

            method.before_step(step)
            with autocast(device, t.precision):
                out = method(views, step)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(out.loss):
                state["bad_steps"] += 1
                log.message(f"step {step}: non-finite loss {out.loss.item()}; step skipped")
                if state["bad_steps"] >= MAX_BAD_STEPS_IN_A_ROW:
                    raise TrainingError(
                        f"loss was non-finite for {state['bad_steps']} steps in a row at step {step}; "
                        f"try --precision fp32 or a lower lr; last good checkpoint in {ckpt_dir}"
                    )
                state["step"] = step + 1
                continue
            out.loss.backward()
            for p in method.frozen_parameters(step):
                p.grad = None
            if o.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), o.clip_grad_norm)
            optimizer.step()
            method.after_step(step, out)
            state["bad_steps"] = 0

            # ---- bookkeeping
            last_loss = out.loss.item()
            state["step"] = step + 1
            state["images_seen"] += len(images)
            tick, previous = time.perf_counter(), tick
            state["elapsed_s"] += tick - previous  # wall time, data loading included
            window_loss.append(last_loss)
            window_images += len(images)
            log.advance()
            if t.time_budget_s is not None and t.steps is None and t.epochs is None:
                # time budget: the step count is re-estimated from the measured pace every step,
                # so the cosine schedule ends when the budget does, even on a noisy machine
                if step + 1 >= CALIBRATION_STEPS:
                    pace = (step + 1) / state["elapsed_s"]  # steps per second so far
                    state["total_steps"] = max(step + 2, round(pace * t.time_budget_s))
                    log.set_total(state["total_steps"])
            if state["step"] % t.log_every_steps == 0 or state["step"] == state["total_steps"]:
                now = time.perf_counter()
                metrics = {
                    "loss": sum(window_loss) / len(window_loss), "lr": lr, "epoch": loader.epoch,
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                    "elapsed_s": state["elapsed_s"], "skipped_images": skips.count,
                    **{k: float(v) for k, v in out.metrics.items()},
                }  # fmt: skip
                log.write(state["step"], metrics)
                window_loss, window_images, window_start = [], 0, now
            if state["step"] % t.checkpoint_every_steps == 0:
                save()
        save()
    finally:
        log.close()
    elapsed = max(state["elapsed_s"], 1e-9)
    return TrainResult(
        run_dir=run_dir, steps=int(state["step"]), images_seen=int(state["images_seen"]),
        images_per_s=state["images_seen"] / elapsed, last_loss=last_loss,
        peak_memory_mb=_peak_memory_mb(device), stopped_by=stopped_by,
    )  # fmt: skip


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
