"""Bad commands and configs: each is one line on stderr that names the problem, exit code 2,
never a traceback. The cases run through `cli.main` (the function `python -m wildsight` calls);
two of them also run as real `python -m wildsight` processes."""

from __future__ import annotations

import pytest

from tests.conftest import write_images
from tests.integration.reliability import cli, cli_env
from wildsight.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cmd") / "images"
    write_images(folder, 16)
    return folder


def ok_args(images, tmp_path) -> list[str]:
    """A valid tiny pretrain command; each case below breaks one thing."""
    return ["pretrain", "--data", str(images), "--image-size", "16", "--backbone", "regnetx_200mf",
            "--batch-size", "8", "--workers", "0", "--steps", "1", "--out", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip


def replace(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


CASES = {
    "missing data path": (lambda a, t: replace(a, "--data", str(t / "nowhere")),
                          "no images found in '"),
    "empty folder": (lambda a, t: (t / "empty").mkdir() or replace(a, "--data", str(t / "empty")),
                     "no file under"),
    "empty list": (lambda a, t: (t / "l.txt").write_text("# nothing\n") and replace(
        a, "--data", str(t / "l.txt")), "the list has no paths"),
    "unknown method": (lambda a, t: [*a, "--method", "swv"], "did you mean 'swav'"),
    "unknown backbone": (lambda a, t: replace(a, "--backbone", "regnetx_200m"),
                         "did you mean 'regnetx_200mf'"),
    "crop larger than the image": (lambda a, t: [*a, "--set",
        "views={groups: [{count: 2, size: 64, scale: [0.5, 1.0]}]}"],
        "64 px crops are more than 2x the 16 px images"),
    "unknown config key (--set)": (lambda a, t: [*a, "--set", "optim.lrr=0.1"],
                                   "optim.lrr: unknown config key; did you mean 'lr'"),
    "unknown config key (yaml)": (lambda a, t: (t / "c.yaml").write_text(
        "train:\n  batchsize: 8\n") and [*a, "--config", str(t / "c.yaml")],
        "train.batchsize: unknown config key; did you mean 'batch_size'"),
    "missing config file": (lambda a, t: [*a, "--config", str(t / "nope.yaml")], "does not exist"),
    "bad value type": (lambda a, t: [*a, "--set", "train.keep_last=many"],
                       "train.keep_last: expected an integer"),
    "init-from nowhere": (lambda a, t: [*a, "--init-from", str(t / "gone")],
                          "--init-from: "),
    "out is not writable": (lambda a, t: replace(a, "--out", "/proc/wildsight-run"),
                            "/proc/wildsight-run"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_command_is_one_line_and_exit_code_2(case, images, tmp_path, capsys):
    make, expected = CASES[case]
    args = make(ok_args(images, tmp_path), tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("wildsight: error:"), err
    assert expected in err, err


def test_batch_smaller_than_the_number_of_processes(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it
    assert main(replace(ok_args(images, tmp_path), "--batch-size", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be split over 4 processes" in err


def test_the_real_entry_point_exits_2_without_traceback(images, tmp_path):
    args = replace(ok_args(images, tmp_path), "--backbone", "resnt50")
    done = cli(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "did you mean 'resnet50'" in done.stderr
    env = cli_env() | {"WORLD_SIZE": "4"}
    done = cli(*replace(ok_args(images, tmp_path), "--batch-size", "2"), env=env)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--batch-size >= 4" in done.stderr


VALUE_CASES = {
    "checkpoint every 0 steps": (["--checkpoint-every", "0"],
                                 "train.checkpoint_every_steps must be >= 1, got 0"),
    "negative checkpoint cadence": (["--checkpoint-every", "-2"],
                                    "train.checkpoint_every_steps must be >= 1, got -2"),
    "log every 0 steps": (["--set", "train.log_every_steps=0"],
                          "train.log_every_steps must be >= 1, got 0"),
    "negative lr (as given, not scaled)": (["--lr", "-1"], "optim.lr must be > 0, got -1.0"),
    "nan lr": (["--lr", "nan"], "optim.lr must be a finite number, got nan"),
    "nan momentum": (["--set", "optim.momentum=.nan"],
                     "optim.momentum must be a finite number, got nan"),
    "unknown device (--set)": (["--set", "train.device=gpu"],
                               "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    "zero crops in a view group": (["--set", "views={groups: [{count: 0, size: 16, scale: [0.3, 1]}]}"],
                                   "views.groups[0].count must be >= 1, got 0"),
    "crop scale reversed": (["--set", "views={groups: [{count: 2, size: 16, scale: [1.5, 0.2]}]}"],
                            "views.groups[0].scale must satisfy 0 < lo <= hi <= 1, got [1.5, 0.2]"),
    "no view groups": (["--set", "views={groups: []}"], "views.groups must list at least one group"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_a_bad_value_is_one_line_naming_the_key_and_writes_nothing(case, images, tmp_path, capsys):
    extra, expected = VALUE_CASES[case]
    assert main([*ok_args(images, tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wildsight: error: {expected}", err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
