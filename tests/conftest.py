"""Shared fixtures: tiny image folders and tiny run configs that train in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FMNIST_DIR = Path(os.environ.get("WILDSIGHT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed"
)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: one intra-op thread is faster and immune to a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(
    folder: Path, count: int, size: int = 20, seed: int = 0, classes: int = 2
) -> list[Path]:
    """`count` random-texture RGB PNGs in `classes` sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / f"class{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(size // 4, size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
        path = sub / f"img{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 48)
    return folder


def tiny_tree(data: Path | str, out: Path, **train) -> dict:
    """A SwAV run small enough for a unit test: 16 px images, a 200MF RegNet, a 16-row queue."""
    return {
        "data": {"sources": [str(data)], "image_size": 16, "num_workers": 0},
        "backbone": {"name": "regnetx_200mf", "small_input": True},
        "method": {"name": "swav", "hidden_dims": [32], "out_dim": 16, "num_prototypes": 10,
                   "freeze_prototypes_steps": 2, "queue_length": 16},
        "views": {"groups": [{"count": 2, "size": 16, "scale": [0.3, 1.0]},
                             {"count": 2, "size": 8, "scale": [0.1, 0.3]}]},
        "optim": {"warmup_steps": 2, "lr": 0.3},
        "train": {"out": str(out), "steps": 6, "batch_size": 8, "checkpoint_every_steps": 3,
                  "progress": False, "log_every_steps": 1, **train},
    }  # fmt: skip


def tiny_cli_args(data: Path | str, out: Path, steps: int = 2) -> list[str]:
    """`wildsight pretrain` flags for the same tiny SwAV run as tiny_tree, from the command line."""
    return ["pretrain", "--data", str(data), "--image-size", "16", "--backbone", "regnetx_200mf",
            "--batch-size", "8", "--workers", "0", "--out", str(out), "--no-progress",
            "--steps", str(steps), "--set", "method.num_prototypes=10",
            "--set", "method.hidden_dims=[32]", "--set", "method.out_dim=16"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path: what a refused command must leave alone."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr, asserted to be one `wildsight: error: ...` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("wildsight: error: ") and "\n" not in err, err
    return err


def pretrained_tiny_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, steps: int = 1
) -> Path:
    """A `steps`-step tiny run on 16 fresh images (for module-scoped fixtures)."""
    from wildsight import api, config

    root = tmp_path_factory.mktemp(name)
    write_images(root / "train", 16)
    api.pretrain(config.load(tiny_tree(root / "train", root / "run", steps=steps)))
    return root / "run"
