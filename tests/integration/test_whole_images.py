"""Pretraining crops see the whole picture: the trainer hands each batch's aspect ratios to the
views (from image folders and tar shards alike); `data.whole_images: false` keeps the centre
square. (That the crops are then the picture's own: unit/views/test_view_ops.py.)"""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import tiny_tree
from wildsight import api, config
from wildsight.data import write_shards
from wildsight.train import trainer


@pytest.fixture
def wide(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for k in range(16):
        Image.new("RGB", (40, 20), (16 * k, 0, 255 - 16 * k)).save(folder / f"{k:02d}.png")
    return folder


@pytest.mark.parametrize("packed", [False, True])
def test_pretraining_views_get_the_pictures_aspect_ratios(wide, tmp_path, monkeypatch, packed):
    source = wide
    if packed:
        source = tmp_path / "shards"
        write_shards([str(wide)], source, shard_size=8)
    seen = []
    real = trainer.make_views

    def spy(images, spec, gen, **kw):
        seen.append(kw.get("aspects"))
        return real(images, spec, gen, **kw)

    monkeypatch.setattr(trainer, "make_views", spy)
    api.pretrain(config.load(tiny_tree(source, tmp_path / "run", steps=2)))
    assert len(seen) == 2 and all(a is not None and a.tolist() == [2.0] * 8 for a in seen)
    seen.clear()
    tree = tiny_tree(source, tmp_path / "square", steps=1)
    tree["data"]["whole_images"] = False
    api.pretrain(config.load(tree))
    assert seen == [None]
