"""A folder of real-world mess, end to end through open_dataset + Loader (data level).

Every good image comes out exactly once per epoch, on every rank/worker split; every
bad one is named once in the SkipLog (and its TSV), whatever the number of epochs.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildsight.data import Loader, SkipLog, open_dataset


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def photo(seed: int, size=(40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height grey pixels and holds one row: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_files() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    return {
        "cats/photo.jpg": encode(photo(0), "JPEG"),
        "cats/rotated.jpg": encode(photo(1), "JPEG", exif=exif.tobytes()),
        "cats/cmyk.jpg": encode(photo(2).convert("CMYK"), "JPEG"),
        "dogs/deep/sixteen.png": encode(Image.fromarray(np.full((9, 9), 40000, np.uint16)), "PNG"),
        "dogs/alpha.png": encode(photo(3).convert("RGBA"), "PNG"),
        "dogs/palette.png": encode(palette, "PNG", transparency=0),
        "dogs/anim.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "dogs/pic.webp": encode(photo(4), "WEBP"),
        "tiny.bmp": encode(Image.new("RGB", (1, 1), "green"), "BMP"),
        "grey.tif": encode(photo(5).convert("L"), "TIFF"),
    }


def bad_files() -> dict[str, bytes]:
    jpeg, png = encode(photo(6, (64, 64)), "JPEG"), encode(photo(7, (64, 64)), "PNG")
    return {
        "cats/empty.jpg": b"",
        "cats/truncated.jpg": jpeg[: len(jpeg) // 2],
        "dogs/truncated.png": png[: len(png) // 2],
        "dogs/random.jpg": np.random.default_rng(8).bytes(3000),
        "text.png": b"this is a text file with a picture's name\n",
        "bomb.png": png_header(20000, 20000),
        "big.png": png_header(9000, 9000),  # 81M pixels: over our 64M limit, under Pillow's
    }


def make_mess(root: Path) -> tuple[set[str], set[str]]:
    """Writes the corpus; returns the (good, bad) paths as open_dataset names them."""
    good, bad = set(), set()
    for files, names in ((good_files(), good), (bad_files(), bad)):
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            names.add(str(root / rel))
    (root / "cats" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    bad.add(str(root / "cats" / "gone.jpg"))
    (root / "notes.txt").write_text("ignored: not a picture extension")
    locked = root / "locked.jpg"
    locked.write_bytes(encode(photo(9), "JPEG"))
    locked.chmod(0)
    (good if os.access(locked, os.R_OK) else bad).add(str(locked))  # root reads anything
    return good, bad


@pytest.fixture
def mess(tmp_path):
    good, bad = make_mess(tmp_path / "mess")
    yield tmp_path / "mess", good, bad
    if (tmp_path / "mess" / "locked.jpg").exists():
        (tmp_path / "mess" / "locked.jpg").chmod(0o644)


def test_good_images_once_per_epoch_bad_ones_logged_once(mess, tmp_path):
    root, good, bad = mess
    ds = open_dataset([str(root)], image_size=16)
    assert len(ds) == len(good) + len(bad) and ds.classes == ["cats", "dogs"]
    log = SkipLog()
    loader = Loader(
        ds,
        batch_size=4,
        seed=0,
        num_workers=2,
        drop_last=False,
        max_skip_fraction=0.6,
        skip_log=log,
    )
    for _ in range(2):
        seen: list[str] = []
        for batch in loader:
            assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 16, 16)
            assert torch.equal(batch.labels, ds.labels()[batch.indices])
            seen += [ds.key(i) for i in batch.indices.tolist()]
        assert sorted(seen) == sorted(good)
    assert set(log.reasons) == bad and log.count == len(bad)
    assert log.reasons[str(root / "bomb.png")] == "too large: 400000000 pixels"
    assert log.reasons[str(root / "big.png")] == "too large: 9000x9000"
    assert log.reasons[str(root / "cats" / "gone.jpg")] == "broken symlink"
    assert log.reasons[str(root / "cats" / "empty.jpg")] == "empty file"
    out = tmp_path / "skipped.tsv"
    log.write(out)
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert sorted(key for key, _ in rows) == sorted(bad)


def test_sharded_workers_see_each_good_image_once(mess):
    root, good, _ = mess
    ds = open_dataset([str(root)], image_size=8)
    seen: list[str] = []
    for rank in range(2):
        loader = Loader(
            ds,
            batch_size=3,
            seed=1,
            rank=rank,
            world_size=2,
            num_workers=2,
            drop_last=False,
            max_skip_fraction=0.6,
        )
        seen += [ds.key(i) for batch in loader for i in batch.indices.tolist()]
    assert sorted(seen) == sorted(good)


def test_list_file_with_missing_and_bad_entries(mess, tmp_path):
    root, good, bad = mess
    listing = tmp_path / "list.txt"
    entries = sorted(good) + sorted(bad) + [str(root / "never-existed.png")]
    listing.write_text("".join(f"{os.path.relpath(p, tmp_path)}\n" for p in entries))
    ds = open_dataset([str(listing)], image_size=8)
    log = SkipLog()
    loader = Loader(ds, batch_size=5, seed=2, drop_last=False, max_skip_fraction=0.6, skip_log=log)
    batches = list(loader)
    assert sum(len(b.indices) for b in batches) == len(good)
    assert log.count == len(bad) + 1 and log.by_reason["missing"] == 1


# ---------------------------------------------------------------- the same mess in training


def test_training_uses_every_good_image_and_lists_each_bad_one_once(mess, tmp_path, monkeypatch):
    """Two epochs of pretraining on the mess (plus good PNGs to fill the batches): each epoch
    trains on every good image exactly once and on no bad one; skipped.tsv names each bad file
    once, and the logged count agrees. (An unreadable file is good when the tests run as root,
    which reads files whatever their permissions; `make_mess` sorts it accordingly.)"""
    from tests.conftest import tiny_tree, write_images
    from wildsight import api, config
    from wildsight.train import trainer

    root, good, bad = mess
    extra = 8 - (len(good) + len(bad)) % 8 + 8  # whole batches of 8: no tail dropped per epoch
    good |= {str(p) for p in write_images(root / "extra", extra, size=12)}
    epoch_batches = (len(good) + len(bad)) // 8
    trained: list[list[str]] = []

    class Recording(trainer.Loader):
        def __iter__(self):
            for batch in super().__iter__():
                trained.append([self.dataset.key(i) for i in batch.indices.tolist()])
                yield batch

    monkeypatch.setattr(trainer, "Loader", Recording)
    run = tmp_path / "run"
    tree = tiny_tree(root, run, steps=2 * epoch_batches)
    tree["data"]["num_workers"] = 2
    api.pretrain(config.load(tree))
    assert len(trained) == 2 * epoch_batches  # no batch came out empty
    for epoch in (trained[:epoch_batches], trained[epoch_batches:]):
        keys = [k for batch in epoch for k in batch]
        assert sorted(keys) == sorted(good)  # every good image once, no bad one
    rows = [line.split("\t") for line in (run / "skipped.tsv").read_text().splitlines()]
    assert sorted(key for key, _ in rows) == sorted(bad)  # each bad file once, after 2 epochs
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped_images"] == len(bad)


def test_a_source_of_mostly_bad_files_stops_with_a_clear_error(tmp_path, capsys):
    from tests.conftest import tiny_tree
    from wildsight.cli import main
    from wildsight.config import dump, load

    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(8):
        (folder / f"good{i}.png").write_bytes(encode(photo(i, (12, 12)), "PNG"))
    for i in range(72):
        (folder / f"page{i:02d}.jpg").write_text("<html>not an image</html>")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(dump(load(tiny_tree(folder, tmp_path / "run", steps=50))))
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wildsight: error:") and "could not be decoded" in err
    assert "not an image" in err and "max_skip_fraction" in err
