"""2 gloo processes on the CPU train exactly as 1 process with the same global batch.

The expectation is computed independently: the same run in one process (plain BatchNorm, no
process group, no DDP). Equality to 1e-5 holds step after step because the two layouts see the
same images with the same crops (views are drawn per global-batch position, train/parallel.py),
SwAV's Sinkhorn and SimCLR's negatives span the global batch, and BatchNorm statistics are
synchronised over both processes (train.syncbn_group_size 2). The runs are chosen well
conditioned (full-resolution noise images, moderate LR): a 1e-7 change of the initial weights
moves no loss of these 10 steps by more than ~1e-6, so a 1e-5 gap is a real difference.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from wildsight import api, config
from wildsight.train import checkpoint

WORLD, STEPS, BATCH = 2, 10, 16
TOL = 1e-5
BACKBONE = "regnet:depth=2,w0=8,wa=8,wm=2,group_width=8"  # 4k parameters, BN after every conv
AUG = {"blur_p": 0.0, "grayscale_p": 0.0}
METHODS: dict[str, tuple[dict, list[dict], float]] = {  # method, crop groups, LR per 256
    "swav": (
        {"name": "swav", "hidden_dims": [16], "out_dim": 8, "num_prototypes": 10,
         "freeze_prototypes_steps": 2, "queue_length": 32},  # the queue is used from step 2
        [{"count": 2, "size": 16, "scale": [0.5, 1.0], "augment": AUG},
         {"count": 2, "size": 12, "scale": [0.3, 0.6], "augment": AUG}],
        0.3,
    ),
    "simclr": (
        {"name": "simclr", "head_layers": 2, "hidden_dim": 16, "out_dim": 8, "temperature": 0.5},
        [{"count": 2, "size": 16, "scale": [0.5, 1.0], "augment": AUG}],
        0.03,
    ),
    "byol": (
        {"name": "byol", "hidden_dim": 16, "out_dim": 8, "predictor_hidden_dim": 16,
         "tau_base": 0.99},
        [{"count": 1, "size": 16, "scale": [0.5, 1.0], "augment": AUG},
         {"count": 1, "size": 16, "scale": [0.5, 1.0], "augment": {**AUG, "solarize_p": 0.2}}],
        0.3,
    ),
}  # fmt: skip


def _tree(name: str, images: Path, out: Path, **train: Any) -> dict:
    method, groups, lr = METHODS[name]
    return {
        "data": {"sources": [str(images)], "image_size": 16, "num_workers": 0},
        "backbone": {"name": BACKBONE, "small_input": True},
        "method": method,
        "views": {"groups": groups},
        "optim": {"name": "sgd", "lr": lr, "warmup_steps": 2},
        "train": {"out": str(out), "steps": STEPS, "batch_size": BATCH, "precision": "fp32",
                  "checkpoint_every_steps": 5, "log_every_steps": 1, "progress": False,
                  "syncbn_group_size": WORLD, **train},
    }  # fmt: skip


def _noise_images(folder: Path, count: int = 64) -> Path:
    """Full-resolution RGB noise: no flat regions that would put many ReLU inputs at 0."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return folder


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["loss"]) for line in lines if line]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker(rank: int, port: int, jobs: list[tuple[dict, bool]]) -> None:
    """One of 2 processes, set up as torchrun sets them up; runs the jobs (tree, resume)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    for tree, resume in jobs:
        api.pretrain(config.load(tree), resume=resume)


def _spawn(jobs: list[tuple[dict, bool]], timeout_s: float = 240.0) -> None:
    context = mp.spawn(_worker, args=(_free_port(), jobs), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2-process gloo runs did not finish in {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All 2-process runs, once: SwAV through `torchrun -m wildsight pretrain`, the others in
    one spawn of 2 processes. One-process runs are made on demand by `one`."""
    root = tmp_path_factory.mktemp("distributed")
    images = _noise_images(root / "images")

    swav_cfg = root / "swav.yaml"
    swav_cfg.write_text(yaml.safe_dump(_tree("swav", images, root / "swav-2")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "wildsight", "pretrain", "--config", str(swav_cfg)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 10 steps") == WORLD, done.stdout

    fsdp = {"parallel": "fsdp", "steps": 2}  # then resumed to 4 steps, still sharded
    constant = {"name": "sgd", "lr": 0.3, "schedule": "constant"}  # LR independent of --steps
    fsdp_tree = _tree("swav", images, root / "swav-fsdp-2", **fsdp) | {"optim": constant}
    fsdp_more = _tree("swav", images, root / "swav-fsdp-2", **{**fsdp, "steps": 4})
    _spawn([
        (_tree("simclr", images, root / "simclr-2"), False),
        (_tree("byol", images, root / "byol-2"), False),
        # per-process BatchNorm: the negative control, and the reference for accumulation
        (_tree("swav", images, root / "swav-bn-2", steps=2, syncbn_group_size=0), False),
        (_tree("byol", images, root / "byol-bn-2", steps=4, syncbn_group_size=0), False),
        (fsdp_tree, False),
        (fsdp_more | {"optim": constant}, True),
    ])  # fmt: skip
    return {"root": root, "images": images, "one": {}}


def one(runs: dict[str, Any], name: str, **train: Any) -> Path:
    """A one-process run of `name` (cached per settings), in this test process."""
    key = (name, tuple(sorted(train.items())))
    if key not in runs["one"]:
        out = runs["root"] / f"one-{len(runs['one'])}"
        api.pretrain(config.load(_tree(name, runs["images"], out, **train)))
        runs["one"][key] = out
    path: Path = runs["one"][key]
    return path


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(runs, name):
    two = _losses(runs["root"] / f"{name}-2")
    single = _losses(one(runs, name))
    assert len(two) == len(single) == STEPS
    np.testing.assert_allclose(two, single, rtol=0, atol=TOL)
    assert max(single) - min(single) > 100 * TOL  # the runs trained: losses moved


def test_per_process_batchnorm_differs_so_equality_is_not_vacuous(runs):
    per_process = _losses(runs["root"] / "swav-bn-2")
    synced = _losses(one(runs, "swav"))[:2]
    assert abs(per_process[0] - synced[0]) > 100 * TOL  # BN over 8 images, not 16, from step 0


def test_a_checkpoint_of_two_processes_resumes_on_one(runs):
    """The torchrun SwAV run saved at steps 5 and 10; resume its step-5 checkpoint alone."""
    root = runs["root"]
    resumed = root / "swav-resumed"
    shutil.copytree(root / "swav-2", resumed)
    ckpts = resumed / "checkpoints"
    shutil.rmtree(ckpts / "ckpt-000000010")
    (ckpts / "latest").write_text("ckpt-000000005\n")
    metrics = (resumed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed / "metrics.jsonl").write_text("".join(metrics[:5]))

    result = api.pretrain(config.load(_tree("swav", runs["images"], resumed)), resume=True)
    assert result.steps == STEPS
    np.testing.assert_allclose(_losses(resumed), _losses(one(runs, "swav")), rtol=0, atol=TOL)
    a, b = _weights(resumed), _weights(root / "swav-2")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOL, msg=key)


def test_accumulating_two_micro_batches_equals_two_processes(runs):
    """Micro-batch i of one process holds global positions i, i + 2, ...: rank i's batch of a
    2-process run. With per-process BN and BYOL's per-image loss the runs are the same."""
    accumulated = _losses(one(runs, "byol", steps=4, syncbn_group_size=0, accumulate_steps=2))
    np.testing.assert_allclose(_losses(runs["root"] / "byol-bn-2"), accumulated, rtol=0, atol=TOL)


def test_fsdp_trains_like_one_process_and_resumes_sharded(runs):
    """FSDP (2 gloo processes, parameters sharded) for 2 steps, checkpointed (gathered), then
    resumed sharded to 4 steps: the losses of a straight 4-step one-process run."""
    constant = {"name": "sgd", "lr": 0.3, "schedule": "constant"}
    out = runs["root"] / "swav-fsdp-1"
    api.pretrain(config.load(_tree("swav", runs["images"], out, steps=4) | {"optim": constant}))
    sharded = _losses(runs["root"] / "swav-fsdp-2")
    assert len(sharded) == 4
    np.testing.assert_allclose(sharded, _losses(out), rtol=0, atol=TOL)
