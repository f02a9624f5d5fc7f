"""Faults inside one training process: signals, non-finite steps, collapse, a full disk.

Every expectation comes from a straight run of the same config (same seed: same weights, same
LR at each step) or from an invariant (a skipped step changes nothing), never from the code
under test.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_tree, write_images
from tests.integration.reliability import assert_same_weights, checkpoint_step, metrics, model_at
from wildsight import api, config
from wildsight.cli import main
from wildsight.methods.swav import SwAV
from wildsight.train import checkpoint, trainer
from wildsight.train.guards import TrainingError

POISONED = "projector.0.weight"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "images"
    write_images(folder, 48)
    return folder


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """The uninterrupted reference: 6 steps, checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = api.pretrain(config.load(tiny_tree(images, run)))
    assert result.steps == 6 and result.stopped_by == "steps"
    return run


def patch_forward(monkeypatch, bad_steps, how):
    """Make SwAV's step `s` in `bad_steps` fault: "loss" -> NaN loss; "grad" -> finite loss
    but a NaN gradient for the POISONED parameter only (a hook on a copy of it)."""
    original = SwAV.forward

    def forward(self, views, step):
        out = original(self, views, step)
        if step in bad_steps:
            if how == "loss":
                out.loss = out.loss * float("nan")
            else:
                copy = dict(self.named_parameters())[POISONED] * 1.0
                copy.register_hook(lambda g: torch.full_like(g, float("nan")))
                out.loss = out.loss + 0.0 * copy.sum()  # the value is unchanged and finite
        return out

    monkeypatch.setattr(SwAV, "forward", forward)


# ------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_exits_128_plus_signal_and_resume_matches(
    sig, code, images, straight, tmp_path, monkeypatch, capsys
):
    original = SwAV.after_step

    def signal_at_step_1(self, step, output):
        original(self, step, output)
        if step == 1:
            os.kill(os.getpid(), sig)  # as a scheduler or Ctrl-C would, mid-run

    monkeypatch.setattr(SwAV, "after_step", signal_at_step_1)
    handler_before = signal.getsignal(sig)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _yaml(tiny_tree(images, run), tmp_path)]) == code
    assert f"{signal.Signals(sig).name} received: stopped at step 2" in capsys.readouterr().err
    assert checkpoint_step(run) == 2  # the step finished, then the checkpoint was saved
    assert signal.getsignal(sig) == handler_before  # the caller's handler is back
    monkeypatch.setattr(SwAV, "after_step", original)
    resumed = api.pretrain(config.load(tiny_tree(images, run)), resume=True)
    assert resumed.steps == 6 and resumed.stopped_by == "steps"
    assert_same_weights(model_at(run), model_at(straight))


# ------------------------------------------------------------------------ numerical faults


def test_nonfinite_gradients_in_a_row_stop_with_dump_and_intact_checkpoint(
    images, straight, tmp_path, monkeypatch
):
    patch_forward(monkeypatch, bad_steps={3, 4, 5}, how="grad")
    run = tmp_path / "run"
    tree = tiny_tree(images, run, max_nonfinite_steps_in_a_row=3)
    with pytest.raises(TrainingError) as err:
        api.pretrain(config.load(tree))
    message = str(err.value)
    assert "\n" not in message and POISONED in message and "3 steps in a row" in message
    assert str(run / "nonfinite.json") in message and "ckpt-000000003" in message

    dump = json.loads((run / "nonfinite.json").read_text())
    assert [s["step"] for s in dump["steps"]] == [3, 4, 5]
    lr_of = {row["step"] - 1: row["lr"] for row in metrics(straight)}  # row "step" = steps done
    for s in dump["steps"]:
        assert s["nonfinite_grads"] == [POISONED] and s["num_nonfinite_grads"] == 1
        assert math.isfinite(s["loss"]) and s["lr"] == pytest.approx(lr_of[s["step"]])
        assert len(s["batch"]) == 8 and all(k.startswith(str(images)) for k in s["batch"])
    # the last good checkpoint is the one before the streak, equal to the straight run's
    assert checkpoint_step(run) == 3
    straight_step3 = model_at(straight / "checkpoints" / "ckpt-000000003")
    assert_same_weights(model_at(run), straight_step3)


