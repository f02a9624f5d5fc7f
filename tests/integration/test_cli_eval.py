"""`wildsight eval linear|mlp|knn|transfer` and `wildsight report` end to end on a tiny run: one
JSON per eval in RUN_DIR/eval/, rows per layer / per k, and a self-contained report.html."""

from __future__ import annotations

import json
import re

from tests.conftest import tiny_cli_args
from wildsight.cli import main


def test_every_probe_and_the_report_from_the_command_line(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_cli_args(image_folder, run, steps=2)) == 0
    data = ["--checkpoint", str(run), "--train", str(image_folder), "--test", str(image_folder)]

    def evaluate(name: str, *args: str) -> dict:
        """Run `wildsight eval ARGS`; the result must land in RUN_DIR/eval/NAME.json."""
        capsys.readouterr()
        assert main(["eval", *args, *data]) == 0
        out = capsys.readouterr().out
        assert "top1" in out and "report.html" in out
        return json.loads((run / "eval" / f"{name}.json").read_text())

    layers = evaluate("linear-sgd-layers", "linear", "--layers", "all", "--solver", "sgd")
    assert [r["layer"] for r in layers["rows"]] == ["stage1", "stage2", "stage3", "pre_logits"]
    assert [r["feature_dim"] for r in layers["rows"]] == [24, 56, 152, 368]
    assert layers["top1"] == layers["rows"][-1]["top1"] and layers["solver"] == "sgd"
    assert set(layers["params"]) == {"lr", "l2"}
    counts = layers["confusion"]["counts"]
    assert layers["confusion"]["labels"] == ["class0", "class1"]
    assert sum(map(sum, counts)) == 48
    # the matrix diagonal is the accuracy of the headline row
    assert (counts[0][0] + counts[1][1]) / 48 == layers["top1"]
    grid = layers["neighbours"]
    assert len(grid["queries"]) == 8 and all(len(q["neighbours"]) == 8 for q in grid["queries"])
    assert len(list((run / "features").glob("*.safetensors"))) == 4  # one cached file per layer

    mlp = evaluate("mlp", "mlp")
    assert len(mlp["rows"]) == 1 and mlp["params"]["hidden_dim"] == 256

    copy = tmp_path / "knn-copy.json"
    knn = evaluate("knn", "knn", "--k", "1", "5", "100", "--json", str(copy))
    assert [r["k"] for r in knn["rows"]] == [1, 5, 48]  # k is cut to the 48 training images
    assert json.loads(copy.read_text()) == knn and knn["top1"] == knn["rows"][0]["top1"]

    transfer = evaluate("to-folder", "transfer", "--name", "to-folder")
    assert transfer["pretrained_on"] == [str(image_folder)]
    assert [r["features"] for r in transfer["rows"]] == ["pretrained", "random init"]
    assert transfer["solver"] == "lbfgs" and set(transfer["params"]) == {"l2"}

    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    for section in ("training", "results", "layers", "confusion", "neighbours"):
        assert f'id="{section}"' in html
    assert not re.search(r"<script|<link|@import", html)
    assert set(re.findall(r"https?://[^\"'\s)]*", html)) <= {"http://www.w3.org/2000/svg"}
    for name in ("linear-sgd-layers", "mlp", "knn", "to-folder"):
        assert f"<h3>{name}</h3>" in html


def test_bad_eval_options_are_one_line_errors(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_cli_args(image_folder, run, steps=1)) == 0
    capsys.readouterr()
    args = ["eval", "linear", "--checkpoint", str(run), "--train", str(image_folder),
            "--test", str(image_folder), "--layers", "stage7"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown layer 'stage7'" in err and "pre_logits" in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no run directory" in capsys.readouterr().err
