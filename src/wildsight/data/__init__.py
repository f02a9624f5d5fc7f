"""Images in, batches out: `open_dataset(specs, image_size)` and `Loader(dataset, ...)`.

Example::

    dataset = open_dataset(["fmnist:train"], image_size=28)
    loader = Loader(dataset, batch_size=256, seed=0, rank=rank, world_size=world_size)
    for batch in loader:  # Batch(images uint8 [B, 3, S, S], indices int64 [B], labels int64 [B])
        ...
    state = loader.state_dict()  # {"epoch": e, "position": p, ...}: resumes mid-epoch exactly
"""

from wildsight.data.decode import Skip, decode_image, decode_resized, read_file
from wildsight.data.loader import Batch, Loader, SkipLog, epoch_permutation
from wildsight.data.sources import DataError, ImageDataset, open_dataset

__all__ = [
    "Batch",
    "DataError",
    "ImageDataset",
    "Loader",
    "Skip",
    "SkipLog",
    "decode_image",
    "decode_resized",
    "epoch_permutation",
    "open_dataset",
    "read_file",
]
