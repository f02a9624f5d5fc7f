"""What the training loop watches besides the loss: stop signals, non-finite steps, collapse.

Three small, separately tested pieces, so that `trainer.py` stays readable top to bottom:

- `StopSignals`: SIGTERM / SIGINT (cluster preemption, Ctrl-C) only set a flag; the loop
  finishes its step, saves a checkpoint and returns. A second signal stops at once.
- `NonFiniteGuard`: a step whose loss or any gradient is NaN/inf is skipped (no optimizer
  step, no `after_step`) and counted; `limit` such steps in a row stop the run with a JSON
  debug dump, leaving the last good checkpoint as it was (fp16 overflow is the usual cause;
  DINO stops on a non-finite loss, VISSL dumps the scores).
- `CollapseMonitor`: warns once when a method's logged collapse signals stay at their
  collapsed value (method-agnostic: it reads `StepOutput.metrics` keys).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from wildsight.fileio import write_atomically

__all__ = [
    "COLLAPSE_SIGNALS",
    "CollapseMonitor",
    "CollapseSignal",
    "NonFiniteGuard",
    "NormBuffers",
    "StopSignals",
    "TrainingError",
    "nonfinite_gradients",
]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is intact."""


# ----------------------------------------------------------------------------- signals


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT set `received` ("SIGTERM"/"SIGINT")
    instead of killing the process; the loop polls it between steps. A second signal restores
    the default action and re-raises it (the process dies as if never caught). Outside the
    main thread signals cannot be caught and this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # asked twice: stop now, no checkpoint
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ------------------------------------------------------------------------ numerical faults


