"""The training loop's guards, one by one: non-finite gradients, the skip counter and its dump,
the collapse warning, stop signals and the BatchNorm statistics kept across a skipped step."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from wildsight.train import guards
from wildsight.train.guards import CollapseMonitor, NonFiniteGuard, StopSignals, TrainingError


def test_nonfinite_gradients_names_exactly_the_bad_parameters():
    model = nn.ModuleDict({n: nn.Linear(3, 2) for n in ("a", "b", "c", "d", "e")})
    grads = {
        "a.weight": float("nan"), "b.bias": float("inf"), "c.weight": -float("inf"),
        "d.weight": 1e30,  # finite but its 2-norm overflows float32: still finite here
    }  # fmt: skip
    for name, p in model.named_parameters():
        p.grad = torch.ones_like(p)
        if name in grads:
            p.grad.view(-1)[-1] = grads[name]
    model["e"].weight.grad = None  # frozen this step
    brute = [
        n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert guards.nonfinite_gradients(model.named_parameters()) == brute
    assert brute == ["a.weight", "b.bias", "c.weight"]
    assert guards.nonfinite_gradients(nn.Linear(2, 2).named_parameters()) == []  # no grads at all


def test_nonfinite_guard_counts_resets_and_stops_with_a_dump(tmp_path):
    dump = tmp_path / "nonfinite.json"
    guard = NonFiniteGuard(3, dump)
    kwargs = {"lr": 0.1, "batch_keys": ["x.jpg", "y.jpg"], "last_checkpoint": tmp_path / "ckpt-5"}
    assert "step 1: non-finite loss (nan)" in guard.skip(1, loss=math.nan, bad_params=[], **kwargs)
    guard.ok()  # a good step ends the streak
    guard.skip(7, loss=2.0, bad_params=["w"], **kwargs)
    guard.skip(8, loss=2.0, bad_params=["w", "v"], **kwargs)
    assert guard.state_dict() == {"in_a_row": 2, "total": 3} and not dump.exists()
    with pytest.raises(TrainingError) as err:
        guard.skip(9, loss=math.inf, bad_params=[], **kwargs)
    assert "3 steps in a row" in str(err.value) and "ckpt-5" in str(err.value)
    record = json.loads(dump.read_text())
    assert [s["step"] for s in record["steps"]] == [7, 8, 9]  # the streak, not step 1
    assert (
        record["steps"][1]["nonfinite_grads"] == ["w", "v"] and record["steps"][2]["loss"] == "inf"
    )
    assert record["skipped_steps_total"] == 4 and record["last_good_checkpoint"].endswith("ckpt-5")
    restored = NonFiniteGuard(3, dump)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_collapse_warns_once_after_patience_checks_in_a_row():
    monitor = CollapseMonitor(patience=3)
    healthy = {"code_entropy_norm": 0.8, "feature_std": 0.09}
    collapsed = {"code_entropy_norm": 0.05, "feature_std": 0.09}
    seq = [collapsed, collapsed, healthy, collapsed, {"loss": 1.0}, collapsed]
    assert [monitor.check(i, m) for i, m in enumerate(seq)] == [None] * 6  # never 3 in a row
    # a check without the key (a method that does not report it) neither counts nor resets
    assert monitor.check(6, {"code_entropy_norm": math.nan}) is None
    warning = monitor.check(7, collapsed)
    assert warning and "step 7" in warning and "code_entropy_norm = 0.05" in warning
    assert "method.freeze_prototypes_steps" in warning and "variance" not in warning
    assert all(monitor.check(8 + i, collapsed) is None for i in range(5))  # once per run


def test_feature_variance_collapse_names_its_remedies():
    monitor = CollapseMonitor(patience=1)
    warning = monitor.check(0, {"feature_std": 0.0})
    assert warning and "variance went to zero" in warning and "BYOL" in warning


def test_stop_signals_set_a_flag_then_restore_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"  # the process is alive: the loop decides
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_second_signal_restores_the_default_action_and_re_raises(monkeypatch):
    calls = []
    monkeypatch.setattr(guards.os, "kill", lambda pid, sig: calls.append(("kill", pid, sig)))
    monkeypatch.setattr(guards.signal, "signal", lambda sig, h: calls.append(("signal", sig, h)))
    signals = StopSignals()
    signals._handle(signal.SIGINT, None)
    assert signals.received == "SIGINT" and calls == []
    signals._handle(signal.SIGINT, None)
    assert calls == [
        ("signal", signal.SIGINT, signal.SIG_DFL),
        ("kill", os.getpid(), signal.SIGINT),
    ]


def test_norm_buffers_undo_a_nan_forward_pass():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    model(torch.randn(8, 4))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = guards.NormBuffers(model)
    buffers.save()
    model(torch.full((8, 4), math.nan))
    assert torch.isnan(model[1].running_mean).all()  # what a skipped NaN step would leave
    buffers.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
