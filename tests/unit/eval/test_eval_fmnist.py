"""Probes on real Fashion-MNIST raw pixels land where the literature puts them.

Published: logistic regression on raw pixels ~84% (Xiao et al., 2017, benchmark table);
k-NN ~85%. To stay ~10 s of CPU the linear probe uses the first 10,000 training images and a
3-value grid (measured: 83.6% test; the full 60,000 with the default grid give 84.6%), and
k-NN scores the first 2,000 test images against all 60,000 training images (measured: 85.4%;
all 10,000 test images give 84.6%).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from wildsight.eval import knn_probe, linear_probe, linear_probe_sgd

ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
pytestmark = pytest.mark.skipif(
    not all((ROOT / f).exists() for f in FILES.values()),
    reason=f"Fashion-MNIST not installed in {ROOT} (apt-get install dataset-fashion-mnist)",
)


def read_idx(name: str) -> torch.Tensor:
    """IDX file: images float [N, 784] in [0, 1] (16-byte header), labels int64 [N] (8 bytes)."""
    raw = gzip.decompress((ROOT / name).read_bytes())
    if "images" in name:
        pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28 * 28)
        return torch.from_numpy(pixels.astype(np.float32) / 255.0)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64))


@pytest.fixture(scope="module")
def fmnist() -> dict[str, torch.Tensor]:
    data = {key: read_idx(name) for key, name in FILES.items()}
    assert data["train_x"].shape == (60_000, 784) and data["test_x"].shape == (10_000, 784)
    return data


def test_linear_probe_on_raw_pixels(fmnist: dict[str, torch.Tensor]) -> None:
    result = linear_probe(
        fmnist["train_x"][:10_000],
        fmnist["train_y"][:10_000],
        fmnist["test_x"],
        fmnist["test_y"],
        l2_grid=(1e-3, 1e-2, 1e-1),
        max_iter=100,
    )
    assert 0.82 <= result.top1 <= 0.87, result
    assert 0.80 <= result.val_top1 <= 0.90, result
    assert (result.num_train, result.num_test, result.feature_dim) == (10_000, 10_000, 784)


def test_knn_probe_on_raw_pixels(fmnist: dict[str, torch.Tensor]) -> None:
    result = knn_probe(
        fmnist["train_x"], fmnist["train_y"], fmnist["test_x"][:2000], fmnist["test_y"][:2000]
    )
    assert 0.83 <= result.top1 <= 0.88, result


def test_sgd_linear_probe_on_raw_pixels(fmnist: dict[str, torch.Tensor]) -> None:
    # The same objective as the L-BFGS probe, so the same published band (~84%); measured 83.2%
    # with the default (lr, l2) grid and 20 epochs on the first 10,000 images (~6 s).
    result = linear_probe_sgd(
        fmnist["train_x"][:10_000], fmnist["train_y"][:10_000], fmnist["test_x"], fmnist["test_y"]
    )
    assert 0.82 <= result.top1 <= 0.87, result
    assert 0.80 <= result.val_top1 <= 0.90, result
