"""SEER's online mode: `--online` trains on the endless stream until a signal, with a fixed LR
(halved on plateaus) and checkpoints by wall time; the run resumes where the stream stopped."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import tiny_tree, write_images
from tests.integration.reliability import checkpoint_step, cli_popen, write_config
from wildsight import config
from wildsight.cli import main
from wildsight.train import checkpoint
from wildsight.train.resolve import resolve_config


def test_online_run_checkpoints_by_time_stops_on_sigterm_and_resumes(tmp_path, capsys):
    write_images(tmp_path / "images", 24)
    run = tmp_path / "run"
    tree = tiny_tree(tmp_path / "images", run, steps=None, checkpoint_every_steps=10_000,
                     checkpoint_every_s=0.5)  # fmt: skip
    cfg = write_config(tree, tmp_path / "config.yaml")
    proc = cli_popen("pretrain", "--config", str(cfg), "--online", start_new_session=True)
    deadline = time.monotonic() + 180
    # the step budget never triggers a checkpoint (10,000 steps): one here comes from wall time
    while not (run / "checkpoints" / "latest").exists() or checkpoint_step(run) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no time-based checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = checkpoint_step(run)
    _, state = checkpoint.load_checkpoint(run / "checkpoints")
    assert state["config"]["train"]["online"] is True
    assert state["config"]["optim"]["schedule"] == "plateau"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len({row["lr"] for row in rows}) == 1  # SEER online: a fixed LR until a plateau
    images_before = state["loader"]
    # resume with a step budget (allowed) and check the stream goes on, not from the start
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", str(stopped + 2),
                 "--no-progress"]) == 0  # fmt: skip
    assert f"done: {stopped + 2} steps" in capsys.readouterr().out
    _, after = checkpoint.load_checkpoint(run / "checkpoints")
    assert after["train"]["images_seen"] == state["train"]["images_seen"] + 2 * 8
    assert after["loader"] != images_before  # the data position moved on from where it stopped


def test_online_refuses_a_cosine_schedule_and_a_run_without_budget_needs_online(tmp_path):
    tree = tiny_tree(tmp_path, tmp_path / "run", steps=None)
    with pytest.raises(config.ConfigError, match="no training budget"):
        resolve_config(config.load(tree))
    tree["train"]["online"] = True
    with pytest.raises(config.ConfigError, match="cosine schedule"):
        resolve_config(config.load(tree))
    tree["optim"]["schedule"] = "plateau"
    assert resolve_config(config.load(tree)).train.online
    tree["train"]["checkpoint_every_s"] = 0
    with pytest.raises(config.ConfigError, match="checkpoint_every_s must be > 0"):
        config.load(tree)
