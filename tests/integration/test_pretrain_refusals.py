"""`pretrain` refuses, before it writes anything, what would lose or mix up a run already on disk:
a new run into a folder that holds one, a `--resume` with nothing to resume, a run config.yaml
emptied by accident, a cadence of 0. `demo` continues its own run instead of starting over."""

from __future__ import annotations

import math
import shutil

import pytest
import yaml

from tests.conftest import one_line_error, snapshot, tiny_tree, write_images
from tests.integration.reliability import checkpoint_step
from wildsight import api, config, demo
from wildsight.cli import main
from wildsight.config import ConfigError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals") / "images"
    write_images(folder, 32)
    return folder


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished 3-step run with a checkpoint at step 3."""
    run = tmp_path_factory.mktemp("finished") / "run"
    api.pretrain(config.load(tiny_tree(images, run, steps=3)))
    return run


def test_a_new_run_into_a_folder_that_holds_one_is_refused_and_changes_nothing(
    images, finished, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    expected = (
        f"{str(run)!r} holds a run at step 3; continue it with --resume, "
        "or choose another --out / delete the folder"
    )
    with pytest.raises(ConfigError) as err:  # the Python API
        api.pretrain(config.load(tiny_tree(images, run, steps=3, seed=7)))
    assert str(err.value) == expected
    cfg = tmp_path / "new.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(images, run, steps=3, seed=7)))
    assert main(["pretrain", "--config", str(cfg)]) == 2  # the command line
    assert one_line_error(capsys) == f"wildsight: error: {expected}"
    assert snapshot(run) == before  # weights, metrics, config: byte for byte
    # the way it names still works: --resume continues the run where it stopped
    result = api.pretrain(config.load(tiny_tree(images, run, steps=5)), resume=True)
    assert result.steps == 5 and checkpoint_step(run) == 5


def test_resume_of_a_folder_without_a_run_says_so(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["pretrain", "--out", str(missing), "--resume"]) == 2
    assert one_line_error(capsys) == (
        f"wildsight: error: no run in {str(missing)!r} to resume (no checkpoints/); "
        "drop --resume to start a new run"
    )
    assert not missing.exists()
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["pretrain", "--out", str(empty), "--resume"]) == 2
    assert "(checkpoints/ holds no checkpoint); drop --resume" in one_line_error(capsys)
    assert sorted(p.name for p in empty.rglob("*")) == ["checkpoints"]


def test_resume_without_a_checkpoint_but_with_a_budget_starts_a_new_run(images, tmp_path):
    run = tmp_path / "run"  # README: --resume on a folder without a run starts one (with a note)
    result = api.pretrain(config.load(tiny_tree(images, run, steps=2)), resume=True)
    assert result.steps == 2 and checkpoint_step(run) == 2


def test_resume_with_an_empty_run_config_names_the_file(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.yaml").write_text("")
    before = snapshot(run)
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    assert one_line_error(capsys) == (
        f"wildsight: error: config file {str(run / 'config.yaml')!r} is empty; it must hold a "
        "mapping of config keys"
    )  # not "checkpoint holds another model (regnetx_200mf -> resnet50)"
    assert snapshot(run) == before


def test_resume_with_a_bad_key_in_the_run_config_names_the_file_and_the_key(
    finished, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["train"]["chekpoint_every_steps"] = 5  # a hand edit with a typo
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    before = snapshot(run)
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"wildsight: error: {run / 'config.yaml'}: ")
    assert "train.chekpoint_every_steps" in err and "checkpoint_every_steps" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_zero_checkpoint_cadence_is_refused_before_the_run_config_changes(
    finished, tmp_path, capsys, value
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    assert main(["pretrain", "--out", str(run), "--resume", "--checkpoint-every", value]) == 2
    assert one_line_error(capsys) == (
        f"wildsight: error: train.checkpoint_every_steps must be >= 1, got {value}"
    )
    assert snapshot(run) == before  # config.yaml still says 3: a plain --resume still works
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert checkpoint_step(run) == 4


@pytest.mark.parametrize("budget", [0.0, -5.0, float("nan"), float("inf")])
def test_demo_refuses_a_budget_that_is_not_a_positive_number_of_seconds(tmp_path, budget):
    with pytest.raises(ValueError) as err:
        demo.run_demo(tmp_path / "demo", time_budget_s=budget)
    assert str(err.value) == (
        f"demo time budget must be a number of seconds > 0, got {budget}; "
        f"leave --time-budget out for the default {demo.DEMO_TIME_BUDGET_S:g} s"
    )
    assert not (tmp_path / "demo").exists()


def test_the_demo_run_twice_continues_its_own_run_and_re_evaluates(
    images, tmp_path, monkeypatch, capsys
):
    """A second `make demo`: the finished run trains no more steps, its weights and metrics stay
    as they were, and the evaluation table is printed again."""
    tiny = tiny_tree(images, tmp_path / "unused")
    overrides = {k: tiny[k] for k in ("data", "backbone", "method", "views")}
    overrides["data"] = {"image_size": 16, "num_workers": 0}
    overrides["train"] = {"batch_size": 8, "progress": False, "checkpoint_every_steps": 2}
    probed = []

    def probe_row(name, encoder, train, test):  # the probes themselves are tested elsewhere
        probed.append(name)
        return {"features": name, "layer": "x", "dim": 1, "linear_top1": 0.5,
                "linear_pooled_top1": 0.5, "knn_top1": 0.5}  # fmt: skip

    monkeypatch.setattr(demo, "probe_row", probe_row)
    out = tmp_path / "demo"
    kw = {"time_budget_s": 1.0, "train": str(images), "test": str(images), "overrides": overrides}
    first = demo.run_demo(out, **kw)
    steps = first["pretrain"]["steps"]
    assert steps >= 1 and checkpoint_step(out) == steps
    trained = {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints/")}
    metrics_before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()

    second = demo.run_demo(out, **kw)
    captured = capsys.readouterr()
    printed = captured.out
    assert f"continuing the run in {str(out)!r} from step {steps}" in captured.err
    # the last loss is the run's own, not NaN: it is kept in the checkpoint
    assert second["pretrain"]["last_loss"] == first["pretrain"]["last_loss"]
    assert math.isfinite(first["pretrain"]["last_loss"])
    assert f"Fashion-MNIST test accuracy ({steps} swav steps on {images})" in printed
    assert (
        second["pretrain"]["steps"] == steps and probed == ["swav", "random init", "raw pixels"] * 2
    )
    assert {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints/")} == trained
    assert (out / "metrics.jsonl").read_bytes() == metrics_before


def test_demo_into_a_run_of_another_method_is_one_error_and_nothing_else(images, tmp_path, capsys):
    """`demo --out RUN` of a run it cannot continue says only why, not 'continuing' first."""
    run = tmp_path / "run"
    tree = tiny_tree(images, run, steps=2)
    tree["method"] = {"name": "rotation"}
    tree["views"] = None
    api.pretrain(config.load(tree))
    before = snapshot(run)
    capsys.readouterr()
    assert main(["demo", "--out", str(run), "--time-budget", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing said before the refusal (it was "continuing it")
    err = captured.err.strip()
    assert err.startswith("wildsight: error: ") and "\n" not in err, err
    assert "rotation" in err and str(run) in err
    assert snapshot(run) == before
