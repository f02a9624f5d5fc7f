"""The command line end to end on a tiny folder: pretrain, eval linear/knn (JSON top1), embed, models."""

import json

import numpy as np

from tests.conftest import tiny_cli_args
from wildsight.cli import main


def test_pretrain_eval_embed_from_the_command_line(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_cli_args(image_folder, run, steps=2)) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    for protocol in ("linear", "knn"):
        out = tmp_path / f"{protocol}.json"
        args = ["eval", protocol, "--checkpoint", str(run), "--train", str(image_folder),
                "--test", str(image_folder), "--json", str(out)]  # fmt: skip
        assert main(args) == 0
        result = json.loads(out.read_text())
        assert 0.0 <= result["top1"] <= 1.0 and result["num_test"] == 48
        assert "top1" in capsys.readouterr().out
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run),
                "--data",
                str(image_folder),
                "--out",
                str(tmp_path / "f.npy"),
            ]
        )
        == 0
    )
    feats = np.load(tmp_path / "f.npy")
    assert feats.shape == (48, 368) and np.isfinite(feats).all()  # regnetx_200mf pre-logits


def test_models_lists_every_backbone_with_published_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["regnety_400mf"]["params_with_classifier"] == 4_344_144  # pycls model zoo
    assert rows["regnety_256gf"]["feature_dim"] == 10_444
    assert main(["models"]) == 0
    assert "regnetx_200mf" in capsys.readouterr().out


def test_eval_of_a_folder_that_is_no_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", "knn", "--checkpoint", str(tmp_path), "--train", "x", "--test", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a wildsight run directory" in err
