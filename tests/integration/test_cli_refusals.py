"""Command lines that must be refused in one line before any work, and files that must survive:
a flag of another protocol, an output path that cannot be written, a test source without labels
or with classes the probe never saw, a folder that is not a run, a damaged result file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import one_line_error, snapshot, tiny_cli_args, write_images
from wildsight.cli import EVAL_FLAG_PROTOCOLS, _given_eval_flags, check_eval_flags, main

PROTOCOLS = ("linear", "mlp", "knn", "transfer", "finetune", "lowshot")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory of a 2-step pretrain, its labelled image folder)."""
    root = tmp_path_factory.mktemp("refusals")
    folder = root / "images"
    write_images(folder, 24)
    out = root / "run"
    assert main(tiny_cli_args(folder, out, steps=2)) == 0
    return out, folder


def test_only_flags_on_the_command_line_count_as_given() -> None:
    base = ["eval", "linear", "--checkpoint", "r", "--train", "a", "--test", "b"]
    assert _given_eval_flags(base) == {"command", "protocol", "checkpoint", "train", "test"}
    # a flag given with its default value still counts: the user asked for it
    given = _given_eval_flags([*base, "--seed", "0", "--k", "20", "--self-train"])
    assert {"seed", "k", "self_train"} <= given


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_flag_is_accepted_exactly_by_the_protocols_that_read_it(protocol: str) -> None:
    for dest, users in EVAL_FLAG_PROTOCOLS.items():
        if protocol in users:
            check_eval_flags(protocol, {dest})
        else:
            flag = "--" + dest.replace("_", "-")
            with pytest.raises(ValueError, match=f"does not use {flag}: it is a flag of") as err:
                check_eval_flags(protocol, {dest})
            assert all(f"`eval {u}`" in str(err.value) for u in users)


def test_the_table_names_real_eval_flags() -> None:
    """Every key of the table is a dest of the eval parser, so no entry guards nothing."""
    base = ["eval", "linear", "--checkpoint", "r", "--train", "a", "--test", "b"]
    every = _given_eval_flags(base)
    for dest in EVAL_FLAG_PROTOCOLS:
        flag = "--" + dest.replace("_", "-")
        store_true = dest in {"random_init", "probe", "self_train", "distill", "distill_flip"}
        argv = [*base, flag] if store_true else [*base, flag, "1"]
        if dest == "solver":
            argv = [*base, flag, "sgd"]
        elif dest == "precision":
            argv = [*base, flag, "fp32"]
        assert _given_eval_flags(argv) == every | {dest}


