"""Loader: coverage, determinism, rank/worker sharding, exact mid-epoch resume, skips, speed."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildsight.data import Batch, DataError, Loader, SkipLog, epoch_permutation, open_dataset

FMNIST = Path(os.environ.get("WILDSIGHT_FMNIST_DIR") or "/usr/share/datasets/fashion-mnist")


def idx_dataset(folder: Path, n: int, image_size: int = 28):
    """n random 28x28 grey images in IDX files (in memory), labels k % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for name, array in (
        ("train-images-idx3-ubyte.gz", images),
        ("train-labels-idx1-ubyte.gz", labels),
    ):
        header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes(), 1))
    return open_dataset([str(folder)], image_size=image_size)


def file_dataset(folder: Path, n: int, bad: tuple[int, ...] = ()):
    """n tiny PNG files named 000.png...; the indices in `bad` are zero-byte files."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        path = folder / f"{k:03d}.png"
        if k in bad:
            path.write_bytes(b"")
        else:
            Image.new("RGB", (6, 5), (k, 255 - k, 7)).save(path)
    return open_dataset([str(folder)], image_size=4)


def indices(batches) -> list[int]:
    return [i for b in batches for i in b.indices.tolist()]


def take(loader: Loader, count: int) -> list[Batch]:
    return list(itertools.islice(iter(loader), count))


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.indices, y.indices)
        and torch.equal(x.images, y.images)
        and torch.equal(x.labels, y.labels)
        for x, y in zip(a, b, strict=True)
    )


def test_one_epoch_covers_every_index_once(tmp_path):
    ds = idx_dataset(tmp_path, 103)
    keep_tail = Loader(ds, batch_size=10, seed=0, drop_last=False)
    batches = list(keep_tail)
    assert len(keep_tail) == len(batches) == 11 and sorted(indices(batches)) == list(range(103))
    first = batches[0]
    assert first.images.shape == (10, 3, 28, 28) and first.images.dtype == torch.uint8
    assert first.indices.dtype == first.labels.dtype == torch.int64
    assert torch.equal(first.labels, ds.labels()[first.indices])
    assert torch.equal(first.images, ds.gather(first.indices))
    dropping = list(Loader(ds, batch_size=10, seed=0))
    assert len(dropping) == 10 and len(set(indices(dropping))) == 100
    assert indices(list(Loader(ds, batch_size=10, seed=0, shuffle=False)))[:20] == list(range(20))


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    ds = idx_dataset(tmp_path, 64)
    a, b = Loader(ds, batch_size=8, seed=1), Loader(ds, batch_size=8, seed=1)
    epoch0 = indices(list(a))
    assert epoch0 == indices(list(b)) == epoch_permutation(64, 1, 0)[:64].tolist()
    epoch1 = indices(list(a))
    assert a.epoch == 2 and epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    assert indices(list(Loader(ds, batch_size=8, seed=2))) != epoch0


def test_ranks_take_disjoint_strided_slices(tmp_path):
    ds = idx_dataset(tmp_path, 50)
    per_rank = [
        indices(list(Loader(ds, batch_size=4, seed=3, rank=r, world_size=3, drop_last=False)))
        for r in range(3)
    ]
    assert sorted(sum(per_rank, [])) == list(range(50))
    lengths = [
        len(Loader(ds, batch_size=4, seed=3, rank=r, world_size=3, drop_last=False))
        for r in range(3)
    ]
    assert lengths == [5, 5, 4]
    order = epoch_permutation(50, 3, 0).tolist()
    assert per_rank[1][:4] == order[1:12:3]  # rank 1 of the first global batch of 12


def test_two_ranks_two_workers_each_file_once_per_epoch(tmp_path):
    ds = file_dataset(tmp_path, 37)
    seen: list[int] = []
    for rank in range(2):
        loader = Loader(
            ds, batch_size=4, seed=5, rank=rank, world_size=2, num_workers=2, drop_last=False
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += indices(batches)
        for batch in batches:  # the images are the files of those indices
            assert batch.images[:, 0, 0, 0].tolist() == batch.indices.tolist()
    assert sorted(seen) == list(range(37))


def test_resume_mid_epoch_in_memory_is_exact(tmp_path):
    ds = idx_dataset(tmp_path, 50)
    reference = take(Loader(ds, batch_size=8, seed=7, endless=True), 20)  # crosses 3 epochs
    first = Loader(ds, batch_size=8, seed=7, endless=True)
    stream = iter(first)
    head = [next(stream) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["position"]) == (0, 32)
    resumed = Loader(ds, batch_size=8, seed=7, endless=True)
    resumed.load_state_dict(state)
    assert same_batches(head + take(resumed, 16), reference)
    assert same_batches([next(stream) for _ in range(16)], reference[4:])


def test_resume_with_workers_is_exact(tmp_path):
    ds = file_dataset(tmp_path, 30)
    reference = take(Loader(ds, batch_size=4, seed=11, endless=True), 12)  # 7 per epoch
    first = Loader(ds, batch_size=4, seed=11, num_workers=2, endless=True)
    head = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Loader(ds, batch_size=4, seed=11, num_workers=2, endless=True)
    resumed.load_state_dict(state)
    assert same_batches(head + take(resumed, 7), reference)


def test_resume_at_an_epoch_boundary_and_across_world_sizes(tmp_path):
    ds = idx_dataset(tmp_path, 48)
    old = Loader(ds, batch_size=8, seed=0)
    epoch0 = list(old)
    full = Loader(ds, batch_size=8, seed=0)
    full.load_state_dict({"epoch": 0, "position": 48})  # saved just after the last batch
    assert same_batches(list(full), list(old))
    two = [Loader(ds, batch_size=4, seed=0, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        loader.load_state_dict({"epoch": 0, "position": 16})
    rest = sorted(indices(list(two[0])) + indices(list(two[1])))
    assert rest == sorted(indices(epoch0[2:]))


def test_foreign_state_is_refused_in_one_line(tmp_path):
    ds = idx_dataset(tmp_path, 40)
    state = Loader(ds, batch_size=8, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        Loader(ds, batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="position"):
        Loader(ds, batch_size=8, seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="fewer than one global batch"):
        Loader(ds, batch_size=16, seed=1, world_size=3)


def test_skipped_files_are_dropped_and_logged_once(tmp_path):
    bad = (0, 1, 2, 3, 9)
    ds = file_dataset(tmp_path, 14, bad=bad)
    log = SkipLog()
    loader = Loader(ds, batch_size=4, seed=0, shuffle=False, drop_last=False, skip_log=log)
    for _ in range(2):
        batches = list(loader)
        assert sorted(indices(batches)) == [k for k in range(14) if k not in bad]
        assert batches[0].indices.tolist() == [4, 5, 6, 7]  # the all-bad first batch is dropped
        assert [len(b.indices) for b in batches] == [4, 3, 2]
    assert log.count == 5 and log.by_reason == {"empty file": 5}
    assert loader.attempted == 28 and loader.skipped == 10


def test_too_many_skips_fail_loudly(tmp_path):
    ds = file_dataset(tmp_path, 80, bad=tuple(range(10, 80)))
    with pytest.raises(DataError) as info:
        list(Loader(ds, batch_size=8, seed=0))
    text = str(info.value)
    assert "could not be decoded (first: " in text and "raise max_skip_fraction" in text
    assert "\n" not in text and ": empty file)" in text
    survivors = list(Loader(ds, batch_size=8, seed=0, max_skip_fraction=1.0, drop_last=False))
    assert sorted(indices(survivors)) == list(range(10))


def test_a_dead_source_among_good_ones_fails_by_its_own_fraction(tmp_path):
    """200 good images in one folder and 70 of 80 broken in another: 26% of the whole is broken
    (under max_skip_fraction 0.5), 88% of the second folder is; the error names that folder,
    also after a resume, since the per-source counts are in the loader state."""
    file_dataset(tmp_path / "good", 200)
    file_dataset(tmp_path / "dead", 80, bad=tuple(range(10, 80)))
    ds = open_dataset([str(tmp_path / "good"), str(tmp_path / "dead")], image_size=4)
    with pytest.raises(DataError) as info:
        list(Loader(ds, batch_size=8, seed=0))
    text = str(info.value)
    assert f"in {str(tmp_path / 'dead')!r} could not be decoded (first: " in text
    assert "of 2" not in text and "\n" not in text  # counts are the dead folder's, not all 280
    skipped, attempted = (int(w) for w in text.split(" images")[0].split(" of "))
    assert skipped > 0.5 * attempted and attempted >= 64
    resumed = Loader(ds, batch_size=8, seed=0)
    first = Loader(ds, batch_size=8, seed=0, max_skip_fraction=1.0)
    take(first, 15)  # 120 of 280 images; the other 160 hold < 64 of the dead folder's 80
    assert first.by_source[0][1] == 0 and first.by_source[1][1] == first.skipped > 0
    resumed.load_state_dict(first.state_dict())
    assert resumed.by_source == first.by_source
    with pytest.raises(DataError, match="dead"):
        list(resumed)
    whole = Loader(ds, batch_size=8, seed=0, max_skip_fraction=0.9)  # 88% < 90%: trains
    assert len(indices(list(whole))) + whole.skipped == 280 - 280 % 8


def test_skip_log_writes_each_key_once_atomically(tmp_path):
    log = SkipLog()
    log.add("a.jpg", "truncated")
    log.add("a.jpg", "truncated")
    log.add("odd\tname\n.png", "not an image")
    assert log.count == 2 and log.by_reason == {"truncated": 1, "not an image": 1}
    out = tmp_path / "run" / "skipped.tsv"
    log.write(out)
    log.write(out)
    assert out.read_text() == "a.jpg\ttruncated\nodd\\tname\\n.png\tnot an image\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["skipped.tsv"]


def test_endless_runs_epoch_after_epoch(tmp_path):
    ds = idx_dataset(tmp_path, 20)
    loader = Loader(ds, batch_size=8, seed=0, endless=True)
    batches = take(loader, 7)  # 2 per epoch
    assert loader.epoch == 3 and loader.position == 8
    assert sorted(indices(batches[:2])) == sorted(set(indices(batches[:2])))


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="no FMNIST")
def test_fashion_mnist_loader_is_fast():
    ds = open_dataset(["fmnist:train"], image_size=28)
    loader = Loader(ds, batch_size=256, seed=0, num_workers=2)  # in memory: workers unused
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch.indices)
    rate = count / (time.perf_counter() - start)
    assert count == 60000 // 256 * 256 and batch.images.shape == (256, 3, 28, 28)
    assert rate > 20_000, f"{rate:.0f} img/s"


@pytest.mark.parametrize("workers", [0, 2])
def test_whole_images_come_with_their_aspect_ratios(tmp_path, workers):
    """whole_images: each batch holds the pictures squashed to S x S and Batch.aspects their
    width / height (files of three shapes here, decoded in workers too); otherwise aspects None
    and the images are the centre squares; an IDX source is square (aspect 1)."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    shapes = {"wide": (30, 15), "tall": (10, 20), "square": (12, 12)}
    for k in range(12):
        name = list(shapes)[k % 3]
        Image.new("RGB", shapes[name], (k, 0, 0)).save(folder / f"{name}{k:02d}.png")
    ds = open_dataset([str(folder)], image_size=8)
    loader = Loader(ds, batch_size=4, seed=0, num_workers=workers, whole_images=True)
    seen = {}
    for batch in loader:
        assert batch.images.shape == (4, 3, 8, 8) and batch.aspects.dtype == torch.float32
        for i, a in zip(batch.indices.tolist(), batch.aspects.tolist(), strict=True):
            seen[os.path.basename(ds.key(i))[:-6]] = a
    assert seen == {name: w / h for name, (w, h) in shapes.items()}
    assert all(b.aspects is None for b in Loader(ds, batch_size=4, seed=0))
    idx = Loader(idx_dataset(tmp_path, 12), batch_size=4, seed=0, whole_images=True)
    assert all(b.aspects is None or bool((b.aspects == 1).all()) for b in idx)
