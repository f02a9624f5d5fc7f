"""`wildsight distill --teacher A B --alpha < 1`: the labels mixed in are the subset the teachers
were fine-tuned on, so teachers fine-tuned on other labels are refused before any training; with
alpha 1 no label is used and they teach together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import one_line_error, pretrained_tiny_run, write_images
from wildsight import api_finetune
from wildsight.cli import main

TINY = ["--steps", "2", "--batch-size", "8", "--precision", "fp32"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Teachers of one tiny run (16 images of 2 classes, in "folder"), by the labels they were
    fine-tuned on: "half1"/"half2" on half of them with seed 1/2, "all0"/"all1" on all of them
    with seed 0/1; "half1 copy" holds the same labels as "half1", "unrecorded" none (an older
    folder)."""
    run = pretrained_tiny_run(tmp_path_factory, "subsets")
    folder = run.parent / "train"
    out = {"folder": folder}
    for name, labels in {"half1": ["--fraction", "0.5", "--seed", "1"],
                         "half2": ["--fraction", "0.5", "--seed", "2"],
                         "all0": ["--seed", "0"], "all1": ["--seed", "1"]}.items():  # fmt: skip
        out[name] = run.parent / name
        assert main(["eval", "finetune", "--checkpoint", str(run), "--train", str(folder),
                     "--test", str(folder), *labels, "--save", str(out[name]), *TINY]) == 0  # fmt: skip
    out["half1 copy"] = run.parent / "half1-copy"
    shutil.copytree(out["half1"], out["half1 copy"])
    out["unrecorded"] = _relabelled(out["half1"], run.parent / "unrecorded", None)
    return out


def _relabelled(teacher: Path, to: Path, labels: dict | None) -> Path:
    """A copy of `teacher` whose classifier.json records `labels` (None: no "labels" entry)."""
    shutil.copytree(teacher, to)
    meta = json.loads((to / "classifier.json").read_text())
    meta.pop("labels")
    if labels is not None:
        meta["labels"] = labels
    (to / "classifier.json").write_text(json.dumps(meta))
    return to


def _distill(teachers: dict[str, Path], names: list[str], *flags: str) -> list[str]:
    folder = str(teachers["folder"])
    return ["distill", "--teacher", *(str(teachers[n]) for n in names), "--unlabelled", folder,
            "--test", folder, *flags, *TINY]  # fmt: skip


@pytest.mark.parametrize(
    ("other", "shown"),
    [
        ("half2", "fraction 0.5 of {folder!r}, seed 2"),  # other seed
        ("all0", "all labels of {folder!r}"),  # other fraction
        (
            {"source": "elsewhere", "fraction": 0.5, "seed": 1, "num_labels": 8},
            "fraction 0.5 of 'elsewhere', seed 1",
        ),  # other source  # fmt: skip
        ("unrecorded", "labels not recorded"),  # labels unknown: not the same as half1's
    ],
    ids=["seed", "fraction", "source", "unrecorded"],
)
def test_alpha_below_1_refuses_teachers_on_other_labels_before_training(
    teachers: dict[str, Path], other: str | dict, shown: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if isinstance(other, dict):
        teachers = {**teachers, "other": _relabelled(teachers["half1"], tmp_path / "t", other)}
        other = "other"

    def untouched(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused distillation loaded images or trained")

    monkeypatch.setattr(api_finetune, "load_images", untouched)
    monkeypatch.setattr(api_finetune, "distill_classifier", untouched)
    report, student = tmp_path / "d.json", tmp_path / "student"
    argv = _distill(teachers, ["half1", other], "--alpha", "0.5", "--json", str(report),
                    "--save", str(student))  # fmt: skip
    assert main(argv) == 2
    err = one_line_error(capsys)
    folder = str(teachers["folder"])
    assert f"{teachers['half1']}: fraction 0.5 of {folder!r}, seed 1" in err, err
    assert f"{teachers[other]}: {shown.format(folder=folder)}" in err, err
    assert "fine-tuned on different labels" in err and "same labels, or --alpha 1" in err
    assert not report.exists() and not student.exists()


def test_alpha_1_distils_teachers_on_other_labels(
    teachers: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "d.json"
    assert main(_distill(teachers, ["half1", "half2", "unrecorded"], "--json", str(report))) == 0
    doc = json.loads(report.read_text())
    assert doc["params"]["alpha"] == 1 and doc["num_labelled"] == 0 and doc["train"] is None
    assert doc["teacher"] == [str(teachers[n]) for n in ("half1", "half2", "unrecorded")]


@pytest.mark.parametrize(
    ("names", "num_labelled"),
    [
        (["half1", "half1 copy"], 8),  # the subset both were fine-tuned on
        (["all0", "all1"], 16),  # all labels: the seed picks none, so the labels are the same
    ],
    ids=["same subset", "all labels"],
)
def test_alpha_below_1_mixes_in_the_labels_the_teachers_share(
    teachers: dict[str, Path], names: list[str], num_labelled: int, tmp_path: Path
) -> None:
    report = tmp_path / "d.json"
    assert main(_distill(teachers, names, "--alpha", "0.5", "--json", str(report))) == 0
    doc = json.loads(report.read_text())
    assert doc["num_labelled"] == num_labelled and doc["train"] == str(teachers["folder"])
    assert doc["params"]["alpha"] == 0.5 and doc["teacher"] == [str(teachers[n]) for n in names]


def test_train_gives_the_labels_where_the_teachers_record_none_or_another_source(
    teachers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher that records no labels learnt from all of --train, as with one teacher; --train
    of another source is used whole, whatever subsets of theirs the teachers learnt from."""
    folder = str(teachers["folder"])
    report = tmp_path / "d.json"
    unrecorded = _relabelled(teachers["half1"], tmp_path / "unrecorded", None)
    teachers = {**teachers, "unrecorded 2": unrecorded}
    assert main(_distill(teachers, ["unrecorded", "unrecorded 2"], "--alpha", "0.5")) == 2
    assert "needs labelled images: pass --train SOURCE" in one_line_error(capsys)
    argv = _distill(teachers, ["unrecorded", "all0"], "--alpha", "0.5", "--train", folder,
                    "--json", str(report))  # fmt: skip
    assert main(argv) == 0
    assert json.loads(report.read_text())["num_labelled"] == 16
    other = tmp_path / "labelled"
    write_images(other, 6, seed=5)
    argv = _distill(teachers, ["half1", "half2"], "--alpha", "0.5", "--train", str(other),
                    "--json", str(report))  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(report.read_text())
    assert doc["num_labelled"] == 6 and doc["train"] == str(other)
