"""THE training loop. It knows no method: it calls `before_step`, `forward`, `frozen_parameters`
and `after_step` of a `Method`, in that order, and owns data, devices, precision, optimiser,
schedule, logging and checkpoints. Read it top to bottom.

Faults it survives (README "Reliability"): SIGTERM/SIGINT finish the step, save and return
(`stopped_by` names the signal); a non-finite loss or gradient skips the step, and
`train.max_nonfinite_steps_in_a_row` of them stop the run with a debug dump
(`train/guards.py`); collapse signals warn once; checkpoints are atomic, so a kill at any
moment resumes bit-identically from the last one (`train/checkpoint.py`, `train/restore.py`).
"""

from __future__ import annotations

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
from wildsight.train import checkpoint, distributed, guards, parallel, restore, schedules
from wildsight.train.guards import TrainingError
from wildsight.train.optim import build_optimizer, param_groups
from wildsight.train.precision import autocast
from wildsight.train.resolve import pick_device, resolve_config, view_generator
from wildsight.views import make_views

CALIBRATION_STEPS = 10  # with a time budget, the step count is estimated from this step on


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    images_seen: int
    images_per_s: float
    last_loss: float
    peak_memory_mb: float
    stopped_by: str  # "steps" | "time_budget" | "SIGTERM" | "SIGINT"


