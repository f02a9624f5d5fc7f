"""A pretrain process killed by SIGKILL inside a checkpoint write (half the tensor file on disk,
or the new checkpoint complete but `latest` not yet switched) leaves the previous checkpoint
intact, and resuming from it ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import signal

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
from wildsight.train import checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images, the config of every run here (checkpoints at steps 2, 4, 6) and the straight
    run's final weights."""
    root = tmp_path_factory.mktemp("kill")
    write_images(root / "images", 48)

    def tree(out):
        return tiny_tree(root / "images", out, checkpoint_every_steps=2)

    api.pretrain(config.load(tree(root / "straight")))
    return tree, model_at(root / "straight")


# The second save (step 4) dies by SIGKILL at a point of the write; `code` runs in the child.
DIE_IN = {
    "tensors": """
from wildsight.train import checkpoint
import os, signal
calls, original = [], checkpoint._write_tensors
def dying(path, tensors):
    calls.append(path)
    if len(calls) == 2:
        original(path, tensors)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)  # half the file is on disk
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, tensors)
checkpoint._write_tensors = dying
""",
    "latest": """
from wildsight.train import checkpoint
import os, signal
calls, original = [], checkpoint._write_latest
def dying(directory, name):
    calls.append(name)
    if len(calls) == 2:  # the new ckpt directory is complete and renamed; latest not yet
        os.kill(os.getpid(), signal.SIGKILL)
    original(directory, name)
checkpoint._write_latest = dying
""",
}


@pytest.mark.parametrize("where", sorted(DIE_IN))
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(setup, tmp_path, where):
    tree, straight = setup
    run = tmp_path / "run"
    cfg = write_config(tree(run), tmp_path / "config.yaml")
    proc = cli_popen("pretrain", "--config", str(cfg), code=DIE_IN[where])
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "ckpt-000000002"
    assert checkpoint_step(run) == 2  # complete, CRC-checked
    result = api.pretrain(config.load(tree(run)), resume=True)
    assert result.steps == 6
    assert_same_weights(model_at(run), straight)
