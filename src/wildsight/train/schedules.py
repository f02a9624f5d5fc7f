"""Schedules as pure functions of the global step, and the one stateful schedule.

SEER: "LR 0.15 warmed up linearly to 9.6 over 8,000 updates, then cosine to 0.0096" and,
for never-ending online training, "a fixed LR, halved whenever the loss stops going down".
BYOL: "tau rises from 0.996 to 1 by a cosine schedule over training".
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["HalveOnPlateau", "cosine_ramp", "step_decay", "warmup_cosine"]


def warmup_cosine(
    step: int,
    *,
    base: float,
    warmup_steps: int,
    total_steps: int,
    start: float = 0.0,
    final: float = 0.0,
) -> float:
    """Linear ``start -> base`` over ``[0, warmup_steps]``, cosine ``base -> final`` until
    ``total_steps``, constant ``final`` afterwards.

    value(0) = start, value(warmup_steps) = base,
    value(warmup_steps + (total_steps - warmup_steps) / 2) = (base + final) / 2,
    value(t >= total_steps) = final.
    SEER: ``warmup_cosine(step, start=0.15, base=9.6, warmup_steps=8000, total_steps=T,
    final=0.0096)``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    if step >= total_steps:
        return final
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_ramp(step: int, *, total_steps: int, start: float, end: float) -> float:
    """``end - (end - start) * (cos(pi * step / total_steps) + 1) / 2``; ``end`` after total.

    BYOL's target EMA rate: ``tau = cosine_ramp(step, total_steps=T, start=0.996, end=1.0)``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step >= total_steps:
        return end
    return end - (end - start) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def step_decay(
    step: int, *, base: float, total_steps: int, milestones: tuple[float, ...], factor: float
) -> float:
    """``base * factor ** (number of milestones passed)``; milestones are fractions of total_steps.

    SEER fine-tuning (LR / 10 after 30 of 35 epochs): ``step_decay(step, base=0.0125,
    total_steps=T, milestones=(30 / 35,), factor=0.1)``. A milestone m is passed from step
    ``ceil(m * total_steps)`` on.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    passed = sum(step >= math.ceil(m * total_steps - 1e-9) for m in milestones)  # 30/35*35
    return base * factor**passed


class HalveOnPlateau:
    """A fixed LR, halved whenever the smoothed loss stops going down (SEER online training).

    Call ``step(step, loss)`` once per optimisation step with increasing ``step``. The
    smoothed loss is the mean of the losses reported for the last ``window_steps`` steps;
    it is only judged once a full window has been seen. It "improves" when it falls below
    ``best - threshold * |best|`` (a relative improvement of more than ``threshold``); then
    ``best`` is updated. When it has not improved for ``patience_steps`` steps, the LR is
    halved (never below ``min_lr``) and the patience count restarts from that step, so the
    halved LR gets ``patience_steps`` to show progress. ``best`` is kept across halvings.

    ``state_dict()`` is plain JSON (floats round-trip exactly through ``json``), and a
    restored instance returns the same LRs as the uninterrupted one.
    """

    def __init__(
        self,
        base_lr: float,
        *,
        patience_steps: int,
        window_steps: int,
        min_lr: float = 0.0,
        threshold: float = 1e-3,
    ) -> None:
        if base_lr <= 0.0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        if patience_steps < 1 or window_steps < 1:
            raise ValueError(
                f"patience_steps and window_steps must be >= 1, got {patience_steps}, "
                f"{window_steps}"
            )
        if not 0.0 <= min_lr <= base_lr:
            raise ValueError(f"min_lr must satisfy 0 <= min_lr <= base_lr, got {min_lr}")
        if threshold < 0.0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.base_lr = base_lr
        self.patience_steps = patience_steps
        self.window_steps = window_steps
        self.min_lr = min_lr
        self.threshold = threshold
        self.lr = base_lr
        self.best: float | None = None  # best smoothed loss so far
        self.since_step: int | None = None  # step of the last improvement or halving
        self.first_step: int | None = None  # first step reported
        self.last_step: int | None = None
        self.window: list[tuple[int, float]] = []  # (step, loss) within the last window_steps

    def step(self, step: int, loss: float) -> float:
        """Record ``loss`` at ``step`` and return the LR to use from now on."""
        if not math.isfinite(loss):
            raise ValueError(f"HalveOnPlateau got a non-finite loss {loss} at step {step}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must increase, got {step} after {self.last_step}")
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        self.window.append((step, float(loss)))
        self.window = [e for e in self.window if e[0] > step - self.window_steps]
        if step - self.first_step + 1 < self.window_steps:
            return self.lr  # not a full window yet
        smoothed = sum(e[1] for e in self.window) / len(self.window)
        if self.best is None or smoothed < self.best - self.threshold * abs(self.best):
            self.best, self.since_step = smoothed, step
        elif self.since_step is not None and step - self.since_step >= self.patience_steps:
            self.lr = max(self.lr / 2.0, self.min_lr)
            self.since_step = step
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "best": self.best,
            "since_step": self.since_step,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "window": [list(e) for e in self.window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"HalveOnPlateau state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        self.lr = float(state["lr"])
        self.best = None if state["best"] is None else float(state["best"])
        self.since_step = state["since_step"]
        self.first_step = state["first_step"]
        self.last_step = state["last_step"]
        self.window = [(int(s), float(v)) for s, v in state["window"]]