def nonfinite_gradients(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an inf (None grads are ignored).

    One fused max-norm per parameter and a single host sync: max|g| is finite iff every entry
    is (NaN propagates). Not the 2-norm: it overflows float32 for entries above ~1e19.
    """
    named = [(n, p.grad) for n, p in named_parameters if p.grad is not None]
    if not named:
        return []
    norms = torch._foreach_norm([g for _, g in named], float("inf"))  # fused, [P] scalars
    finite = torch.isfinite(torch.stack([n.float().cpu() for n in norms]))  # [P] bool
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


class NonFiniteGuard:
    """Counts skipped steps; after `limit` in a row writes `dump_path` and raises TrainingError.

    `in_a_row` and `total` are meant to be checkpointed by the caller (see `state_dict`).
    The dump (JSON) lists, for each step of the streak: step, loss, lr, the parameters with
    non-finite gradients (empty when the loss itself was non-finite: no backward was run)
    and the keys of the batch's images (file paths, or `<idx file>#<row>`).
    """

    MAX_NAMES = 20  # per step in the dump; the count is always complete

    def __init__(self, limit: int, dump_path: Path):
        if limit < 1:
            raise ValueError(f"the non-finite step limit must be >= 1, got {limit}")
        self.limit, self.dump_path = limit, dump_path
        self.in_a_row, self.total = 0, 0
        self._streak: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.in_a_row, self.total = int(state.get("in_a_row", 0)), int(state.get("total", 0))

    def ok(self) -> None:
        self.in_a_row = 0
        self._streak.clear()

    def skip(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        bad_params: list[str],
        batch_keys: list[str],
        last_checkpoint: Path | None,
    ) -> str:
        """Record a skipped step; returns a one-line log message, or raises after `limit`."""
        self.in_a_row += 1
        self.total += 1
        self._streak.append(
            {
                "step": step, "loss": _json_float(loss), "lr": lr,
                "nonfinite_grads": bad_params[: self.MAX_NAMES],
                "num_nonfinite_grads": len(bad_params), "batch": batch_keys,
            }
        )  # fmt: skip
        self._streak = self._streak[-self.limit :]
        what = f"gradient of {_names(bad_params)}" if bad_params else f"loss ({loss})"
        if self.in_a_row < self.limit:
            return f"step {step}: non-finite {what}; step skipped ({self.total} so far)"
        self._write_dump(last_checkpoint)
        kept = (
            f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
        )
        raise TrainingError(
            f"non-finite {what} for {self.in_a_row} steps in a row (last: step {step}); run "
            f"stopped; debug dump in {self.dump_path}; {kept}; try --precision fp32, a lower "
            "--lr or optim.clip_grad_norm, then --resume"
        )

    def _write_dump(self, last_checkpoint: Path | None) -> None:
        record = {
            "limit": self.limit,
            "skipped_steps_total": self.total,
            "last_good_checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "steps": self._streak,
        }
        write_atomically(self.dump_path, json.dumps(record, indent=1) + "\n")


class NormBuffers:
    """The running statistics of every norm layer, saved before a forward pass and restored
    when the step is skipped: a NaN batch would otherwise poison BatchNorm's running mean and
    variance for good, since they are updated in the forward pass itself."""

    def __init__(self, model: nn.Module):
        norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
        self.buffers = [b for m in norms for b in m.buffers()]
        self.saved = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/inf


# ------------------------------------------------------------------------------ collapse


@dataclass(frozen=True)
class CollapseSignal:
    """A `StepOutput.metrics` key that is at most `threshold` when the method has collapsed."""

    key: str
    threshold: float
    meaning: str
    remedies: str


SWAV_REMEDIES = (
    "freeze the prototypes longer (method.freeze_prototypes_steps), use a queue "
    "(method.queue_length, method.queue_start_step), a smaller Sinkhorn epsilon (method.epsilon), "
    "a larger batch, or a lower LR / longer warmup"
)

# Thresholds (ours, chosen far from healthy values so that a warning means a real collapse):
# - code_entropy_norm = H(histogram of hard code assignments) / ln(min(B, K)), 1 when a batch
#   spreads over as many prototypes as it can, 0 when every image picks the same one (SwAV's
#   reported failure, loss stuck at ln K). 0.2 means fewer than B**0.2 prototypes in use
#   (3 of a batch of 256).
# - feature_std: per-dimension std over the batch of L2-normalised features, averaged over
#   dimensions (SimSiam, Chen & He 2021, §4.1): 1/sqrt(d) for isotropic features (0.088 at
#   d = 128, 0.0625 at 256, 0.022 at 2048), 0 when every image maps to the same vector.
COLLAPSE_SIGNALS = (
    CollapseSignal(
        "code_entropy_norm", 0.2, "all images are assigned to a handful of prototypes",
        SWAV_REMEDIES,
    ),
    CollapseSignal(
        "feature_std", 0.01, "the feature variance went to zero (every image maps to one vector)",
        "SwAV: " + SWAV_REMEDIES + "; BYOL: keep the predictor, a slower target (method.tau_base "
        "closer to 1), a lower LR; SimCLR: a larger batch or a lower temperature",
    ),
)  # fmt: skip


class CollapseMonitor:
    """Warns once per run when a collapse signal stays at or below its threshold for `patience`
    consecutive checks. Checks are meant for logged steps after the warm-up (LR warm-up over,
    nothing frozen): at random init some signals are meaningless."""

    def __init__(self, patience: int = 3, signals: tuple[CollapseSignal, ...] = COLLAPSE_SIGNALS):
        self.patience, self.signals = patience, signals
        self.warned = False
        self._streak = {s.key: 0 for s in signals}

    def check(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """The warning text the first time a signal has been collapsed `patience` times in a row."""
        tripped = []
        for s in self.signals:
            value = metrics.get(s.key)
            if value is None or not math.isfinite(value):
                continue
            self._streak[s.key] = self._streak[s.key] + 1 if value <= s.threshold else 0
            if self._streak[s.key] >= self.patience:
                tripped.append((s, value))
        if self.warned or not tripped:
            return None
        self.warned = True
        what = "; ".join(
            f"{s.key} = {v:.3g} <= {s.threshold} for {self.patience} checks: {s.meaning}"
            for s, v in tripped
        )
        remedies = " | ".join(dict.fromkeys(s.remedies for s, _ in tripped))
        return f"warning: collapse at step {step}: {what}. Usual remedies: {remedies}"
