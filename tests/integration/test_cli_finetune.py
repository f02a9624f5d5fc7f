"""`wildsight eval finetune | eval lowshot` and `wildsight distill` end to end on a tiny folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import tiny_cli_args, write_images
from wildsight.cli import main

TINY = ["--steps", "2", "--batch-size", "8", "--precision", "fp32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step SwAV run on 48 images of 2 classes (16 px), and that folder."""
    root = tmp_path_factory.mktemp("ft")
    folder = root / "images"
    write_images(folder, 48)
    out = root / "run"
    args = tiny_cli_args(folder, out, steps=2)
    assert main(args) == 0
    return out, folder


def test_finetune_then_distill(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out, folder = run
    teacher = tmp_path / "teacher"
    args = ["eval", "finetune", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fraction", "0.5", "--seed", "1", "--save", str(teacher),
            "--json", str(tmp_path / "ft.json"), *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((tmp_path / "ft.json").read_text())
    assert doc["protocol"] == "finetune" and 0.0 <= doc["top1"] <= 1.0
    assert doc["labels"] == {"source": str(folder), "fraction": 0.5, "seed": 1, "num_labels": 24}
    assert doc["rows"][0]["num_train"] == 24 and doc["rows"][0]["num_test"] == 48
    assert sum(map(sum, doc["confusion"]["counts"])) == 48
    # the seed is in the name: another seed's result does not overwrite this one
    assert (out / "eval" / "finetune-0.5-seed1.json").is_file() and (out / "report.html").is_file()
    assert "fine-tune" in capsys.readouterr().out

    args = ["distill", "--teacher", str(teacher), "--unlabelled", str(folder), "--test", str(folder),
            "--json", str(tmp_path / "d.json"), "--alpha", "0.5", "--save", str(tmp_path / "s"),
            *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    assert [r["model"] for r in doc["rows"]] == ["teacher", "student"]
    assert doc["num_unlabelled"] == 48 and doc["num_labelled"] == 24  # the teacher's subset
    assert 0.0 <= doc["agreement"] <= 1.0 and (tmp_path / "s" / "model.safetensors").is_file()
    assert "agrees with the teacher" in capsys.readouterr().out


def test_two_teachers_teach_together(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`distill --teacher A B`: the rows give each teacher's accuracy, which is what `eval
    finetune` measured when it saved that teacher, and the ensemble's."""
    out, folder = run
    measured = {}
    for seed in (1, 2):
        args = ["eval", "finetune", "--checkpoint", str(out), "--train", str(folder), "--test",
                str(folder), "--fraction", "0.5", "--seed", str(seed), "--save",
                str(tmp_path / f"t{seed}"), "--json", str(tmp_path / f"ft{seed}.json"), *TINY]  # fmt: skip
        assert main(args) == 0
        measured[str(tmp_path / f"t{seed}")] = json.loads(
            (tmp_path / f"ft{seed}.json").read_text()
        )["top1"]
    args = ["distill", "--teacher", *measured, "--teacher-flip", "--unlabelled", str(folder),
            "--test", str(folder), "--json", str(tmp_path / "d.json"), *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    rows = {r["model"]: r["top1"] for r in doc["rows"]}
    assert list(rows) == ["2 teachers together", *(f"teacher {t}" for t in measured), "student"]
    for path, top1 in measured.items():
        assert rows[f"teacher {path}"] == top1
    assert doc["teacher"] == list(measured) and doc["params"]["teachers"] == 2
    assert doc["params"]["teacher_flip"] is True
    capsys.readouterr()
    args = ["distill", "--teacher", next(iter(measured)), str(tmp_path / "nothing"),
            "--unlabelled", str(folder), "--test", str(folder), *TINY]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing" in err and "classifier.json" in err


def test_lowshot_with_its_random_init_reference(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, folder = run
    args = ["eval", "lowshot", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fractions", "0.25", "0.5", "--seeds", "2",
            "--json", str(tmp_path / "ls.json"), *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((tmp_path / "ls.json").read_text())
    assert {(r["model"], r["fraction"]) for r in doc["rows"]} == {
        (m, f) for m in ("pretrained", "random init") for f in (0.25, 0.5)
    }
    assert all(r["seeds"] == 2 for r in doc["rows"]) and len(doc["runs"]) == 8
    assert {r["num_labels"] for r in doc["runs"]} == {12, 24}
    assert "Accuracy vs label fraction" in (out / "report.html").read_text()


def test_lowshot_self_training_adds_a_row_per_model(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, folder = run
    args = ["eval", "lowshot", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fractions", "0.5", "--seeds", "1", "--self-train",
            "--self-train-steps", "2", "--threshold", "0.5", "--unlabelled", str(folder),
            "--cutout", "0.25", "--ema", "0.5",
            "--json", str(tmp_path / "ls.json"), *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((tmp_path / "ls.json").read_text())
    assert {r["model"] for r in doc["rows"]} == {
        "pretrained",
        "random init",
        "pretrained + self-training",
        "random init + self-training",
    }
    self_trained = [r for r in doc["runs"] if r["model"].endswith("self-training")]
    assert all(r["num_labels"] == 24 and r["params"]["total_steps"] == 2 for r in self_trained)
    assert all(0 <= r["params"]["top1_last_weights"] <= 1 for r in self_trained)
    assert doc["self_training"]["threshold"] == 0.5
    assert (
        doc["self_training"]["strong_cutout"] == 0.25 and doc["self_training"]["ema_decay"] == 0.5
    )
    assert doc["self_training"]["unlabelled"] == str(folder)


def test_lowshot_distillation_teaches_a_fresh_model_from_the_last_one(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """--self-train --distill: a third row per model, whose teacher is the self-trained model of
    the same run (its test accuracy, measured again by the distillation, is that row's)."""
    out, folder = run
    args = ["eval", "lowshot", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fractions", "0.5", "--seeds", "2", "--self-train",
            "--self-train-steps", "2", "--distill", "--distill-steps", "3",
            "--distill-temperature", "2", "--distill-alpha", "0.5",
            "--json", str(tmp_path / "ls.json"), *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((tmp_path / "ls.json").read_text())
    chain = ["", " + self-training", " + self-training + distillation"]
    assert {r["model"] for r in doc["rows"]} == {
        m + c for m in ("pretrained", "random init") for c in chain
    }
    runs = {(r["model"], r["seed"]): r for r in doc["runs"]}
    for model in ("pretrained", "random init"):
        for seed in (0, 1):
            student = runs[(model + chain[2], seed)]
            assert student["params"]["teacher_top1"] == runs[(model + chain[1], seed)]["top1"]
            assert student["params"]["total_steps"] == 3 and student["num_labels"] == 24
            assert student["params"]["temperature"] == 2 and student["params"]["alpha"] == 0.5
            assert 0 <= student["params"]["agreement"] <= 1
    assert doc["distillation"]["temperature"] == 2 and doc["distillation"]["unlabelled"] == str(
        folder
    )

    # without self-training, the fine-tuned model is the teacher (SimCLR v2's low-shot step 3)
    args = ["eval", "lowshot", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fractions", "0.5", "--seeds", "1", "--distill",
            "--distill-steps", "2", "--name", "ls-distill", *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "eval" / "ls-distill.json").read_text())
    runs = {r["model"]: r for r in doc["runs"]}
    assert set(runs) == {"pretrained", "random init", "pretrained + distillation",
                         "random init + distillation"}  # fmt: skip
    for model in ("pretrained", "random init"):
        assert runs[model + " + distillation"]["params"]["teacher_top1"] == runs[model]["top1"]

    # two self-trained teachers, the run's and one more from the same fine-tuned model
    args = ["eval", "lowshot", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fractions", "0.5", "--seeds", "1", "--self-train",
            "--self-train-steps", "2", "--distill", "--distill-steps", "2",
            "--distill-teachers", "2", "--distill-flip", "--name", "ls-two", *TINY]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "eval" / "ls-two.json").read_text())
    runs = {r["model"]: r for r in doc["runs"]}
    for model in ("pretrained", "random init"):
        params = runs[model + chain[2]]["params"]
        assert params["teachers"] == 2 and params["teacher_flip"] is True
        assert len(params["teacher_top1s"]) == 2
        assert params["teacher_top1s"][0] == runs[model + chain[1]]["top1"]
        assert runs[model + chain[2]]["seconds"] > params["teacher_seconds"] > 0
    assert doc["distillation"]["teachers"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["lowshot", "--threshold", "0.5"], "--self-train"),
        (["finetune", "--self-train"], "eval lowshot"),
        (["lowshot", "--self-train", "--threshold", "2"], "threshold"),
        (["lowshot", "--ema", "0.9"], "--self-train"),
        (["lowshot", "--self-train", "--cutout", "2"], "strong_cutout"),
        (["lowshot", "--distill-steps", "5"], "--distill"),
        (["lowshot", "--unlabelled", "fmnist:train"], "--self-train or --distill"),
        (["finetune", "--distill"], "eval lowshot"),
        (["lowshot", "--probe", "--distill"], "without --probe"),
        (["lowshot", "--distill", "--distill-alpha", "2"], "alpha"),
        (["lowshot", "--distill", "--distill-temperature", "0"], "temperature"),
        (["lowshot", "--distill-teachers", "2"], "--distill"),
        (["lowshot", "--distill-flip"], "--distill"),
        (["lowshot", "--distill", "--distill-teachers", "0"], "at least 1 teacher"),
        (["finetune", "--fraction", "1.5"], "fraction"),
        (["finetune", "--seed", "-1"], "seed"),
        (["lowshot", "--seeds", "0"], "seeds"),
        (["lowshot", "--jobs", "0"], "jobs"),
        (["lowshot", "--probe", "--jobs", "2"], "probe"),
        (["finetune", "--jobs", "2"], "eval lowshot"),
        (["finetune", "--keep-head-layers", "1"], "head"),
        (["finetune", "--steps", "0"], "steps"),
        (["lowshot", "--self-train", "--self-train-steps", "0"], "--self-train-steps must be >= 1"),
        (["lowshot", "--distill", "--distill-steps", "-1"], "--distill-steps must be >= 1"),
    ],  # fmt: skip
)
def test_bad_values_are_one_line_errors(run: tuple[Path, Path], capsys, extra: list[str],
                                        message: str) -> None:  # noqa: ANN001  # fmt: skip
    out, folder = run
    args = ["eval", extra[0], "--checkpoint", str(out), "--train", str(folder), "--test",
            str(folder), *extra[1:]]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_embed_exports_the_simclr_v2_encoder_with_its_first_head_layer(tmp_path: Path) -> None:
    """A SimCLR run with keep_head_layers=1: `embed` writes ReLU(BN(W h)) of the pretrained
    head's first layer (h = the backbone's pre-logits, embedded alone with --keep-head-layers 0)."""
    import numpy as np
    import torch

    from tests.conftest import write_images
    from wildsight.eval.models import pretrained_state

    folder = tmp_path / "images"
    write_images(folder, 16)
    out = tmp_path / "simclr"
    args = ["pretrain", "--data", str(folder), "--image-size", "16", "--method", "simclr",
            "--backbone", "regnetx_200mf", "--batch-size", "8", "--workers", "0", "--out", str(out),
            "--no-progress", "--steps", "2", "--set", "method.hidden_dim=24",
            "--set", "method.out_dim=8", "--set", "method.keep_head_layers=1"]  # fmt: skip
    assert main(args) == 0
    for k, name in ((None, "kept.npy"), (0, "backbone.npy")):
        extra = [] if k is None else ["--keep-head-layers", str(k)]
        assert main(["embed", "--checkpoint", str(out), "--data", str(folder),
                     "--out", str(tmp_path / name), *extra]) == 0  # fmt: skip
    kept, h = (torch.from_numpy(np.load(tmp_path / n)) for n in ("kept.npy", "backbone.npy"))
    assert kept.shape == (16, 24) and h.shape == (16, 368)
    state = pretrained_state(out)
    w = state["projector.0.weight"]  # [24, 368], no bias: BN follows
    mean, var = state["projector.1.running_mean"], state["projector.1.running_var"]
    gamma, beta = state["projector.1.weight"], state["projector.1.bias"]
    expected = torch.relu((h @ w.T - mean) / torch.sqrt(var + 1e-5) * gamma + beta)
    torch.testing.assert_close(kept, expected, rtol=1e-4, atol=1e-4)


def test_an_interrupted_lowshot_call_keeps_its_finished_runs_and_the_same_call_reuses_them(
    run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third of four fine-tunes crashes: the first two runs are on disk; the same call then
    fine-tunes only the other two, keeps the first two as they were, and removes the file."""
    from wildsight import api_finetune
    from wildsight.eval import lowshot
    from wildsight.eval.finetune import FinetuneConfig

    out, folder = run
    real, calls = lowshot.finetune, []

    def crashing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs["cfg"].seed)
        if len(calls) == 3 and crash:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(lowshot, "finetune", crashing)
    cfg = FinetuneConfig(steps=2, batch_size=8, precision="fp32")
    kwargs = {"fractions": (0.5,), "seeds": 2, "config": cfg, "name": "resume"}
    partial = out / "eval" / "resume.partial.jsonl"
    crash = True
    with pytest.raises(RuntimeError, match="power cut"):
        api_finetune.eval_lowshot(out, str(folder), str(folder), **kwargs)
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert lines[0]["settings"]["seeds"] == 2 and len(lines) == 3  # settings + 2 runs
    kept = {(r["model"], r["seed"]): r["top1"] for r in lines[1:]}
    with pytest.raises(ValueError, match="other settings"):  # never overwritten by another call
        api_finetune.eval_lowshot(out, str(folder), str(folder), **{**kwargs, "seeds": 1})
    image = next(folder.rglob("*.png"))  # an image rewritten since: the kept runs are stale
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="the images or the weights changed since"):
        api_finetune.eval_lowshot(out, str(folder), str(folder), **kwargs)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # as it was: the runs fit again
    crash, calls[:] = False, []
    doc = api_finetune.eval_lowshot(out, str(folder), str(folder), **kwargs)
    assert len(calls) == 2 and len(doc["runs"]) == 4
    assert {(r["model"], r["seed"]) for r in doc["runs"]} == {
        (m, s) for m in ("pretrained", "random init") for s in (0, 1)
    }
    assert all(r["top1"] == kept[(r["model"], r["seed"])] for r in doc["runs"]
               if (r["model"], r["seed"]) in kept)  # fmt: skip
    assert not partial.exists() and (out / "eval" / "resume.json").is_file()


class _BrokenRandomInit:
    """A make_classifier whose random init fails: a worker process's error must reach the caller."""

    def __init__(self, run: Path, num_classes: int) -> None:
        self.run, self.num_classes = run, num_classes

    def __call__(self, model: str, seed: int):  # noqa: ANN204
        from wildsight.api_finetune import finetune_classifier
        from wildsight.eval.models import load_encoder

        if model == "random init":
            raise RuntimeError(f"disk gone at seed {seed}")
        return finetune_classifier(load_encoder(self.run), self.num_classes)[0]


def test_lowshot_jobs_give_the_same_runs_as_one_process(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """--jobs 2 spreads the (model, fraction, seed) runs over two processes of one thread; every
    run is seeded by itself, so each matches the one-thread sequential call exactly."""
    import torch

    out, folder = run
    args = ["eval", "lowshot", "--checkpoint", str(out), "--train", str(folder),
            "--test", str(folder), "--fractions", "0.5", "--seeds", "2", "--self-train",
            "--self-train-steps", "2", "--threshold", "0.5", "--distill", "--distill-steps", "2",
            *TINY]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main([*args, "--json", str(tmp_path / "one.json"), "--name", "one"]) == 0
        torch.set_num_threads(2)  # two jobs of 2 // 2 = 1 thread
        assert main([*args, "--json", str(tmp_path / "two.json"), "--jobs", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    key = [(r["model"], r["seed"]) for r in one["runs"]]
    assert key == [(r["model"], r["seed"]) for r in two["runs"]] and len(key) == 12
    assert [r["top1"] for r in one["runs"]] == [r["top1"] for r in two["runs"]]
    assert one["rows"] == two["rows"]
    assert not list((out / "eval").glob("*.partial.jsonl"))


def test_a_failing_lowshot_job_stops_the_call_with_its_error(run: tuple[Path, Path]) -> None:
    from wildsight.eval.finetune import FinetuneConfig, InputSpec
    from wildsight.eval.lowshot import run_lowshot
    from wildsight.eval.models import load_encoder, load_images

    out, folder = run
    train = load_images(str(folder), 16)
    inputs = InputSpec.from_config(load_encoder(out).config)
    kept = []
    with pytest.raises(RuntimeError, match="disk gone at seed"):
        run_lowshot(_BrokenRandomInit(out, train.num_classes), inputs, train, train.images,
                    train.labels, fractions=(0.5,), seeds=2, jobs=2, threads=1, on_rows=kept.append,
                    cfg=FinetuneConfig(steps=2, batch_size=8, precision="fp32"))  # fmt: skip
    assert all(rows[0].model == "pretrained" for rows in kept)  # only finished runs, none broken


def test_evals_of_a_checkpoint_folder_write_into_its_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """--checkpoint RUN/checkpoints/ckpt-N: results and report go to RUN (the checkpoint folder
    is pruned by keep_last and must hold only the checkpoint), and the printed report path is
    the one written. Fine-tuning, low-shot and distillation wrote into the checkpoint folder."""
    folder = tmp_path / "images"
    write_images(folder, 24)
    out = tmp_path / "run"
    assert main(tiny_cli_args(folder, out, steps=2)) == 0
    ckpt = sorted((out / "checkpoints").glob("ckpt-*"))[-1]
    inside = sorted(p.name for p in ckpt.iterdir())
    data = ["--train", str(folder), "--test", str(folder)]
    teacher = tmp_path / "teacher"
    for args in (
        ["eval", "knn", "--checkpoint", str(ckpt), *data, "--k", "1"],
        ["eval", "finetune", "--checkpoint", str(ckpt), *data, "--fraction", "0.5",
         "--save", str(teacher), *TINY],
        ["eval", "lowshot", "--checkpoint", str(ckpt), *data, "--fractions", "0.5", "--seeds", "1",
         *TINY],
    ):  # fmt: skip
        capsys.readouterr()
        assert main(args) == 0
        assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert main(["distill", "--teacher", str(teacher), "--unlabelled", str(folder), "--test",
                 str(folder), *TINY]) == 0  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == inside  # nothing written into the checkpoint
    written = sorted(p.stem for p in (out / "eval").glob("*.json"))
    assert written == ["distill", "finetune-0.5", "knn", "lowshot"]
    assert (out / "report.html").is_file()
