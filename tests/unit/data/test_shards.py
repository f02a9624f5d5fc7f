"""Tar shards: pack -> stream round trip, rank/worker splitting, exact resume, safety, damage.

Expectations come from outside the code under test: the test's own list of good files (sorted
as a folder walk sorts them), Pillow decoding the original bytes, the standard `tarfile`
module reading our shards, and brute-force unions over simulated ranks and workers.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildsight.cli import main as cli_main
from wildsight.data import (
    DataError,
    Loader,
    ShardDataset,
    SkipLog,
    decode_image,
    decode_resized,
    merge_states,
    open_dataset,
    write_shards,
)
from wildsight.data.shards import expand_braces, split_name
from wildsight.data.stream import SlotConfig, fresh_state, slot_items, slot_shards

SIZE = 8


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def messy_folder(root: Path, n: int = 19) -> tuple[list[Path], list[Path]]:
    """n good PNG/JPEG files in 2 class folders plus 4 broken ones -> (good sorted, bad)."""
    rng = np.random.default_rng(0)
    good = []
    for i in range(n):
        pixels = rng.integers(0, 256, (7 + i % 3, 9, 3), dtype=np.uint8)
        path = root / f"class{i % 2}" / f"img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.fromarray(pixels), "JPEG" if i % 4 == 0 else "PNG"))
        good.append(path)
    full = encode(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), "PNG")
    bad = {
        "class0/empty.png": b"",
        "class0/text.jpg": b"hello, not a picture",
        "class1/cut.png": full[: len(full) // 2],
        "class1/zz.webp": b"RIFF\x00\x00\x00\x00WEBP",
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    # the order a sorted folder walk gives: by relative path
    good.sort(key=lambda p: str(p.relative_to(root)))
    return good, [root / rel for rel in bad]


def all_batches(loader: Loader) -> list:
    return list(loader)


def indices(batches) -> list[int]:
    return [i for b in batches for i in b.indices.tolist()]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture
def packed(tmp_path):
    """A messy folder packed into shards of 3 (19 good -> 7 shards, the last one of 1)."""
    good, bad = messy_folder(tmp_path / "images")
    result = write_shards([str(tmp_path / "images")], tmp_path / "shards", shard_size=3)
    return tmp_path / "shards", good, bad, result


def test_pack_keeps_good_files_byte_for_byte_and_lists_bad_ones(packed):
    out, good, bad, result = packed
    assert result.total == len(good) == 19 and result.counts == [3] * 6 + [1]
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 19 and [s["count"] for s in index["shards"]] == result.counts
    assert index["classes"] == ["class0", "class1"]
    skipped = dict(line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines())
    assert set(skipped) == {str(p) for p in bad} and skipped[str(bad[0])] == "empty file"
    members: dict[str, bytes] = {}
    for name in result.shards:  # read back with the standard library, not our reader
        members |= tar_members(out / name)
    for n, path in enumerate(good):
        ext = path.suffix.lstrip(".")
        assert members[f"{n:09d}.{ext}"] == path.read_bytes()
        assert members[f"{n:09d}.cls"] == path.parent.name[-1].encode()
        assert json.loads(members[f"{n:09d}.json"])["source"] == str(path)
    assert sorted(p.name for p in out.iterdir()) == sorted([*result.shards, "index.json", "skipped.tsv"])  # fmt: skip


def test_stream_gives_every_good_image_once_per_epoch_with_its_pixels(packed):
    out, good, _, _ = packed
    ds = open_dataset([str(out)], image_size=SIZE)
    assert isinstance(ds, ShardDataset) and ds.num_images == 19
    loader = Loader(ds, batch_size=4, seed=3, drop_last=False, shuffle_block_size=5)
    epochs = [all_batches(loader) for _ in range(2)]
    for batches in epochs:
        assert sorted(indices(batches)) == list(range(19))
        for batch in batches:
            for image, i, label in zip(batch.images, batch.indices, batch.labels, strict=True):
                path = good[int(i)]
                expected = decode_resized(path.read_bytes(), key=str(path), size=SIZE)
                assert torch.equal(image, expected)
                assert int(label) == int(path.parent.name[-1])
    assert indices(epochs[0]) != indices(epochs[1])  # reshuffled per epoch
    assert loader.skipped == 0  # bad files never reached the shards


def test_reencoded_png_keeps_the_decoded_pixels(tmp_path):
    good, _ = messy_folder(tmp_path / "images", n=6)
    result = write_shards([str(tmp_path / "images")], tmp_path / "s", shard_size=4, reencode="png")
    members = tar_members(tmp_path / "s" / result.shards[0]) | tar_members(
        tmp_path / "s" / result.shards[1]
    )
    for n, path in enumerate(good):
        stored = np.asarray(Image.open(io.BytesIO(members[f"{n:09d}.png"])).convert("RGB"))
        assert np.array_equal(stored, decode_image(path.read_bytes(), key=str(path)))


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels)):  # fmt: skip
        header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes(), 1))


def test_idx_images_and_labels_survive_packing(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = (np.arange(10) * 7 % 10).astype(np.uint8)
    write_idx(tmp_path / "idx", images, labels)
    write_shards([str(tmp_path / "idx")], tmp_path / "s", shard_size=4)
    ds = open_dataset([str(tmp_path / "s")], image_size=28)
    batches = all_batches(Loader(ds, batch_size=3, seed=0, drop_last=False))
    for batch in batches:
        for image, i, label in zip(batch.images, batch.indices, batch.labels, strict=True):
            assert torch.equal(image, torch.from_numpy(images[int(i)]).expand(3, 28, 28))
            assert int(label) == labels[int(i)]
    assert sorted(indices(batches)) == list(range(10))


def test_shard_order_partitions_shards_over_slots():
    for num_shards, num_slots, epoch in itertools.product((1, 4, 7, 13), (1, 2, 3, 4), (0, 1)):
        if num_slots > num_shards:
            continue
        parts = [
            slot_shards(num_shards, num_slots, s, seed=5, epoch=epoch, shuffle=True)
            for s in range(num_slots)
        ]
        assert sorted(sum(parts, [])) == list(range(num_shards))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_ranks_two_workers_each_sample_once_per_epoch(packed):
    out, _, _, _ = packed  # 7 shards over 4 slots: slots read 2, 2, 2, 1 shards
    ds = open_dataset([str(out)], image_size=SIZE)
    seen: list[int] = []
    for rank in range(2):
        loader = Loader(
            ds, batch_size=2, seed=9, rank=rank, world_size=2, num_workers=2, drop_last=False,
            shuffle_block_size=4,
        )  # fmt: skip
        assert loader._stream is not None and loader._stream.workers == 2
        mine = indices(all_batches(loader))
        assert len(mine) == len(set(mine))
        seen += mine
    assert sorted(seen) == list(range(19))
    # the same split simulated in one process: slot = rank * 2 + worker
    cfg = SlotConfig(seed=9, shuffle=True, num_slots=4, block_size=4, endless=False)
    simulated = [
        ds.index(item.shard, item.offset)
        for slot in range(4)
        for item, _ in slot_items(ds, slot, cfg, fresh_state())
    ]
    assert sorted(simulated) == list(range(19))


def test_resume_continues_exactly_and_replays_nothing(packed, monkeypatch):
    out, _, _, _ = packed
    ds = open_dataset([str(out)], image_size=SIZE)

    def make(workers: int) -> Loader:
        return Loader(ds, batch_size=3, seed=4, endless=True, num_workers=workers, shuffle_block_size=4)  # fmt: skip

    decoded: list[str] = []
    original = ShardDataset.decode_with_aspect  # what the stream calls (whole=False: centre square)

    def counting(self, sample, **kw):
        decoded.append(sample.key)
        return original(self, sample, **kw)

    for workers in (0, 2):
        reference = list(itertools.islice(make(workers), 17))  # 51 samples: 2+ epochs
        first = make(workers)
        stream = iter(first)
        head = [next(stream) for _ in range(7)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make(workers)
        resumed.load_state_dict(state)
        decoded.clear()
        monkeypatch.setattr(ShardDataset, "decode_with_aspect", counting)
        tail = list(itertools.islice(resumed, 10))
        monkeypatch.setattr(ShardDataset, "decode_with_aspect", original)
        if workers == 0:  # (workers decode in their own processes, out of sight)
            assert len(decoded) == 30  # exactly the samples of the 10 batches: no replay
        for a, b in zip(head + tail, reference, strict=True):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


def test_ranks_resume_from_their_merged_states(packed):
    out, _, _, _ = packed
    ds = open_dataset([str(out)], image_size=SIZE)

    def rank(r: int) -> Loader:
        return Loader(ds, batch_size=2, seed=6, endless=True, rank=r, world_size=2, shuffle_block_size=3)  # fmt: skip

    reference = [list(itertools.islice(rank(r), 9)) for r in range(2)]
    first = [rank(r) for r in range(2)]
    heads = [list(itertools.islice(loader, 4)) for loader in first]
    merged = json.loads(json.dumps(merge_states([loader.state_dict() for loader in first])))
    assert sorted(merged["slots"]) == ["0", "1"]
    for r in range(2):
        resumed = rank(r)
        resumed.load_state_dict(merged)
        got = heads[r] + list(itertools.islice(resumed, 5))
        assert [b.indices.tolist() for b in got] == [b.indices.tolist() for b in reference[r]]
    alone = rank(0)
    alone.load_state_dict(first[0].state_dict())
    with pytest.raises(DataError, match="lacks slot 1"):
        rank(1).load_state_dict(first[0].state_dict())


def test_resume_on_another_layout_starts_the_next_epoch(packed):
    out, _, _, _ = packed
    ds = open_dataset([str(out)], image_size=SIZE)
    first = Loader(ds, batch_size=3, seed=4, endless=True, shuffle_block_size=4)
    next(iter(first))
    state = first.state_dict()
    two = Loader(ds, batch_size=3, seed=4, endless=True, world_size=2, shuffle_block_size=4)
    with pytest.warns(UserWarning, match="continuing at the start of epoch 1"):
        two.load_state_dict(state)
    assert two.state_dict()["slots"] == {"0": fresh_state(1)}
    with pytest.raises(DataError, match="seed"):
        Loader(ds, batch_size=3, seed=5).load_state_dict(state)


def test_member_names_never_touch_the_disk(tmp_path, monkeypatch):
    png = encode(Image.new("RGB", (5, 5), (10, 20, 30)), "PNG")
    target = tmp_path / "absolute-target"
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    shard = tmp_path / "evil" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in (
            ("../../escape.png", png),
            (f"{target}/abs.png", png),
            ("a/../../../up.png", png),
            ("x.pyd", pickle.dumps(Payload())),
            ("x.png", png),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    workdir = tmp_path / "deep" / "er"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    ds = open_dataset([str(shard)], image_size=4)
    log = SkipLog()
    batches = all_batches(Loader(ds, batch_size=8, seed=0, shuffle=False, drop_last=False, skip_log=log))  # fmt: skip
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not target.exists() and not marker.exists()
    assert len(indices(batches)) == 4  # the traversal names are plain keys of good samples
    assert torch.equal(batches[0].images[0], decode_resized(png, key="x", size=4))
    assert set(log.reasons.values()) == set()  # the .pyd member is never read: x.png is x's picture


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "garbage"])
def test_damaged_shard_is_named_and_skipped(packed, cut):
    out, _, _, result = packed
    damaged = out / result.shards[2]
    data = damaged.read_bytes()
    with tarfile.open(damaged) as tar:
        headers = [m.offset for m in tar.getmembers()]  # header offsets: 3 members per sample
    if cut == "mid_member":
        damaged.write_bytes(data[: headers[3] + 512 + 10])  # in the data of sample 1's image
        kept = 1
    elif cut == "member_boundary":
        damaged.write_bytes(data[: headers[6]])  # two whole samples, then nothing
        kept = 2
    else:
        damaged.write_bytes(b"\x00garbage" * 300)
        kept = 0
    ds = open_dataset([str(out)], image_size=SIZE)
    log = SkipLog()
    loader = Loader(ds, batch_size=4, seed=1, drop_last=False, skip_log=log, shuffle_block_size=4)
    seen = indices(all_batches(loader))
    lost = set(range(6, 9)) - set(range(6, 6 + kept))  # shard 2 holds samples 6, 7, 8
    assert sorted(seen) == sorted(set(range(19)) - lost)
    assert list(log.reasons) == [f"{damaged}[{n - 6}]" for n in sorted(lost)]  # each lost image
    for reason in log.reasons.values():
        assert (
            ("truncated" in reason) if cut == "member_boundary" else ("unreadable shard" in reason)
        )
        assert "\n" not in reason


def test_shard_specs_and_member_names():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == [f"{d}/{k}.tar" for d in "ab" for k in (8, 9, 10)]
    with pytest.raises(DataError, match="bad shard range"):
        expand_braces("s-{5..1}.tar")
    # WebDataset's rule: key = path up to the basename's first dot
    assert split_name("dir/x.y/img.seg.PNG") == ("dir/x.y/img", "seg.png")
    assert split_name("../../a.jpg") == ("../../a", "jpg") and split_name("README")[1] == ""


def test_bad_shard_specs_fail_in_one_line(tmp_path, packed):
    out, _, _, _ = packed
    with pytest.raises(DataError, match=r"1 of 8 shards .* are missing \(first: .*shard-000007"):
        open_dataset([str(out / "shard-{000000..000007}.tar")], image_size=SIZE)
    with pytest.raises(DataError, match="cannot be mixed"):
        open_dataset([str(out), str(out.parent / "images")], image_size=SIZE)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards([str(out.parent / "images")], out, shard_size=3)
    with pytest.raises(DataError, match="every rank needs one"):
        Loader(open_dataset([str(out / "shard-000000.tar")], SIZE), batch_size=1, seed=0, world_size=2)  # fmt: skip
    with pytest.raises(DataError, match="remote shards"):
        open_dataset(["https://host/s-{0..9}.tar"], image_size=SIZE)
    subset = open_dataset([str(out / "shard-{000000..000001}.tar")], SIZE)
    assert subset.num_images == 6  # counts from the folder's index.json
    os.remove(out / "index.json")
    with pytest.raises(DataError, match="epoch length is unknown"):
        len(Loader(open_dataset([str(out)], SIZE), batch_size=2, seed=0))
    with pytest.raises(DataError, match="no index.json: an earlier pack was cut short"):
        write_shards([str(out.parent / "images")], out, shard_size=3)


def test_sigterm_while_packing_leaves_whole_shards_only_and_restores_the_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler's SIGTERM in the middle of a shard: the shards already closed stay, the one
    being written is removed (no .tmp left), and the process's SIGTERM handler is restored."""
    import signal

    from wildsight.data import pack

    good, _ = messy_folder(tmp_path / "images")
    assert len(good) > 6
    real, calls = pack.prepare, []

    def prepare_then_term(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(pack, "prepare", prepare_then_term)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        write_shards([str(tmp_path / "images")], out, shard_size=2)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not list(out.glob(".*")) and not (out / "index.json").exists()
    for shard in out.glob("shard-*.tar"):  # each one complete
        with tarfile.open(shard) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == 2


def test_cli_packs_and_reports(tmp_path, capsys):
    messy_folder(tmp_path / "images", n=5)
    args = ["shards", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "s")]
    assert cli_main([*args, "--shard-size", "2", "--reencode", "jpeg"]) == 0
    text = capsys.readouterr().out
    assert "5 images in 3 shards" in text and "4 skipped" in text
    assert cli_main([*args, "--shard-size", "2"]) == 2
    assert "already holds shards" in capsys.readouterr().err
