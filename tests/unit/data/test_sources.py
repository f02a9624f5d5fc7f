"""open_dataset: spec forms, labels, concatenation, one-line errors, and the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildsight.data import DataError, Skip, open_dataset
from wildsight.data.sources import FMNIST_CLASSES

FMNIST = Path(os.environ.get("WILDSIGHT_FMNIST_DIR") or "/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed"
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, 1) if path.suffix == ".gz" else raw)


def make_idx_folder(folder: Path, n_train: int = 10, n_test: int = 4, side: int = 28) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, side, side)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def save(path: Path, color=(200, 10, 10), size=(12, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def message(spec, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        open_dataset(spec, image_size=8, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_folder_tree_classes_and_root_files(tmp_path):
    root = tmp_path / "photos"
    save(root / "loose.png")
    save(root / "cat" / "1.jpg")
    save(root / "cat" / "deeper" / "2.PNG")
    save(root / "dog" / "3.webp")
    save(root / ".hidden.png")
    save(root / ".cache" / "4.png")
    (root / "README.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "cat" / "loop").symlink_to(root)  # followed once, never twice
    ds = open_dataset([str(root)], image_size=8)
    assert ds.classes == ["cat", "dog"] and not ds.in_memory
    assert [os.path.relpath(ds.key(i), root) for i in range(len(ds))] == [
        "cat/1.jpg",
        "cat/deeper/2.PNG",
        "dog/3.webp",
        "loose.png",
    ]
    assert ds.labels().tolist() == [0, 0, 1, -1]
    image = ds.load(0)
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8)
    assert image.dtype == torch.uint8  # a JPEG: colours within compression error
    assert (image[:, 4, 4].int() - torch.tensor([200, 10, 10])).abs().max() <= 6


def test_flat_folder_has_no_classes(tmp_path):
    for k in range(3):
        save(tmp_path / f"{k}.png")
    ds = open_dataset(str(tmp_path), image_size=4)
    assert len(ds) == 3 and ds.classes is None and ds.labels().tolist() == [-1, -1, -1]


def test_list_file_paths_and_labels(tmp_path):
    a = save(tmp_path / "imgs" / "a.png")
    save(tmp_path / "imgs" / "b.png")
    elsewhere = save(tmp_path / "other" / "c.png")
    listing = tmp_path / "lists" / "set.txt"
    listing.parent.mkdir()
    listing.write_text(
        f"# a comment\n../imgs/a.png\tzebra\n\n../imgs/b.png\tant\n{elsewhere}\n../imgs/gone.png\n"
    )
    ds = open_dataset([str(listing)], image_size=6)
    assert len(ds) == 4 and ds.classes == ["ant", "zebra"]
    assert ds.labels().tolist() == [1, 0, -1, -1]
    assert os.path.samefile(ds.key(0), a)
    assert isinstance(ds.load(2), torch.Tensor)
    missing = ds.load(3)
    assert isinstance(missing, Skip) and missing.reason == "missing"


def test_list_file_numeric_labels_are_class_indices(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text("a.png\t2\na.png\t0\n")
    ds = open_dataset(str(tmp_path / "l.txt"), image_size=6)
    assert ds.classes == ["0", "1", "2"] and ds.labels().tolist() == [2, 0]


def test_idx_folder_is_detected_and_kept_in_memory(tmp_path):
    folder = make_idx_folder(tmp_path / "idx")
    train = open_dataset([str(folder)], image_size=28)
    test = open_dataset([f"{folder}:test"], image_size=28)
    assert (len(train), len(test)) == (10, 4) and train.in_memory
    assert train.classes == [str(k) for k in range(10)]
    assert train.labels().tolist() == list(range(10))
    raw = train.sources[0].images  # [N, 1, 28, 28]
    one = train.load(3)
    assert isinstance(one, torch.Tensor) and one.shape == (3, 28, 28)
    assert (one == raw[3, 0]).all()
    batch = train.gather(torch.tensor([3, 0, 9]))
    assert batch.shape == (3, 3, 28, 28) and batch.is_contiguous() and (batch[0] == one).all()
    small = open_dataset([str(folder)], image_size=14).gather(torch.tensor([3]))
    assert small.shape == (1, 3, 14, 14)
    assert abs(small.float().mean() - raw[3].float().mean()) < 3


def test_fmnist_spec_with_folder_and_env(tmp_path, monkeypatch):
    folder = make_idx_folder(tmp_path / "fm")
    ds = open_dataset([f"fmnist:{folder}:test"], image_size=28)
    assert len(ds) == 4 and ds.classes == FMNIST_CLASSES
    monkeypatch.setenv("WILDSIGHT_FMNIST_DIR", str(folder))
    assert len(open_dataset(["fmnist:train"], image_size=28)) == 10
    monkeypatch.setenv("WILDSIGHT_FMNIST_DIR", str(tmp_path / "absent"))
    assert "WILDSIGHT_FMNIST_DIR" in message(["fmnist:train"])


def test_concatenation_merges_classes(tmp_path):
    idx = make_idx_folder(tmp_path / "idx")
    save(tmp_path / "tree" / "9" / "x.png")
    save(tmp_path / "tree" / "bird" / "y.png")
    both = open_dataset([f"{idx}:test", str(idx), str(tmp_path / "tree")], image_size=28)
    assert len(both) == 4 + 10 + 2 and not both.in_memory
    assert both.classes == [str(k) for k in range(10)] + ["bird"]
    assert both.labels().tolist()[-2:] == [9, 10]
    for i in (0, 3, 4, 13, 14, 15):
        assert isinstance(both.load(i), torch.Tensor)
    memory = open_dataset([f"{idx}:test", str(idx)], image_size=28)
    assert memory.in_memory and len(memory) == 14
    picked = torch.tensor([13, 0, 4, 3])
    gathered = memory.gather(picked)
    for row, i in zip(gathered, picked.tolist(), strict=True):
        assert (row == memory.load(i)).all()


def test_bad_specs_fail_in_one_line(tmp_path):
    assert message([str(tmp_path / "nowhere")]).startswith(f"no images found in '{tmp_path}")
    (tmp_path / "empty").mkdir()
    assert message([str(tmp_path / "empty")]).startswith("no images found in")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert "picture extension" in message([str(tmp_path / "notes")])
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert message([str(tmp_path / "empty.txt")]).startswith("no images found in")
    single = save(tmp_path / "one.png")
    assert "single file" in message([str(single)])
    (tmp_path / "shard-000.tar").write_bytes(b"\0" * 1024)  # shards stream (test_shards.py)
    assert "shards of" in message([str(tmp_path / "shard-{000..001}.tar")])
    assert "fmnist:train" in message(["fmnist:validation:x"])
    assert "at least one" in message([])
    (tmp_path / "bad.txt").write_text("a\tb\tc\n")
    assert "path<TAB>label" in message([str(tmp_path / "bad.txt")])


def test_broken_idx_file_fails_in_one_line(tmp_path):
    folder = make_idx_folder(tmp_path / "idx")
    data = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    assert "re-download" in message([str(folder)])
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\0"))
    assert "re-download" in message([str(folder)])


@needs_fmnist
def test_real_fashion_mnist_matches_a_direct_parse():
    def parse(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.open(FMNIST / name).read(), dtype=np.uint8, offset=offset)

    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        ds = open_dataset([f"fmnist:{split}"], image_size=28)
        pixels = parse(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(n, 28, 28)
        labels = parse(f"{prefix}-labels-idx1-ubyte.gz", 8)
        assert len(ds) == n and ds.in_memory and ds.classes == FMNIST_CLASSES
        assert ds.labels().min() == 0 and ds.labels().max() == 9
        assert (ds.labels().numpy() == labels).all()
        images = ds.sources[0].images  # [N, 1, 28, 28]
        assert images.shape == (n, 1, 28, 28)
        assert int(images.sum(dtype=torch.int64)) == int(pixels.sum(dtype=np.int64))
        picked = torch.tensor([0, n - 1, n // 2])
        batch = ds.gather(picked)  # [3, 3, 28, 28]
        assert (batch == torch.from_numpy(pixels[picked.numpy()])[:, None]).all()