def test_a_nonfinite_step_is_skipped_counted_and_changes_nothing(images, tmp_path, monkeypatch):
    calls, seen = [], {}
    original_views, original_before = trainer.make_views, SwAV.before_step

    def nan_views_at_step_2(*args, **kwargs):
        views = original_views(*args, **kwargs)
        calls.append(1)
        return [v * float("nan") for v in views] if len(calls) == 3 else views

    def record_state(self, step):
        seen[step] = {k: v.clone() for k, v in self.state_dict().items()}
        original_before(self, step)

    monkeypatch.setattr(trainer, "make_views", nan_views_at_step_2)
    monkeypatch.setattr(SwAV, "before_step", record_state)
    run = tmp_path / "run"
    result = api.pretrain(config.load(tiny_tree(images, run, checkpoint_every_steps=2)))
    assert result.steps == 6  # one bad step is not fatal
    assert metrics(run)[-1]["skipped_steps"] == 1
    before, after = seen[2], seen[3]  # the model entering the bad step 2, and leaving it
    for key in before:
        if key == "prototypes.weight":  # re-normalised by before_step: equal up to rounding
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
        else:  # no update, and BatchNorm statistics were restored after the NaN forward pass
            assert torch.equal(after[key], before[key]), key
            assert torch.isfinite(after[key].float()).all(), key
    assert not torch.equal(seen[4]["projector.0.weight"], after["projector.0.weight"])


def test_nonfinite_loss_streak_names_the_loss(images, tmp_path, monkeypatch, capsys):
    patch_forward(monkeypatch, bad_steps=set(range(6)), how="loss")
    tree = tiny_tree(images, tmp_path / "run", max_nonfinite_steps_in_a_row=2)
    assert main(["pretrain", "--config", _yaml(tree, tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite loss (nan)" in err[-1] and "no checkpoint yet" in err[-1]
    assert sum("step skipped" in line for line in err) == 1  # step 0 logged, step 1 stops


def _yaml(tree: dict, folder) -> str:
    path = folder / "config.yaml"
    path.write_text(config.dump(config.load(tree)))
    return str(path)


# ------------------------------------------------------------------------------ collapse


def test_forced_collapse_warns_once_and_a_healthy_run_does_not(images, tmp_path, capsys):
    # toy collapse: identical grey images and no augmentation -> every view of every image is
    # the same tensor -> one feature vector for all, one prototype for all
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(16):
        Image.new("RGB", (20, 20), (128, 128, 128)).save(grey / f"{i}.png")
    off = {"flip_p": 0.0, "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    tree = tiny_tree(grey, tmp_path / "collapsed", steps=8)
    tree["views"] = {"groups": [{"count": 2, "size": 16, "scale": [1.0, 1.0], "augment": off}]}
    api.pretrain(config.load(tree))
    err = capsys.readouterr().err
    assert err.count("collapse") == 1, err
    assert "code_entropy_norm" in err and "feature_std" in err
    assert "method.freeze_prototypes_steps" in err and "method.queue_length" in err
    rows = metrics(tmp_path / "collapsed")
    assert rows[-1]["code_entropy_norm"] == 0.0 and rows[-1]["feature_std"] < 1e-3

    api.pretrain(config.load(tiny_tree(images, tmp_path / "healthy", steps=8)))
    assert "collapse" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ disk full


def test_disk_full_while_checkpointing_stops_clearly_and_keeps_the_previous_one(
    images, straight, tmp_path, monkeypatch, capsys
):
    calls = []
    original = checkpoint._write_tensors

    def full_disk_on_second_save(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # a partial file, as a filling disk leaves it
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, tensors)

    monkeypatch.setattr(checkpoint, "_write_tensors", full_disk_on_second_save)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _yaml(tiny_tree(images, run), tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wildsight: error: run stopped at step 6")
    assert "No space left on device" in err and "ckpt-000000003 is intact" in err
    assert "--resume" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000003", "latest"]
    assert_same_weights(model_at(run), model_at(straight / "checkpoints" / "ckpt-000000003"))
