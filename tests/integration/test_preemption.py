"""Real processes, real signals: a pretrain process group stopped by SIGTERM exits cleanly (143)
with a checkpoint; killed by SIGKILL at a random moment it resumes from its last checkpoint to
exactly the weights of an uninterrupted run (CPU, bitwise)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.conftest import tiny_tree, write_images
from tests.integration.reliability import (
    assert_same_weights,
    checkpoint_step,
    cli_popen,
    model_at,
    write_config,
)
from wildsight import api, config
from wildsight.cli import main

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images, the config of every run here, and the straight run's final weights."""
    root = tmp_path_factory.mktemp("kill")
    write_images(root / "images", 48)

    def tree(out):
        t = tiny_tree(root / "images", out, steps=STEPS, checkpoint_every_steps=2)
        t["data"]["num_workers"] = 2  # loader worker processes must survive the signal too
        return t

    straight = root / "straight"
    api.pretrain(config.load(tree(straight)))
    return tree, model_at(straight)


def wait_for_checkpoint(run, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_sigterm_to_the_process_group_checkpoints_exits_143_and_resumes(setup, tmp_path, capsys):
    tree, straight = setup
    run = tmp_path / "run"
    cfg = write_config(tree(run), tmp_path / "config.yaml")
    proc = cli_popen("pretrain", "--config", str(cfg), start_new_session=True)
    wait_for_checkpoint(run, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as schedulers do: main process and loader workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM, documented
    stopped = checkpoint_step(run)
    assert 2 <= stopped < STEPS
    assert f"SIGTERM received: stopped at step {stopped}" in err and "Traceback" not in err
    assert main(["pretrain", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert f"done: {STEPS} steps" in capsys.readouterr().out
    assert_same_weights(model_at(run), straight)


def test_sigkill_at_a_random_moment_resumes_to_the_same_weights(setup, tmp_path):
    tree, straight = setup
    run = tmp_path / "run"
    cfg = write_config(tree(run), tmp_path / "config.yaml")
    delay = random.Random(os.urandom(8)).uniform(0.0, 1.0)
    proc = cli_popen("pretrain", "--config", str(cfg), start_new_session=True)
    wait_for_checkpoint(run, proc)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill (delay {delay:.3f} s)"
    killed_at = checkpoint_step(run)  # loads and CRC-checks the last checkpoint
    print(f"killed {delay:.3f} s after the first checkpoint; resuming from step {killed_at}")
    result = api.pretrain(config.load(tree(run)), resume=True)
    assert result.steps == STEPS
    assert_same_weights(model_at(run), straight)