def pretrain(cfg: Config, *, resume: bool = False) -> TrainResult:
    t = cfg.train  # a new run over an old one, or nothing to resume: refused before any write
    has_budget = t.online or any(v is not None for v in (t.steps, t.epochs, t.time_budget_s))
    restore.check_out_folder(Path(t.out), resume=resume, has_budget=has_budget)
    if resume and t.init_from and checkpoint.latest_checkpoint(Path(t.out) / "checkpoints"):
        raise config_lib.ConfigError(
            f"--resume continues the run in {t.out!r} from its own checkpoint and --init-from "
            "starts a new run from other weights: give one of them"
        )
    cfg = resolve_config(cfg)
    t, o = cfg.train, cfg.optim
    run_dir = Path(t.out)
    ckpt_dir = run_dir / "checkpoints"
    device = pick_device(t.device)
    parallel.start(device)  # parallel: join torchrun's process group (no-op in one process)
    parallel.check_config(cfg)
    torch.manual_seed(t.seed)
    # --resume: read the checkpoint first; another backbone or method is refused right here
    resumed = restore.read_for_resume(ckpt_dir, config_lib.to_dict(cfg)) if resume else None

    # ---- data, model, optimiser
    dataset = open_dataset(cfg.data.sources, cfg.data.image_size)
    skips = SkipLog()
    loader = Loader(
        dataset, batch_size=parallel.local_batch_size(t.batch_size, t.accumulate_steps),
        rank=distributed.rank(), world_size=distributed.world_size(),  # parallel: this rank's share
        seed=t.seed, shuffle=True, drop_last=True, num_workers=cfg.data.num_workers, endless=True,
        max_skip_fraction=cfg.data.max_skip_fraction, skip_log=skips,
        whole_images=cfg.data.whole_images,
    )  # fmt: skip
    backbone = build_backbone(cfg.backbone.name, small_input=bool(cfg.backbone.small_input))
    backbone.set_grad_checkpointing(cfg.backbone.grad_checkpointing)
    assert cfg.views is not None
    method: Method = build_method(cfg.method, backbone, cfg.views).to(device)
    memory_format = torch.channels_last if cfg.backbone.channels_last else torch.contiguous_format
    method.to(memory_format=memory_format)
    # parallel: SyncBN groups, then DDP or FSDP; `model` runs the forward, `method` is saved
    model = parallel.wrap(method, t, device)
    scale = t.batch_size / o.lr_batch_reference  # linear LR scaling with the global batch
    groups = param_groups(method, o.weight_decay, exclude_bias_and_norm=o.exclude_bias_and_norm,
                          lr_scales=method.lr_scales())  # fmt: skip
    for group in groups:
        group["trust_coefficient"] = o.trust_coefficient  # read by LARS only
        group["trust_norm"], group["momentum_of"] = o.trust_norm, o.momentum_of
    optimizer = build_optimizer(
        o.name, groups, lr=o.lr * scale, momentum=o.momentum, weight_decay=o.weight_decay
    )
    plateau = schedules.HalveOnPlateau(
        o.lr * scale, patience_steps=o.plateau_patience_steps, window_steps=o.plateau_window_steps,
        min_lr=o.final_lr * scale,
    )  # fmt: skip
    nonfinite = guards.NonFiniteGuard(
        t.max_nonfinite_steps_in_a_row, run_dir / parallel.rank_file("nonfinite.json")
    )
    collapse = guards.CollapseMonitor()
    norm_buffers = guards.NormBuffers(method)  # restored when a step is skipped

    # ---- fresh run, resume or init-from: every piece of state that affects the next step
    # last_loss: the loss of the last step taken, which the next step's LR reads (plateau
    # schedule) and the result reports: None before any step (JSON has no NaN)
    state = {"step": 0, "total_steps": None, "elapsed_s": 0.0, "images_seen": 0, "last_loss": None}
    notes = []
    if resumed is not None:
        tensors, saved = resumed
        parts = checkpoint.unflatten_state(tensors, saved["tensor_meta"])
        model_state = parallel.shard_state_like(method.state_dict(), parts["model"])  # FSDP: shard
        restore.load_for_resume(method, model_state, saved["config"], config_lib.to_dict(cfg))
        optimizer.load_state_dict(parallel.shard_optimizer_state(optimizer, parts["optim"]))
        loader.load_state_dict(saved["loader"])
        plateau.load_state_dict(saved["plateau"])
        checkpoint.set_rng_state(saved["rng"] | {"torch": parts["rng"]["torch"]})
        state.update(saved["train"])
        notes.append(f"continuing the run in {str(run_dir)!r} from step {state['step']}")
        nonfinite.load_state_dict(saved.get("nonfinite", {}))
        collapse.warned = bool(saved.get("collapse_warned", False))
    else:
        if resume:
            notes.append(f"--resume given but {ckpt_dir} holds no checkpoint; new run")
        if t.init_from:
            notes.append(
                "initialised " + restore.init_from(t.init_from, method, config_lib.to_dict(cfg))
            )
    if t.epochs is not None or t.steps is not None:  # the config's budget rules, also on resume
        by_epochs = math.ceil(t.epochs * len(loader)) if t.epochs is not None else None
        state["total_steps"] = max(1, min(x for x in (t.steps, by_epochs) if x is not None))
    run_dir.mkdir(parents=True, exist_ok=True)
    parallel.on_rank0((run_dir / "config.yaml").write_text, config_lib.dump(cfg))

    def save() -> None:
        rng = checkpoint.rng_state()
        tensors, meta = checkpoint.flatten_state(
            {
                "model": parallel.full_state(method.state_dict()),  # FSDP: gathered
                "optim": parallel.full_state(optimizer.state_dict()),
                "rng": {"torch": rng.pop("torch")},
            }
        )
        try:
            parallel.on_rank0(  # parallel: rank 0 writes; every rank waits and raises if it failed
                checkpoint.save_checkpoint, ckpt_dir, int(state["step"]), tensors=tensors,
                keep_last=t.keep_last,
                state={"tensor_meta": meta, "train": state, "loader": parallel.loader_state(loader),
                       "plateau": plateau.state_dict(), "rng": rng, "config": config_lib.to_dict(cfg),
                       "nonfinite": nonfinite.state_dict(), "collapse_warned": collapse.warned},
            )  # fmt: skip
        except checkpoint.CheckpointError as err:  # e.g. disk full: stop, the old one is intact
            raise TrainingError(
                f"run stopped at step {state['step']}: {err}; fix that (e.g. free disk space), "
                "then continue with --resume"
            ) from err
        parallel.on_rank0(parallel.gather_skips(skips).write, run_dir / "skipped.tsv")

    def learning_rate(step: int, last_loss: float) -> float:
        if o.schedule == "constant":
            return o.lr * scale
        if o.schedule == "plateau":  # SEER online: fixed LR, halved when the loss stops going down
            return plateau.step(step, last_loss) if math.isfinite(last_loss) else plateau.lr
        total = state["total_steps"]
        if total is None and step >= o.warmup_steps:  # time budget not calibrated yet
            return o.lr * scale
        total = total or max(o.warmup_steps, 1)  # a run shorter than the warm-up warms up less
        if o.schedule == "step":  # Revisiting: linear warm-up, then / 10 at fixed fractions
            warmup = min(o.warmup_steps, total)
            if step < warmup:
                return schedules.warmup_cosine(step, base=o.lr * scale, start=o.start_lr * scale,
                                               warmup_steps=warmup, total_steps=total)  # fmt: skip
            return schedules.step_decay(step, base=o.lr * scale, total_steps=total,
                                        milestones=o.lr_decay_at, factor=o.lr_decay_factor)  # fmt: skip
        return schedules.warmup_cosine(
            step, base=o.lr * scale, start=o.start_lr * scale, final=o.final_lr * scale,
            warmup_steps=min(o.warmup_steps, total), total_steps=total,
        )  # fmt: skip

    def stop_reason() -> str | None:
        received = stop_sync.received(signals.received)  # parallel: the signal all ranks agreed on
        if received:  # preemption / Ctrl-C: checkpoint, then return
            return received
        fixed_budget = t.steps is not None or t.epochs is not None
        if fixed_budget and state["total_steps"] is not None:
            if state["step"] >= state["total_steps"]:
                return "steps"
        if t.time_budget_s is not None and state["elapsed_s"] >= t.time_budget_s:
            return "time_budget"
        return None

    # ---- the loop
    log = RunLog(
        run_dir, total_steps=state["total_steps"], initial_step=state["step"], progress=t.progress
    ) if distributed.rank() == 0 else parallel.NullLog()  # fmt: skip
    stop_sync = parallel.StopSync()  # parallel: every rank stops at the same step
    for note in notes:
        log.message(f"wildsight: {note}")
    method.train()
    last_loss = state["last_loss"] if state["last_loss"] is not None else float("nan")
    window_loss, window_images, window_start = [], 0, time.perf_counter()
    tick = last_save = window_start
    batches = iter(loader)
    try:
        with guards.StopSignals() as signals:
            stopped_by = stop_reason()
            while stopped_by is None:
                batch = parallel.trim_batch(next(batches))  # parallel: equal sizes on all ranks
                step = int(state["step"])
                images = batch.images.to(device, non_blocking=True)  # uint8 [B, 3, S, S]
                # parallel: every rank draws the crops of the whole global batch from one generator
                # and takes those of its own positions: views do not depend on the process count
                gen = view_generator(t.seed, step, 0)
                rows = parallel.global_rows(len(images))  # int64 [B], positions in the global batch
                views = make_views(images, cfg.views, gen, rows=rows, num_rows=t.batch_size,
                                   aspects=batch.aspects)  # fmt: skip
                views = [v.contiguous(memory_format=memory_format) for v in views]
                lr = learning_rate(step, last_loss)
                for group in optimizer.param_groups:  # lr_scale: a method's per-module factor
                    group["lr"] = lr * group.get("lr_scale", 1.0)

                method.set_total_steps(state["total_steps"])  # run length, for BYOL's tau schedule
                method.before_step(step)
                norm_buffers.save()
                optimizer.zero_grad(set_to_none=True)
                # parallel: forward + backward through DDP/FSDP in train.accumulate_steps
                # micro-batches; `loss` is their mean over all ranks, and the backward ran only if
                # it is finite (the same decision on every rank)
                out, loss = parallel.forward_backward(
                    model, views, step, accumulate_steps=t.accumulate_steps,
                    autocast=lambda: autocast(device, t.precision),
                )  # fmt: skip
                bad_grads: list[str] = []
                if math.isfinite(loss):
                    for p in method.frozen_parameters(step):
                        p.grad = None
                    bad_grads = guards.nonfinite_gradients(method.named_parameters())
                if math.isfinite(loss) and not bad_grads:
                    if o.clip_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(method.parameters(), o.clip_grad_norm)
                    optimizer.step()
                    method.after_step(step, out)
                    nonfinite.ok()
                    last_loss = state["last_loss"] = loss
                    window_loss.append(loss)
                else:  # skipped: no update, BatchNorm statistics restored; raises if too many
                    norm_buffers.restore()
                    keys = [dataset.key(i) for i in batch.indices.tolist()]
                    log.message(nonfinite.skip(
                        step, loss=loss, lr=lr, bad_params=bad_grads, batch_keys=keys,
                        last_checkpoint=checkpoint.latest_checkpoint(ckpt_dir),
                    ))  # fmt: skip

                # ---- bookkeeping
                state["step"] = step + 1
                state["images_seen"] += len(images) * distributed.world_size()  # all ranks
                tick, previous = time.perf_counter(), tick
                state["elapsed_s"] += tick - previous  # wall time, data loading included
                # parallel: all ranks agree on the elapsed time and on stop signals
                state["elapsed_s"] = stop_sync.agree(signals.received, state["elapsed_s"])
                window_images += len(images) * distributed.world_size()
                log.advance()
                if t.time_budget_s is not None and t.steps is None and t.epochs is None:
                    # time budget: the step count is re-estimated from the measured pace every
                    # step, so the cosine schedule ends when the budget does, even on a noisy machine
                    if step + 1 >= CALIBRATION_STEPS:
                        pace = (step + 1) / state["elapsed_s"]  # steps per second so far
                        state["total_steps"] = max(step + 2, round(pace * t.time_budget_s))
                        log.set_total(state["total_steps"])
                if state["step"] % t.log_every_steps == 0 or state["step"] == state["total_steps"]:
                    now = time.perf_counter()
                    metrics = {
                        "loss": sum(window_loss) / len(window_loss) if window_loss else math.nan,
                        "lr": lr, "epoch": loader.epoch,
                        "images_per_s": window_images / max(now - window_start, 1e-9),
                        "elapsed_s": state["elapsed_s"], "skipped_images": skips.count,
                        "skipped_steps": nonfinite.total,
                        **{k: float(v) for k, v in out.metrics.items()},
                    }  # fmt: skip
                    log.write(state["step"], metrics)
                    window_loss, window_images, window_start = [], 0, now
                    frozen = next(iter(method.frozen_parameters(step)), None) is not None
                    warmed_up = step >= o.warmup_steps and not frozen
                    warning = collapse.check(step, metrics) if warmed_up else None
                    if warning:
                        log.message(warning)
                stopped_by = stop_reason()
                periodic = state["step"] % t.checkpoint_every_steps == 0 or (
                    t.checkpoint_every_s is not None  # online runs checkpoint by wall time too
                    and time.perf_counter() - last_save >= t.checkpoint_every_s
                )
                periodic = periodic and not nonfinite.in_a_row
                if stopped_by is not None or periodic:
                    save()
                    last_save = time.perf_counter()
            if signals.received:
                log.message(
                    f"wildsight: {stopped_by} received: stopped at step {state['step']} with a "
                    f"checkpoint in {ckpt_dir}; continue with --resume"
                )
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
