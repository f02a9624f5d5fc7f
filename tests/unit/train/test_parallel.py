"""Parallel training pieces that need no second process: batch split, views by global position,
SyncBatchNorm's arithmetic, config refusals, and DDP's no-unused-parameter precondition."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from wildsight import config
from wildsight.methods import METHODS
from wildsight.train import parallel
from wildsight.train.syncbn import GroupSyncBatchNorm, convert_sync_batchnorm
from wildsight.views import default_views, make_views


def test_global_batch_must_split_over_processes_and_micro_batches():
    assert parallel.local_batch_size(16, 2) == 16  # one process: all of it, in 2 micro-batches
    with pytest.raises(config.ConfigError, match=r"train.batch_size 16 .* multiple of 3$"):
        parallel.local_batch_size(16, 3)


def test_views_of_some_rows_are_those_rows_of_the_whole_batch_views():
    """A rank's crops = its rows of the crops one process draws for the whole global batch."""
    spec = default_views(16, "swav")
    whole = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    full = make_views(whole, spec, torch.Generator().manual_seed(3))
    for rank in range(2):
        rows = torch.arange(4) * 2 + rank  # positions rank, rank + 2, ... of 2 ranks
        part = make_views(
            whole[rows], spec, torch.Generator().manual_seed(3), rows=rows, num_rows=8
        )
        assert len(part) == len(full)
        for a, b in zip(part, full, strict=True):
            torch.testing.assert_close(a, b[rows], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rows must be 2 indices in"):
        make_views(whole[:2], spec, torch.Generator(), rows=torch.tensor([0, 9]), num_rows=8)


@pytest.fixture
def group_of_one():
    """A real gloo process group of one process (no spawn), torn down after the test."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_matches_batchnorm_on_the_same_batch(group_of_one, momentum):
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5, momentum=momentum)
    nn.init.uniform_(reference.weight, 0.5, 1.5)
    nn.init.uniform_(reference.bias, -0.5, 0.5)
    synced = convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm2d(5, momentum=momentum)), group_of_one, torch.device("cpu")
    )[0]
    assert isinstance(synced, GroupSyncBatchNorm)
    synced.load_state_dict(reference.state_dict())
    for _ in range(2):  # running statistics accumulate over steps
        x = (torch.randn(6, 5, 4, 3) * 3 + 7).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        weights = torch.randn(6, 5, 4, 3)
        (reference(x) * weights).sum().backward()
        (synced(x2) * weights).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[name], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(synced.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    synced.eval()
    reference.eval()
    x = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(synced(x), reference(x))


def test_sync_batchnorm_conversion_keeps_parameters_and_state_dict_keys(group_of_one):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4, affine=False))
    weight, keys = model[1].weight, list(model.state_dict())
    convert_sync_batchnorm(model, group_of_one, torch.device("cpu"))
    assert isinstance(model[1], GroupSyncBatchNorm) and isinstance(model[2], GroupSyncBatchNorm)
    assert model[1].weight is weight  # an optimiser built before still updates it
    assert list(model.state_dict()) == keys  # checkpoints move between SyncBN and plain runs
    out = model[2](torch.randn(7, 4))  # no affine parameters
    torch.testing.assert_close(out.mean(0), torch.zeros(4), rtol=0, atol=1e-6)


def test_accumulation_refuses_swav_queue_in_one_line():
    cfg = config.load({"method": {"name": "swav", "queue_length": 64},
                       "train": {"steps": 1, "accumulate_steps": 2}})  # fmt: skip
    with pytest.raises(config.ConfigError, match="accumulate_steps > 1 with method.queue_length"):
        parallel.check_config(cfg)
    with pytest.raises(config.ConfigError, match="train.syncbn_group_size must be >= 0"):
        config.load({"train": {"syncbn_group_size": -1}})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_trainable_parameter_gets_a_gradient(name):
    """DDP runs with find_unused_parameters=False (no extra graph traversal per step); that is
    only valid if one step reaches every parameter that requires a gradient."""
    from tests.contract.test_methods import _method

    torch.manual_seed(0)
    method, spec = _method(name)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    views = make_views(images, spec, torch.Generator().manual_seed(0))
    method.before_step(5)
    method(views, 5).loss.backward()
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
