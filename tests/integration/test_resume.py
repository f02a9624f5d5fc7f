"""A run that crashes and resumes ends with exactly the weights of an uninterrupted run (CPU)."""

import json
from pathlib import Path

import torch

from tests.conftest import tiny_tree
from tests.integration.reliability import pretrain_killed_at_step
from wildsight import api, config
from wildsight.train import checkpoint


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]


def test_crash_then_resume_equals_uninterrupted(image_folder, tmp_path, monkeypatch):
    straight = api.pretrain(config.load(tiny_tree(image_folder, tmp_path / "straight")))
    assert straight.steps == 6

    crashed_dir = tmp_path / "crashed"
    pretrain_killed_at_step(tiny_tree(image_folder, crashed_dir), 4, monkeypatch)
    _, state = checkpoint.load_checkpoint(crashed_dir / "checkpoints")
    assert state["train"]["step"] == 3  # the last checkpoint before the crash

    resumed = api.pretrain(config.load(tiny_tree(image_folder, crashed_dir)), resume=True)
    assert resumed.steps == 6
    a, b = _final_model(tmp_path / "straight"), _final_model(crashed_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical, queue and BN statistics included


def test_run_directory_holds_config_metrics_and_checkpoint(image_folder, tmp_path):
    result = api.pretrain(config.load(tiny_tree(image_folder, tmp_path / "run", steps=3)))
    run = result.run_dir
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 3 and '"loss"' in rows[0]
    assert list((run / "tb").iterdir())  # TensorBoard event file
    # the saved config reproduces the run's configuration exactly
    assert config.load(config.read_yaml(run)) == config.load(config.read_yaml(run / "config.yaml"))
    # the encoder loads strictly from the checkpoint and embeds images
    out = api.embed(run, str(tmp_path.parent / tmp_path.name / "images"), tmp_path / "emb.npy")
    assert out[0] == 48


def test_folder_with_broken_files_trains_and_reports_skips(image_folder, tmp_path):
    (image_folder / "class0" / "empty.jpg").write_bytes(b"")
    (image_folder / "class1" / "noise.png").write_bytes(b"\x89PNG not really")
    (image_folder / "class1" / "notes.jpg").write_text("hello")
    result = api.pretrain(config.load(tiny_tree(image_folder, tmp_path / "run", steps=12)))
    assert result.steps == 12
    skipped = (result.run_dir / "skipped.tsv").read_text().splitlines()
    names = sorted(Path(line.split("\t")[0]).name for line in skipped if line)
    assert names == ["empty.jpg", "noise.png", "notes.jpg"]


def test_time_budget_stops_on_time_and_sizes_the_schedule_to_it(image_folder, tmp_path):
    # the budget must cover the calibration steps on a loaded machine too: size it from the
    # measured pace of a short warm run (25 steps' worth, at least 3 s)
    warm = api.pretrain(config.load(tiny_tree(image_folder, tmp_path / "warm", steps=4)))
    budget = max(3.0, 25 * warm.images_seen / warm.images_per_s / warm.steps)
    tree = tiny_tree(image_folder, tmp_path / "run", steps=None, time_budget_s=budget)
    result = api.pretrain(config.load(tree))
    assert result.stopped_by == "time_budget"
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert budget <= rows[-1]["elapsed_s"] < budget + 5 * (rows[-1]["elapsed_s"] / result.steps)
    # the cosine schedule was stretched over the budget: the LR has come down to near its floor
    assert rows[-1]["lr"] < 0.2 * max(r["lr"] for r in rows)


def test_resume_with_a_larger_step_budget_extends_the_run(image_folder, tmp_path):
    api.pretrain(config.load(tiny_tree(image_folder, tmp_path / "run", steps=3)))
    result = api.pretrain(
        config.load(tiny_tree(image_folder, tmp_path / "run", steps=5)), resume=True
    )
    assert result.steps == 5
    _, state = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["train"]["step"] == 5


def test_a_plateau_schedule_resumes_with_the_lrs_of_the_uninterrupted_run(
    image_folder, tmp_path, monkeypatch
):
    """SEER's halve-on-plateau LR reads the previous step's loss: the checkpoint keeps it, so
    the first step after a resume feeds the schedule what the uninterrupted run fed it."""
    plateau = {"schedule": "plateau", "plateau_window_steps": 1, "plateau_patience_steps": 1}

    def tree(out: Path) -> dict:
        t = tiny_tree(image_folder, out, steps=8, checkpoint_every_steps=4)
        t["optim"] |= plateau
        return t

    def lrs(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["lr"] for row in rows}

    straight = api.pretrain(config.load(tree(tmp_path / "straight")))
    pretrain_killed_at_step(tree(tmp_path / "crashed"), 5, monkeypatch)
    resumed = api.pretrain(config.load(tree(tmp_path / "crashed")), resume=True)
    expected = lrs(tmp_path / "straight")
    assert len(set(expected.values())) > 1  # the LR was halved in these 8 steps: a real test
    got = lrs(tmp_path / "crashed")
    assert {s: got[s] for s in expected if s > 4} == {s: v for s, v in expected.items() if s > 4}
    assert resumed.last_loss == straight.last_loss
    _, a = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoints")
    _, b = checkpoint.load_checkpoint(tmp_path / "crashed" / "checkpoints")
    assert a["plateau"] == b["plateau"]
