"""Distributed helpers: no-ops in one process; 2 gloo processes == 1 process on the whole batch."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.train import distributed

WORLD, B, D = 2, 3, 5


def _batch() -> Tensor:
    """The global batch [WORLD*B, D], identical in every process."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, D, generator=gen, dtype=torch.float64)


def _rows_loss(queries: Tensor, keys: Tensor, offset: int) -> Tensor:
    """NT-Xent-like loss of the rows ``offset..offset+b`` of the global batch against it.

    queries: [b, D]; keys: [N, D]; row i's positive is row (i + N/2) mod N, itself excluded.
    The sum over disjoint row blocks is the loss of the whole batch.
    """
    n = keys.shape[0]
    q, k = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    sim = q @ k.T / 0.5  # [b, N]
    rows = torch.arange(offset, offset + q.shape[0])
    sim = sim.masked_fill(F.one_hot(rows, n).bool(), float("-inf"))
    positives = sim[torch.arange(q.shape[0]), (rows + n // 2) % n]
    return (torch.logsumexp(sim, dim=1) - positives).sum() + queries.square().sum()


def _worker(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_from_env("gloo")
    try:
        assert distributed.is_distributed()
        where = (distributed.rank(), distributed.world_size(), distributed.local_rank())
        assert where == (rank, WORLD, rank)

        t = torch.full((4,), float(rank + 1))
        assert distributed.all_reduce_sum_(t) is t
        assert torch.equal(t, torch.full((4,), 3.0))

        full = _batch()
        mine = slice(rank * B, (rank + 1) * B)
        reference = full.clone().requires_grad_(True)
        _rows_loss(reference, reference, 0).backward()

        # each rank computes its own rows' share of the global loss: the gradients it gets
        # back are exactly those of one process computing the whole loss
        local = full[mine].clone().requires_grad_(True)
        gathered = distributed.gather_with_grad(local)  # [WORLD*B, D]
        assert torch.equal(gathered.detach(), full)
        _rows_loss(local, gathered, rank * B).backward()
        assert local.grad is not None and reference.grad is not None
        torch.testing.assert_close(local.grad, reference.grad[mine], rtol=1e-12, atol=1e-12)

        # gradients are summed over ranks: if every rank computes the whole loss, x WORLD
        local = full[mine].clone().requires_grad_(True)
        gathered = distributed.gather_with_grad(local)
        _rows_loss(gathered, gathered, 0).backward()
        torch.testing.assert_close(local.grad, WORLD * reference.grad[mine], rtol=1e-12, atol=1e-12)
        distributed.barrier()
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_two_gloo_processes_match_one_process() -> None:
    context = mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=False)
    assert context is not None
    deadline = time.monotonic() + 60.0
    while not context.join(timeout=1.0):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("2-process gloo test did not finish in 60 s")


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init_from_env()
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.init_from_env()
    assert not distributed.is_distributed()
    t = torch.ones(3)
    assert distributed.all_reduce_sum_(t) is t and torch.equal(t, torch.ones(3))
    x = torch.randn(4, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    model = nn.Linear(2, 2)
    assert distributed.unwrap(model) is model
    # a real DDP needs a process group and ~4 s to build; unwrap only looks at the class
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = model
    assert distributed.unwrap(ddp) is model
    assert distributed.unwrap(nn.Sequential(model)) is not model  # only DDP is unwrapped
    distributed.barrier()
    distributed.shutdown()


def test_init_from_env_without_torchrun_variables_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    expected = (
        "WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset; launch with torchrun"
    )
    with pytest.raises(ValueError, match=expected):
        distributed.init_from_env()
