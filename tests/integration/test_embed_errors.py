"""`embed` and the evals on bad input: undecodable images are listed and counted (never dropped
silently), rows are named, hopeless sources / outputs / devices / runs are one-line errors
that write nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import pretrained_tiny_run, write_images
from wildsight.cli import main
from wildsight.train import checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return pretrained_tiny_run(tmp_path_factory, "embed")


def _folder(path: Path, good: int, bad: int) -> tuple[list[Path], list[Path]]:
    """`good` PNGs and `bad` files with a picture extension that are no pictures."""
    goods = write_images(path, good, seed=7)
    path.mkdir(parents=True, exist_ok=True)
    bads = [path / f"broken{i:02d}.png" for i in range(bad)]
    for i, bad_path in enumerate(bads):
        bad_path.write_bytes(b"not a png" * (i + 1))
    return goods, bads


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip().splitlines()


def _embed_args(run: Path, data: Path | str, out: Path, *more: str) -> list[str]:
    return ["embed", "--checkpoint", str(run), "--data", str(data), "--out", str(out), *more]


def test_undecodable_images_are_listed_and_every_row_is_named(run, tmp_path, capsys):
    goods, bads = _folder(tmp_path / "broken", 16, 3)
    out = tmp_path / "emb" / "f.npy"
    for _ in range(2):  # computed, then from the cache: the same warning and files
        rc, err = _cli(_embed_args(run, tmp_path / "broken", out), capsys)
        assert rc == 0 and len(err) == 1
        assert "warning: 3 images could not be decoded" in err[0] and f"{out}.skipped.tsv" in err[0]
        listed = [
            line.split("\t")[0] for line in Path(f"{out}.skipped.tsv").read_text().splitlines()
        ]
        assert sorted(listed) == sorted(map(str, bads))
        keys = Path(f"{out}.keys.txt").read_text().splitlines()
        assert keys == sorted(map(str, goods))  # row i is the i-th good file, in source order
        feats = np.load(out)
        assert feats.shape == (16, 368)
    # each row is the features of the file its key names
    alone = tmp_path / "one"
    (alone / "x").mkdir(parents=True)
    shutil.copy(keys[5], alone / "x" / "img.png")
    assert main(_embed_args(run, alone, tmp_path / "one.npy")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npy")[0], feats[5], atol=1e-5)
    # the good images alone: no list, and a stale one is removed
    shutil.rmtree(tmp_path / "broken")
    _folder(tmp_path / "broken", 16, 0)
    rc, err = _cli(_embed_args(run, tmp_path / "broken", out), capsys)
    assert rc == 0 and err == [] and not Path(f"{out}.skipped.tsv").exists()


def test_a_mostly_broken_source_is_refused_by_embed_and_eval(run, tmp_path, capsys):
    _folder(tmp_path / "mostly", 2, 16)
    out = tmp_path / "f.npy"
    rc, err = _cli(_embed_args(run, tmp_path / "mostly", out), capsys)
    assert rc == 2 and len(err) == 1
    assert "16 of 18 images" in err[0] and str(tmp_path / "mostly") in err[0]
    assert f"{out}.skipped.tsv" in err[0] and not out.exists()
    evals = sorted(p.name for p in (run / "eval").glob("*.json")) if (run / "eval").exists() else []
    rc, err = _cli(["eval", "knn", "--checkpoint", str(run), "--train", str(run.parent / "train"),
                    "--test", str(tmp_path / "mostly")], capsys)  # fmt: skip
    assert rc == 2 and len(err) == 1 and "16 of 18 images" in err[0]
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == evals  # no result written
    assert len((run / "eval" / "knn.skipped.tsv").read_text().splitlines()) == 16


@pytest.mark.parametrize("kind", ["folder", "text"])
def test_a_source_where_nothing_decodes_is_a_one_line_error(run, tmp_path, capsys, kind):
    if kind == "folder":
        data = tmp_path / "allbad"
        _folder(data, 0, 3)
    else:
        data = tmp_path / "notes.txt"
        data.write_text("shopping list\neggs\nmilk\n")
    out = tmp_path / "out" / "f.npy"
    for args in (_embed_args(run, data, out),
                 ["eval", "knn", "--checkpoint", str(run), "--train", str(run.parent / "train"),
                  "--test", str(data)]):  # fmt: skip
        rc, err = _cli(args, capsys)
        assert rc == 2 and len(err) == 1, err
        assert f"no image in {str(data)!r} could be decoded" in err[0] and "torch.cat" not in err[0]
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.suffix == ".tmp"]


def test_an_output_folder_is_refused_before_any_work(run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    _folder(folder, 4, 0)
    before = sorted(p.name for p in tmp_path.iterdir())
    cached = set((run / "features").glob("*")) if (run / "features").exists() else set()
    rc, err = _cli(_embed_args(run, folder, folder), capsys)
    assert rc == 2 and len(err) == 1 and "is a folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no imgs.tmp, nothing else
    assert set((run / "features").glob("*")) == cached  # refused before computing features
    (tmp_path / "file").write_text("x")
    rc, err = _cli(_embed_args(run, folder, tmp_path / "file" / "f.npy"), capsys)
    assert rc == 2 and len(err) == 1 and "is a file" in err[0]
    out = tmp_path / "new" / "deeper" / "f.npy"  # a missing parent folder is created
    assert main(_embed_args(run, folder, out)) == 0 and np.load(out).shape[0] == 4


@pytest.mark.parametrize(
    "device", ["banana", pytest.param("cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA"))],
)  # fmt: skip
def test_a_bad_device_is_the_same_error_with_or_without_cached_features(
    run, tmp_path, capsys, device
):
    folder = tmp_path / "imgs"
    _folder(folder, 4, 0)
    errors = []
    for _ in range(2):  # first no cache, then a cache (made by a good call in between)
        rc, err = _cli(_embed_args(run, folder, tmp_path / "f.npy", "--device", device), capsys)
        assert rc == 2 and len(err) == 1 and repr(device) in err[0]
        errors.append(err[0])
        assert main(_embed_args(run, folder, tmp_path / "ok.npy", "--device", "cpu")) == 0
    assert errors[0] == errors[1] and not (tmp_path / "f.npy").exists()


def test_a_checkpoint_directory_is_accepted_and_embeds_its_own_weights(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    folder = tmp_path / "imgs"
    _folder(folder, 4, 0)
    first = checkpoint.latest_checkpoint(copy / "checkpoints")
    assert main(_embed_args(copy, folder, tmp_path / "latest.npy")) == 0
    tensors, state = checkpoint.load_checkpoint(copy / "checkpoints")  # a later checkpoint
    tensors = {k: v * 0.5 if k.startswith("model/backbone.") and v.ndim == 4 else v
               for k, v in tensors.items()}  # fmt: skip
    step = int(first.name.split("-")[1]) + 1
    checkpoint.save_checkpoint(copy / "checkpoints", step, tensors=tensors, state=state)
    assert main(_embed_args(first, folder, tmp_path / "first.npy")) == 0
    assert main(_embed_args(copy, folder, tmp_path / "last.npy")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "first.npy"), np.load(tmp_path / "latest.npy"),
                               atol=1e-6)  # fmt: skip
    assert not np.allclose(np.load(tmp_path / "last.npy"), np.load(tmp_path / "first.npy"))
    rc, err = _cli(_embed_args(copy / "checkpoints", folder, tmp_path / "x.npy"), capsys)
    assert rc == 2 and len(err) == 1 and "ckpt-* directories" in err[0]


def test_a_config_edited_to_another_backbone_is_one_line_naming_it(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = copy / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: regnetx_200mf", "name: resnet18"))
    folder = tmp_path / "imgs"
    _folder(folder, 2, 0)
    for args in (_embed_args(copy, folder, tmp_path / "f.npy"),
                 ["eval", "knn", "--checkpoint", str(copy), "--train", str(folder),
                  "--test", str(folder)]):  # fmt: skip
        rc, err = _cli(args, capsys)
        assert rc == 2 and len(err) == 1, err
        assert str(copy) in err[0] and "'resnet18'" in err[0] and "do not match" in err[0]
        assert len(err[0]) < 600


def test_a_kill_between_the_two_files_never_pairs_new_features_with_old_keys(
    run, tmp_path, monkeypatch
):
    """embed writes OUT.npy and OUT.keys.txt; a kill between their renames leaves the new
    features without a keys file (visibly incomplete), not beside the previous call's keys."""
    from wildsight import api

    out = tmp_path / "f.npy"
    write_images(tmp_path / "first", 12, seed=3)
    assert api.embed(run, str(tmp_path / "first"), out)[0] == 12
    assert len(Path(f"{out}.keys.txt").read_text().splitlines()) == 12
    write_images(tmp_path / "second", 5, seed=4)

    def killed(path, data):  # the process dies where the keys file would be written
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "write_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        api.embed(run, str(tmp_path / "second"), out)
    assert np.load(out).shape[0] == 5 and not Path(f"{out}.keys.txt").exists()
    monkeypatch.undo()
    api.embed(run, str(tmp_path / "second"), out)  # run again: a matching pair
    assert len(Path(f"{out}.keys.txt").read_text().splitlines()) == np.load(out).shape[0] == 5
