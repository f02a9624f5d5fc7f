"""Cached features (RUN_DIR/features) are those of the images and weights of now: `embed` and the
evals never return rows of images that changed, of another folder typed the same way, or of
weights retrained into the same run up to the same step."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import pretrained_tiny_run, write_images
from wildsight import api
from wildsight.train import checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return pretrained_tiny_run(tmp_path_factory, "cache")


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A private copy: tests write features into it and rewrite its checkpoint."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _embed(run: Path, data: str | Path, out: Path) -> tuple[np.ndarray, list[str]]:
    api.embed(run, str(data), out, device="cpu")
    return np.load(out), Path(f"{out}.keys.txt").read_text().splitlines()


def _uncached(run: Path, data: str | Path, tmp_path: Path) -> np.ndarray:
    """The features computed now, through a cache folder of their own (empty)."""
    fresh = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    feats, _ = api.source_features(api.load_encoder(run), str(data), image_size=16, cache_dir=fresh)
    return feats.numpy()


def test_added_and_changed_images_are_embedded_not_the_cached_rows(run: Path, tmp_path: Path):
    paths = write_images(tmp_path / "flat", 10, seed=3)
    before, keys = _embed(run, tmp_path / "flat", tmp_path / "a.npy")
    assert before.shape[0] == 10 and keys == sorted(str(p) for p in paths)
    assert any((run / "features").iterdir())  # the second call could hit the cache
    new = write_images(tmp_path / "more", 1, seed=9)[0]
    added = tmp_path / "flat" / "class0" / "new.png"
    shutil.copy(new, added)
    after, keys = _embed(run, tmp_path / "flat", tmp_path / "a.npy")
    assert after.shape[0] == 11 and str(added) in keys
    np.testing.assert_allclose(after, _uncached(run, tmp_path / "flat", tmp_path), atol=1e-6)
    for row, key in enumerate(keys):  # the images that did not change keep their features
        if key != str(added):
            np.testing.assert_allclose(after[row], before[sorted(map(str, paths)).index(key)],
                                       atol=1e-6)  # fmt: skip
    shutil.copy(new, paths[0])  # one image replaced by another
    changed, keys = _embed(run, tmp_path / "flat", tmp_path / "a.npy")
    row = keys.index(str(paths[0]))
    np.testing.assert_allclose(changed[row], after[keys.index(str(added))], atol=1e-6)
    assert not np.allclose(changed[row], after[row], atol=1e-4)


def test_the_same_relative_source_from_another_folder_gives_its_own_images(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    write_images(tmp_path / "a" / "imgs", 6, seed=1)
    write_images(tmp_path / "b" / "imgs", 8, seed=2)
    monkeypatch.chdir(tmp_path / "a")
    in_a, _ = _embed(run, "imgs", tmp_path / "a.npy")
    monkeypatch.chdir(tmp_path / "b")
    in_b, keys = _embed(run, "imgs", tmp_path / "b.npy")
    assert in_a.shape[0] == 6 and in_b.shape[0] == 8
    assert all(k.startswith(str(tmp_path / "b" / "imgs")) for k in keys)
    np.testing.assert_allclose(in_b, _uncached(run, tmp_path / "b" / "imgs", tmp_path), atol=1e-6)


def test_weights_retrained_to_the_same_step_are_not_served_old_features(run: Path, tmp_path: Path):
    write_images(tmp_path / "flat", 6, seed=4)
    old, _ = _embed(run, tmp_path / "flat", tmp_path / "a.npy")
    probe_old, _ = api.source_features(api.load_encoder(run), str(tmp_path / "flat"), image_size=16)
    np.testing.assert_allclose(probe_old.numpy(), old, atol=1e-6)  # what the evals read
    # "retrain into the same folder": new weights, saved as a checkpoint of the same step
    tensors, state = checkpoint.load_checkpoint(run / "checkpoints")
    generator = torch.Generator().manual_seed(0)
    for name, value in tensors.items():
        if name.startswith("model/backbone.") and value.is_floating_point() and value.ndim == 4:
            tensors[name] = torch.randn(value.shape, generator=generator) * value.std()
    step = api.load_encoder(run).step
    checkpoint.save_checkpoint(run / "checkpoints", step, tensors=tensors, state=state)
    assert api.load_encoder(run).step == step
    new, _ = _embed(run, tmp_path / "flat", tmp_path / "a.npy")
    assert not np.allclose(new, old, atol=1e-4)
    np.testing.assert_allclose(new, _uncached(run, tmp_path / "flat", tmp_path), atol=1e-6)
    probe_new, _ = api.source_features(api.load_encoder(run), str(tmp_path / "flat"), image_size=16)
    np.testing.assert_allclose(probe_new.numpy(), new, atol=1e-6)