@pytest.mark.parametrize(
    ("extra", "flag", "owner"),
    [
        (["linear", "--fraction", "0.1"], "--fraction", "`eval finetune`"),
        (["linear", "--save", "x"], "--save", "`eval finetune`"),
        (["finetune", "--fractions", "0.5"], "--fractions", "`eval lowshot`"),
        (["lowshot", "--seed", "4"], "--seed", "`eval finetune`"),
        (["knn", "--solver", "sgd"], "--solver", "`eval linear`"),
        (["linear", "--k", "5"], "--k", "`eval knn`"),
        (["mlp", "--steps", "10"], "--steps", "`eval finetune`"),
    ],
)
def test_a_flag_of_another_protocol_is_refused_before_any_work(
    run: tuple[Path, Path], capsys: pytest.CaptureFixture[str], extra: list[str], flag: str,
    owner: str,
) -> None:  # fmt: skip
    out, folder = run
    before = snapshot(out)
    argv = ["eval", extra[0], "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), *extra[1:]]  # fmt: skip
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"`eval {extra[0]}` does not use {flag}" in err and owner in err
    assert snapshot(out) == before  # nothing ran


def test_unwritable_output_paths_are_refused_before_training(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, folder = run
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    before = snapshot(out)
    data = ["--checkpoint", str(out), "--train", str(folder), "--test", str(folder)]
    assert main(["eval", "finetune", *data, "--save", str(precious)]) == 2
    assert "--save" in one_line_error(capsys) and precious.read_text() == "keep me"
    assert main(["eval", "knn", *data, "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)
    assert main(["eval", "knn", *data, "--json", str(precious / "x.json")]) == 2
    assert "is a file" in one_line_error(capsys) and precious.read_text() == "keep me"
    assert snapshot(out) == before


def test_probes_refuse_a_test_source_without_labels_or_with_unseen_classes(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, folder = run
    flat = tmp_path / "flat"  # images straight in the folder: no class sub-folders, no labels
    flat.mkdir()
    for path in write_images(tmp_path / "tmp", 4):
        path.rename(flat / path.name)
    data = ["--checkpoint", str(out), "--train", str(folder)]
    assert main(["eval", "knn", *data, "--test", str(flat)]) == 2
    assert "4 of 4 images have no label" in one_line_error(capsys)
    other = tmp_path / "other"  # class0, class1 as in training, and a class2 it never saw
    write_images(other, 6, classes=3)
    assert main(["eval", "linear", *data, "--test", str(other)]) == 2
    err = one_line_error(capsys)
    assert "['class2']" in err and "do not occur in the training source" in err
    # the same classes in another folder are fine
    same = tmp_path / "same"
    write_images(same, 6, seed=3)
    assert main(["eval", "knn", *data, "--test", str(same), "--name", "same"]) == 0
    assert json.loads((out / "eval" / "same.json").read_text())["confusion"]["labels"] == [
        "class0", "class1"
    ]  # fmt: skip


def test_report_refuses_a_folder_that_is_not_a_run_and_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "report.html").write_text("my own page")
    assert main(["report", str(docs)]) == 2
    assert "is not a run directory" in one_line_error(capsys)
    assert (docs / "report.html").read_text() == "my own page"


def test_a_damaged_result_file_is_left_out_of_the_report_with_a_warning(
    run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, folder = run
    data = ["--checkpoint", str(out), "--train", str(folder), "--test", str(folder)]
    assert main(["eval", "knn", *data, "--name", "good"]) == 0
    bad = out / "eval" / "broken.json"
    bad.write_text('{"protocol": "knn", "rows": [')
    # in a process of its own: pytest would catch the warning before the CLI prints it
    done = subprocess.run([sys.executable, "-m", "wildsight", "report", str(out)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr  # the report is still built
    err = done.stderr
    assert err.count("\n") == 1 and err.startswith("wildsight: warning: left out of the report")
    assert str(bad) in err
    html = (out / "report.html").read_text()
    assert "eval/broken.json" in html and "<h3>good</h3>" in html
    # an eval still succeeds and lands in the report
    with pytest.warns(UserWarning, match="broken.json is not readable JSON"):
        assert main(["eval", "knn", *data, "--name", "after"]) == 0
    assert "<h3>after</h3>" in (out / "report.html").read_text()
    bad.unlink()


def test_distill_names_a_student_checkpoint_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run: tuple[Path, Path]
) -> None:
    out, folder = run
    teacher = tmp_path / "teacher"
    argv = ["eval", "finetune", "--checkpoint", str(out), "--train", str(folder), "--test",
            str(folder), "--steps", "2", "--batch-size", "8", "--save", str(teacher)]  # fmt: skip
    assert main(argv) == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main(["distill", "--teacher", str(teacher), "--unlabelled", str(folder), "--test",
                 str(folder), "--student-checkpoint", str(precious), "--steps", "2"]) == 2  # fmt: skip
    err = one_line_error(capsys)
    assert "--student-checkpoint" in err and "is not a pretrain run" in err
    unseen = tmp_path / "unseen"
    write_images(unseen, 6, classes=3)
    assert main(["distill", "--teacher", str(teacher), "--unlabelled", str(folder), "--test",
                 str(unseen), "--steps", "2"]) == 2  # fmt: skip
    err = one_line_error(capsys)
    assert "['class2']" in err and "['class0', 'class1']" in err and str(teacher) not in err
    base = ["distill", "--teacher", str(teacher), "--unlabelled", str(folder), "--test",
            str(folder), "--steps", "2", "--batch-size", "8"]  # fmt: skip
    other = tmp_path / "labelled"
    write_images(other, 8, seed=5)
    assert main([*base, "--train", str(other)]) == 2  # alpha 1 would ignore the labels
    assert "--train gives the labelled images of a distillation with --alpha < 1" in (
        one_line_error(capsys)
    )
    report = tmp_path / "d.json"
    assert main([*base, "--train", str(other), "--alpha", "0.5", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["train"] == str(other)  # the labels it learnt from


def test_a_damaged_teacher_folder_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run: tuple[Path, Path]
) -> None:
    out, folder = run
    good = tmp_path / "teacher"
    assert main(["eval", "finetune", "--checkpoint", str(out), "--train", str(folder), "--test",
                 str(folder), "--steps", "2", "--batch-size", "8", "--save", str(good)]) == 0  # fmt: skip
    meta = json.loads((good / "classifier.json").read_text())
    damages = {
        "cut json": ("classifier.json", (good / "classifier.json").read_text()[:200]),
        "no config": ("classifier.json", json.dumps({k: v for k, v in meta.items() if k != "config"})),
        "cut weights": ("model.safetensors", (good / "model.safetensors").read_bytes()[:100]),
        "random weights": ("model.safetensors", bytes(range(256)) * 8),
    }  # fmt: skip
    for name, (file, content) in damages.items():
        bad = tmp_path / name.replace(" ", "-")
        shutil.copytree(good, bad)
        target = bad / file
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        assert main(["distill", "--teacher", str(bad), "--unlabelled", str(folder), "--test",
                     str(folder), "--steps", "2"]) == 2, name  # fmt: skip
        err = one_line_error(capsys)
        assert str(target) in err and "--save DIR" in err, (name, err)


def test_save_refuses_a_folder_of_other_files_but_replaces_its_own_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run: tuple[Path, Path]
) -> None:
    out, folder = run
    data = ["--checkpoint", str(out), "--train", str(folder), "--test", str(folder), "--steps",
            "2", "--batch-size", "8"]  # fmt: skip
    before = snapshot(folder)
    assert main(["eval", "finetune", *data, "--save", str(folder)]) == 2  # the image folder
    assert "holds other files and no classifier.json" in one_line_error(capsys)
    assert snapshot(folder) == before
    mine = tmp_path / "mine"
    assert main(["eval", "finetune", *data, "--save", str(mine)]) == 0
    assert main(["eval", "finetune", *data, "--save", str(mine), "--seed", "1"]) == 0  # again
    assert json.loads((mine / "classifier.json").read_text())["labels"]["seed"] == 1


def test_init_from_and_resume_together_are_refused_on_a_run_with_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run: tuple[Path, Path]
) -> None:
    out, folder = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = snapshot(copy)
    assert main(["pretrain", "--out", str(copy), "--resume", "--init-from", str(out)]) == 2
    assert "give one of them" in one_line_error(capsys)
    assert snapshot(copy) == before


def test_the_python_api_checks_its_output_path_before_the_work_too(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    from wildsight import api

    out, folder = run
    before = snapshot(out)
    with pytest.raises(IsADirectoryError, match="json_path .* is a folder"):
        api.eval_knn(out, str(folder), str(folder), json_path=tmp_path, name="api-json")
    assert snapshot(out) == before  # no eval ran: no result, no cache


@pytest.mark.parametrize("command", [["shards", "--data", "x", "--shard-size", "2"], ["demo"]])
def test_an_out_folder_that_is_a_file_is_named(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main([*command, "--out", str(precious)]) == 2
    assert f"--out {str(precious)!r} is a file" in one_line_error(capsys)
    assert precious.read_text() == "keep me"
