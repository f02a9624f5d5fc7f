"""Tar shards without index.json have labels that are bare class numbers: a probe matches them
by number only against other bare numbers (or names that are numbers), with a warning, and
refuses to match them to class names, which used to mislabel every image without a sign.

Every test images are also training images, so a 1-NN probe that reads the labels right finds
each one itself: top-1 accuracy 1.0 is the independent expectation of a correct matching."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import one_line_error, pretrained_tiny_run
from wildsight import api
from wildsight.cli import main
from wildsight.data import Loader, open_dataset, write_shards


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return pretrained_tiny_run(tmp_path_factory, "class_names")


def numbered_folders(root: Path, classes: int, per_class: int = 2) -> Path:
    """Class folders "0", "1", ..., each with `per_class` random RGB PNGs."""
    rng = np.random.default_rng(classes)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{j}.png")
    return root


def pack(images: Path, out: Path, *, index: bool) -> Path:
    write_shards([str(images)], out, shard_size=8)
    if not index:
        (out / "index.json").unlink()
    return out


def knn(run: Path, train: Path, test: Path) -> dict:
    return api.eval_knn(run, str(train), str(test), ks=[1], name="knn-1")


def test_unnamed_shards_are_refused_against_named_classes(run, tmp_path, capsys):
    """11 folders sort as 0, 1, 10, 2, ...: the packer's class 2 is folder "10", which a
    name match of "2" to "2" got wrong (top-1 0.18 before); now a one-line refusal, both ways."""
    folder = numbered_folders(tmp_path / "eleven", 11)
    bare = pack(folder, tmp_path / "bare", index=False)
    for train, test in ((folder, bare), (bare, folder)):
        with pytest.raises(ValueError, match=f"{str(bare)!r} names no classes .* but "
                                             f"{str(folder)!r} does"):  # fmt: skip
            knn(run, train, test)
    capsys.readouterr()
    args = ["eval", "knn", "--checkpoint", str(run), "--train", str(folder), "--test", str(bare)]
    assert main(args) == 2
    assert "index.json" in one_line_error(capsys)
    assert knn(run, folder, pack(folder, tmp_path / "named", index=True))["top1"] == 1.0


def test_unnamed_shards_match_by_number_with_a_warning(run, tmp_path):
    """Two unnamed shard sets of one packer, or unnamed shards against class folders 0 ... 9
    (names that are their own numbers): matched by number, and said so."""
    folder = numbered_folders(tmp_path / "ten", 10)
    bare_a = pack(folder, tmp_path / "a", index=False)
    bare_b = pack(folder, tmp_path / "b", index=False)
    for train, test in ((bare_a, bare_b), (folder, bare_b), (bare_a, folder)):
        with pytest.warns(UserWarning, match="matched by class number"):
            assert knn(run, train, test)["top1"] == 1.0


def test_named_shards_are_matched_by_name_whatever_their_numbers(run, tmp_path):
    """Test shards of classes 5 ... 9 only number them 0 ... 4; with index.json they land on the
    training classes of their names, without a warning."""
    whole = numbered_folders(tmp_path / "whole", 10)
    part = tmp_path / "part"
    for c in range(5, 10):
        shutil.copytree(whole / str(c), part / str(c))
    train = pack(whole, tmp_path / "train", index=True)
    test = pack(part, tmp_path / "test", index=True)
    assert open_dataset([str(test)], 16).classes == ["5", "6", "7", "8", "9"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert knn(run, train, test)["top1"] == 1.0


def test_unnamed_shards_beside_named_ones_have_no_label(tmp_path):
    """One dataset of a named and an unnamed shard folder: the unnamed shards' numbers need
    not be the named ones', so their labels are unknown (-1), not read as the named classes."""
    named = pack(numbered_folders(tmp_path / "n", 3), tmp_path / "named", index=True)
    bare = pack(numbered_folders(tmp_path / "b", 2), tmp_path / "bare", index=False)
    ds = open_dataset([str(named), str(bare)], 16)
    assert ds.classes == ["0", "1", "2"]
    labels = {}
    for batch in Loader(ds, batch_size=4, seed=0, shuffle=False, drop_last=False):
        for i, label in zip(batch.indices.tolist(), batch.labels.tolist(), strict=True):
            labels[ds.key(i)] = label
    assert sorted(v for k, v in labels.items() if k.startswith(str(named))) == [0, 0, 1, 1, 2, 2]
    assert [v for k, v in labels.items() if k.startswith(str(bare))] == [-1] * 4


def test_fine_tuning_labels_follow_the_same_rule(tmp_path):
    """Fine-tuning, low-shot and distillation align labels with `models.align_labels`: unnamed
    shards against named classes are refused there too (they were passed through as numbers)."""
    from wildsight.eval.models import align_labels, load_images

    eleven = numbered_folders(tmp_path / "eleven", 11)
    bare = load_images(str(pack(eleven, tmp_path / "bare", index=False)), 16)
    named = load_images(str(eleven), 16)
    assert bare.classes is None and named.classes is not None
    for classes, other in ((named.classes, bare), (None, named)):
        with pytest.raises(ValueError, match="names no classes"):
            align_labels(classes, other, reference="the training set")
    ten = numbered_folders(tmp_path / "ten", 10)
    bare_ten = load_images(str(pack(ten, tmp_path / "bare_ten", index=False)), 16)
    with pytest.warns(UserWarning, match="matched by class number"):
        labels = align_labels(load_images(str(ten), 16).classes, bare_ten)
    assert torch.equal(labels, bare_ten.labels)
