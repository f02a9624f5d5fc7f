"""A tar shard cut short loses several images: each one is counted, named `<shard>[<n>]` and
weighed against max_skip_fraction when index.json says how many the shard held; without a
count, one line says "the rest of the shard, count unknown" and claims no number.

The expectation is computed from the member offsets of the shard before the cut, independently
of the reader: a sample is lost when one of its members does not end before the cut."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import pretrained_tiny_run, write_images
from wildsight.cli import main
from wildsight.data import DataError, Loader, SkipLog, open_dataset, write_shards
from wildsight.data.shards import REST_UNKNOWN, RawSample, is_picture, split_name
from wildsight.data.stream import SlotConfig, fresh_state, slot_items

SIZE, PER_SHARD, SHARDS = 8, 5, 3


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """15 labelled PNGs packed 5 per shard, with index.json."""
    write_images(tmp_path / "images", PER_SHARD * SHARDS, seed=3)
    write_shards([str(tmp_path / "images")], tmp_path / "shards", shard_size=PER_SHARD)
    return tmp_path / "shards"


def cut(shard: Path, where: str, sample: int) -> set[int]:
    """Cut `shard` in the data of sample `sample`'s picture or .json member, just before its
    first header, or to garbage -> the ordinals of samples not whole in the file any more (a
    member of theirs ends after the cut)."""
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()  # 3 per sample: picture, .json, .cls
    keys = list(dict.fromkeys(split_name(m.name)[0] for m in members))
    of = {m.name: keys.index(split_name(m.name)[0]) for m in members}
    ends = {n: max(m.offset_data + m.size for m in members if of[m.name] == n)
            for n in range(len(keys))}  # fmt: skip
    mine = [m for m in members if of[m.name] == sample]
    if where == "garbage":
        shard.write_bytes(b"\x00garbage" * 300)
        return set(ends)
    picture = next(m for m in mine if is_picture(split_name(m.name)[1]))
    meta = next(m for m in mine if m.name.endswith(".json"))
    at = {"picture": picture.offset_data + picture.size - 7, "json": meta.offset_data + 1,
          "boundary": min(m.offset for m in mine)}[where]  # fmt: skip
    shard.write_bytes(data[:at])
    return {n for n, end in ends.items() if end > at}


def all_keys(ds) -> set[str]:
    return {f"{path}[{n}]" for path, count in zip(ds.shards, ds.counts, strict=True)
            for n in range(count)}  # fmt: skip


@pytest.mark.parametrize(("where", "sample"), [("picture", 2), ("picture", 0), ("json", 1),
                                               ("boundary", 3), ("garbage", 0)])  # fmt: skip
def test_every_image_a_cut_shard_lost_is_counted_and_named(shards, where, sample):
    damaged = shards / "shard-000001.tar"
    lost = cut(damaged, where, sample)
    assert lost  # every cut here loses something
    ds = open_dataset([str(shards)], SIZE)
    log = SkipLog()
    loader = Loader(ds, batch_size=4, seed=0, shuffle=False, drop_last=False, skip_log=log,
                    max_skip_fraction=1.0)  # fmt: skip
    seen = [i for batch in loader for i in batch.indices.tolist()]
    assert set(log.reasons) == {f"{damaged}[{n}]" for n in sorted(lost)}
    assert log.count == len(lost) == PER_SHARD * SHARDS - len(seen)
    assert (loader.attempted, loader.skipped) == (PER_SHARD * SHARDS, len(lost))
    assert log.summary() == f"{len(lost)} image{'s' * (len(lost) != 1)}" and not log.uncounted
    assert {ds.key(i) for i in seen} | set(log.reasons) == all_keys(ds)  # each sample once
    assert all("damaged shard of 5 indexed samples" in r for r in log.reasons.values())


def test_a_cut_shard_counts_all_its_lost_images_against_max_skip_fraction(shards):
    """4 of 15 lost (0.27): over 0.25, under 0.3. Counted as one item it was 1 of 12."""
    lost = cut(shards / "shard-000000.tar", "picture", 1)
    assert len(lost) == 4
    for fraction, refused in ((0.25, True), (0.3, False)):
        loader = Loader(open_dataset([str(shards)], SIZE), batch_size=8, seed=0, shuffle=False,
                        drop_last=False, max_skip_fraction=1.0)  # fmt: skip
        list(loader)  # as api embed / eval: the whole pass first, then the rule
        loader.max_skip_fraction = fraction
        if refused:
            with pytest.raises(DataError, match="4 of 15 images"):
                loader.check_skip_fraction()
        else:
            loader.check_skip_fraction()


def test_without_index_the_rest_of_a_cut_shard_is_one_line_with_no_count(shards):
    (shards / "index.json").unlink()
    damaged = shards / "shard-000002.tar"
    cut(damaged, "picture", 3)
    (shards / "shard-000000.tar").write_bytes(b"\x00garbage" * 300)
    log = SkipLog()
    loader = Loader(open_dataset([str(shards)], SIZE), batch_size=4, seed=0, shuffle=False,
                    drop_last=False, skip_log=log, max_skip_fraction=1.0)  # fmt: skip
    seen = [i for batch in loader for i in batch.indices.tolist()]
    assert len(seen) == PER_SHARD + 3  # shard 1 whole, samples 0-2 of shard 2
    assert log.uncounted == list(log.reasons) == [str(shards / "shard-000000.tar"), str(damaged)]
    assert all(r.endswith(REST_UNKNOWN) for r in log.reasons.values())
    assert log.summary() == "the rest of 2 shards (count unknown)"  # no number is claimed
    log.add("some.png", "not a picture")
    assert log.summary() == "1 image and the rest of 2 shards (count unknown)"


def test_a_shard_longer_than_its_index_says_is_capped_with_no_count(shards):
    index = json.loads((shards / "index.json").read_text())
    index["shards"][0]["count"] = 3
    (shards / "index.json").write_text(json.dumps(index))
    log = SkipLog()
    ds = open_dataset([str(shards)], SIZE)
    seen = [i for b in Loader(ds, batch_size=4, seed=0, shuffle=False, drop_last=False,
                              skip_log=log) for i in b.indices.tolist()]  # fmt: skip
    assert len(seen) == 3 + PER_SHARD * 2
    assert log.uncounted == [str(shards / "shard-000000.tar")]
    assert (
        log.summary() == f"the rest of shard {str(shards / 'shard-000000.tar')!r} (count unknown)"
    )


def _item_id(item) -> tuple:
    return (item.shard, item.offset, item.problem) if isinstance(item, RawSample) else (item.key,)


def test_resume_in_the_middle_of_a_cut_shards_lost_samples_is_exact(shards):
    """The lost samples have stream positions of their own: resuming after any of them neither
    repeats one nor drops a later sample."""
    cut(shards / "shard-000001.tar", "picture", 1)
    ds = open_dataset([str(shards)], SIZE)
    cfg = SlotConfig(seed=4, shuffle=True, num_slots=1, block_size=4, endless=False)
    full = list(slot_items(ds, 0, cfg, fresh_state()))
    ids = [_item_id(item) for item, _ in full]
    assert len(ids) == len(set(ids)) == PER_SHARD * SHARDS
    assert sum(isinstance(item, RawSample) and bool(item.problem) for item, _ in full) == 4
    for k in range(len(full) - 1):
        resumed = [_item_id(item) for item, _ in slot_items(ds, 0, cfg, full[k][1])]
        assert resumed == ids[k + 1 :], k


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return pretrained_tiny_run(tmp_path_factory, "cut_counts")


def test_embed_warns_and_lists_each_image_a_cut_shard_lost(run, shards, tmp_path, capsys):
    damaged = shards / "shard-000001.tar"
    lost = cut(damaged, "picture", 2)  # the observed case: 3 lost
    out = tmp_path / "emb" / "f.npy"
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(run), "--data", str(shards), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {len(lost)} images could not be decoded" in err
    listed = [line.split("\t")[0] for line in Path(f"{out}.skipped.tsv").read_text().splitlines()]
    assert listed == [f"{damaged}[{n}]" for n in sorted(lost)]
    rows = Path(f"{out}.keys.txt").read_text().splitlines()
    assert np.load(out).shape[0] == len(rows) == PER_SHARD * SHARDS - len(lost)
    assert set(rows) | set(listed) == all_keys(open_dataset([str(shards)], SIZE))
