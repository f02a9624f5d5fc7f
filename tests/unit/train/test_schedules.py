"""Schedules: endpoints and midpoints of the pure ones; halving and resume of HalveOnPlateau."""

from __future__ import annotations

import json
import math

import pytest

from wildsight.train.schedules import HalveOnPlateau, cosine_ramp, warmup_cosine

SEER = {"start": 0.15, "base": 9.6, "warmup_steps": 8000, "final": 0.0096, "total_steps": 108_000}


def test_warmup_cosine_seer_landmarks() -> None:
    lr = lambda step: warmup_cosine(step, **SEER)  # noqa: E731
    assert lr(0) == pytest.approx(0.15)
    assert lr(4000) == pytest.approx((0.15 + 9.6) / 2)  # linear warm-up
    assert lr(8000) == pytest.approx(9.6)
    assert lr(8000 + 50_000) == pytest.approx((9.6 + 0.0096) / 2)  # middle of the cosine
    assert lr(108_000) == pytest.approx(0.0096)
    assert lr(10**7) == pytest.approx(0.0096)
    values = [lr(s) for s in range(8000, 108_001, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def test_warmup_cosine_defaults_and_edges() -> None:
    assert warmup_cosine(0, base=1.0, warmup_steps=10, total_steps=110) == 0.0
    assert warmup_cosine(10, base=1.0, warmup_steps=10, total_steps=110) == 1.0
    assert warmup_cosine(60, base=1.0, warmup_steps=10, total_steps=110) == pytest.approx(0.5)
    assert warmup_cosine(110, base=1.0, warmup_steps=10, total_steps=110) == 0.0
    # no warm-up: a plain cosine that starts at base
    assert warmup_cosine(0, base=2.0, warmup_steps=0, total_steps=100) == 2.0
    # warm-up as long as training: ends at base, then final
    assert warmup_cosine(99, base=1.0, warmup_steps=100, total_steps=100) == pytest.approx(0.99)
    assert warmup_cosine(100, base=1.0, warmup_steps=100, total_steps=100, final=0.1) == 0.1
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, base=1.0, warmup_steps=200, total_steps=100)
    with pytest.raises(ValueError, match="step"):
        warmup_cosine(-1, base=1.0, warmup_steps=0, total_steps=100)


def test_cosine_ramp_byol_tau() -> None:
    tau = lambda step: cosine_ramp(step, total_steps=1000, start=0.996, end=1.0)  # noqa: E731
    assert tau(0) == pytest.approx(0.996)
    assert tau(500) == pytest.approx(0.998)
    assert tau(1000) == pytest.approx(1.0)
    assert tau(5000) == 1.0
    assert tau(250) == pytest.approx(1.0 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def _plateau() -> HalveOnPlateau:
    return HalveOnPlateau(1.0, patience_steps=10, window_steps=5, min_lr=0.125, threshold=1e-3)


def test_halve_on_plateau_halves_only_when_the_loss_stops_improving() -> None:
    sched = _plateau()
    lrs = [sched.step(s, 10.0 - 0.1 * s) for s in range(50)]  # steadily improving
    assert set(lrs) == {1.0}
    flat = [sched.step(s, 5.0) for s in range(50, 70)]  # stops going down
    # the mean of the last 5 losses last improves (by > 0.1%) at step 54; patience 10 -> 64
    assert flat[:14] == [1.0] * 14 and set(flat[14:]) == {0.5}
    more = [sched.step(s, 5.0) for s in range(70, 120)]
    assert more[3:5] == [0.5, 0.25] and more[13:15] == [0.25, 0.125]  # every patience_steps...
    assert min(more) == 0.125  # ...down to min_lr
    improving = _plateau()
    # tiny improvements below the relative threshold count as a plateau
    lrs = [improving.step(s, 1.0 - 1e-6 * s) for s in range(30)]
    assert lrs[-1] < 1.0


def test_halve_on_plateau_resumes_exactly_through_json() -> None:
    losses = [
        5.0 + math.sin(0.7 * s) + (8.0 if s < 40 else 0.0) - 0.05 * min(s, 60) for s in range(200)
    ]
    whole = _plateau()
    expected = [whole.step(s, v) for s, v in enumerate(losses)]
    assert len(set(expected)) > 1  # the sequence does trigger halvings
    first = _plateau()
    got = [first.step(s, v) for s, v in enumerate(losses[:77])]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _plateau()
    resumed.load_state_dict(state)
    got += [resumed.step(s, v) for s, v in enumerate(losses[77:], start=77)]
    assert got == expected


def test_halve_on_plateau_rejects_bad_input() -> None:
    sched = _plateau()
    sched.step(3, 1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        sched.step(3, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        sched.step(4, float("nan"))
    with pytest.raises(ValueError, match="keys"):
        sched.load_state_dict({"lr": 1.0})
