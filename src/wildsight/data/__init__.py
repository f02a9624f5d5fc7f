"""Images in, batches out: `open_dataset(specs, image_size)` and `Loader(dataset, ...)`.

Example::

    dataset = open_dataset(["fmnist:train"], image_size=28)
    loader = Loader(dataset, batch_size=256, seed=0, rank=rank, world_size=world_size)
    for batch in loader:  # Batch(images uint8 [B, 3, S, S], indices int64 [B], labels int64 [B])
        ...
    state = loader.state_dict()  # {"epoch": e, "position": p, ...}: resumes mid-epoch exactly

Tar shards: `write_shards(["fmnist:train"], "shards/", shard_size=1000)` packs any source;
`open_dataset(["shards/"], 28)` (or 'shards/shard-{000000..000059}.tar') streams them through
the same Loader, split over ranks and workers, with a per-slot position in `state_dict()`.
"""

from wildsight.data.decode import Skip, decode_image, decode_resized, read_file
from wildsight.data.loader import Batch, Loader, SkipLog, epoch_permutation
from wildsight.data.pack import PackResult, write_shards
from wildsight.data.shards import ShardDataset
from wildsight.data.sources import DataError, ImageDataset, open_dataset
from wildsight.data.stream import merge_states

__all__ = [
    "Batch",
    "DataError",
    "ImageDataset",
    "Loader",
    "PackResult",
    "ShardDataset",
    "Skip",
    "SkipLog",
    "decode_image",
    "decode_resized",
    "epoch_permutation",
    "merge_states",
    "open_dataset",
    "read_file",
    "write_shards",
]
