"""`--resume` refuses a config that describes another model; `--init-from` starts a new run from
trained weights (strict), with a fresh optimizer, schedule and step count."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_tree, write_images
from tests.integration.reliability import checkpoint_step, metrics, model_at
from wildsight import api, config
from wildsight.cli import main
from wildsight.config import ConfigError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restore") / "images"
    write_images(folder, 48)
    return folder


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A finished 6-step SwAV run: the weights to resume or to start from."""
    run = tmp_path_factory.mktemp("trained") / "run"
    api.pretrain(config.load(tiny_tree(images, run)))
    return run


def frozen_run(images, out, **changes) -> dict:
    """One step at LR 0 (the start of a warm-up): what it saves is what it loaded, BatchNorm
    statistics aside."""
    tree = tiny_tree(images, out, steps=1, **changes.pop("train", {}))
    tree["optim"] = {"name": "sgd", "lr": 0.3, "start_lr": 0.0, "warmup_steps": 1}
    for section, values in changes.items():
        tree[section] = values
    return tree


def test_init_from_copies_the_weights_and_starts_a_fresh_run(images, trained, tmp_path):
    source = model_at(trained)
    run = tmp_path / "run"
    api.pretrain(config.load(frozen_run(images, run, train={"init_from": str(trained)})))
    mine = model_at(run)
    # parameters (not BatchNorm statistics, which the new step updates) are the trained ones
    params = {k for k in source if "running_" not in k and "num_batches" not in k}
    params -= {"prototypes.weight", "queue", "queue_size"}  # re-normalised / refilled per step
    assert params and all(torch.equal(mine[k], source[k]) for k in params)
    # ... and a fresh random init of the same config differs: the copy is real
    fresh = tmp_path / "fresh"
    api.pretrain(config.load(frozen_run(images, fresh)))
    assert not torch.equal(model_at(fresh)["projector.0.weight"], source["projector.0.weight"])
    # fresh step count and schedule: step 1 of its own at the warm-up's first LR, not step 7
    assert checkpoint_step(run) == 1 and [(r["step"], r["lr"]) for r in metrics(run)] == [(1, 0)]
    assert config.read_yaml(run)["train"]["init_from"] == str(trained)  # reproducible


def test_init_from_the_latest_pointer_file_takes_the_latest_checkpoint(images, trained, tmp_path):
    """`checkpoints/latest` names the newest ckpt-*: --init-from accepts it as that checkpoint."""
    via_pointer, via_run = tmp_path / "pointer", tmp_path / "run"
    latest = trained / "checkpoints" / "latest"
    for run, source in ((via_pointer, latest), (via_run, trained)):
        api.pretrain(config.load(frozen_run(images, run, train={"init_from": str(source)})))
    a, b = model_at(via_pointer), model_at(via_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_another_method_takes_the_backbone_only(images, trained, tmp_path):
    run = tmp_path / "simclr"
    method = {"name": "simclr", "head_layers": 2, "hidden_dim": 32, "out_dim": 16}
    views = {"groups": [{"count": 2, "size": 16, "scale": [0.3, 1.0]}]}
    tree = frozen_run(images, run, method=method, views=views, train={"init_from": str(trained)})
    api.pretrain(config.load(tree))
    source, mine = model_at(trained), model_at(run)
    backbone = {k for k in source if k.startswith("backbone.") and k.endswith((".weight", ".bias"))}
    assert backbone and all(torch.equal(mine[k], source[k]) for k in backbone)
    assert not any(k.startswith("prototypes") for k in mine)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"backbone": {"name": "regnetx_400mf", "small_input": True}}, "backbone.name"),
        ({"method": {"name": "swav", "hidden_dims": [32], "out_dim": 24, "num_prototypes": 10,
                     "freeze_prototypes_steps": 2, "queue_length": 16}}, "projector.3.weight"),
    ],
)  # fmt: skip
def test_init_from_a_different_architecture_is_a_clear_error(
    images, trained, tmp_path, changes, named, capsys
):
    tree = tiny_tree(images, tmp_path / "run", steps=1, init_from=str(trained)) | changes
    path = tmp_path / "config.yaml"
    path.write_text(config.dump(config.load(tree)))
    assert main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot init from" in err and named in err


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("backbone", {"name": "regnetx_400mf"}, "backbone.name: 'regnetx_200mf' -> 'regnetx_400mf'"),
        ("method", {"num_prototypes": 12}, "method.num_prototypes: 10 -> 12"),
        ("method", {"name": "simclr", "out_dim": 16}, "method.name: 'swav' -> 'simclr'"),
    ],
)  # fmt: skip
def test_resume_with_another_model_is_refused_naming_the_keys(
    images, trained, tmp_path, section, values, named, capsys
):
    before = config.read_yaml(trained)
    args = ["pretrain", "--out", str(trained), "--resume", "--no-progress"]
    args += [x for k, v in values.items() for x in ("--set", f"{section}.{k}={v}")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot resume" in err and named in err, err
    assert config.read_yaml(trained) == before  # the refused run did not touch the run directory


def test_resume_with_a_new_budget_lr_and_logging_continues(images, trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    tree = tiny_tree(images, run, steps=8, log_every_steps=2)
    tree["optim"]["lr"] = 0.1
    result = api.pretrain(config.load(tree), resume=True)
    assert result.steps == 8 and checkpoint_step(run) == 8


def test_resume_without_a_checkpoint_starts_a_new_run(images, tmp_path, capsys):
    tree = tiny_tree(images, tmp_path / "run", steps=1)
    result = api.pretrain(config.load(tree), resume=True)
    assert result.steps == 1
    assert "holds no checkpoint; new run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="backbone.name"):
        changed = tiny_tree(images, tmp_path / "run", steps=2)
        changed["backbone"] = {"name": "regnetx_400mf", "small_input": True}
        api.pretrain(config.load(changed), resume=True)
