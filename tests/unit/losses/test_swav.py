"""sinkhorn and swav_loss against independent float64 computations (tests/reference/swav_numpy.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.reference.swav_numpy import sinkhorn_reference, swav_loss_reference
from wildsight.losses import sinkhorn, swav_loss


def _cosine_scores(batch: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.t()  # [B, K] in [-1, 1]


@pytest.mark.parametrize("batch,prototypes,iterations", [(64, 10, 3), (32, 100, 10), (7, 3, 1)])
def test_sinkhorn_matches_float64_alternating_normalisation(batch, prototypes, iterations):
    scores = _cosine_scores(batch, prototypes)
    codes = sinkhorn(scores, epsilon=0.05, iterations=iterations)
    expected = sinkhorn_reference(scores.double().numpy(), 0.05, iterations)
    assert codes.dtype == torch.float32
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-6, rtol=1e-5)


def test_sinkhorn_marginals():
    batch, prototypes = 256, 16
    codes = sinkhorn(
        _cosine_scores(batch, prototypes, seed=1), epsilon=0.05, iterations=30
    ).double()
    # each sample's code sums to 1 (exactly: the last step normalises columns)
    torch.testing.assert_close(
        codes.sum(1), torch.ones(batch, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # each prototype receives about B/K of the batch (exact in the limit of many iterations)
    torch.testing.assert_close(
        codes.sum(0),
        torch.full((prototypes,), batch / prototypes, dtype=torch.float64),
        atol=1e-3,
        rtol=1e-3,
    )


def test_sinkhorn_is_float32_and_finite_under_low_precision_and_large_scores():
    # scores / epsilon reaches ~90: exp() of it overflows float32 (and fp16 long before) unless shifted
    scores = (_cosine_scores(64, 32) * 2.5).to(torch.bfloat16)
    assert float(scores.float().max()) / 0.02 > 88.7
    codes = sinkhorn(scores, epsilon=0.02, iterations=3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    expected = sinkhorn_reference(scores.double().numpy() - float(scores.double().max()), 0.02, 3)
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-5)


def test_sinkhorn_distributed_reductions_equal_one_big_batch():
    """Two 'processes' whose sums are exchanged give the codes of the concatenated batch."""
    scores = _cosine_scores(40, 12, seed=3)
    halves = [scores[:20], scores[20:]]
    whole = sinkhorn(scores, 0.05, 3)

    # two threads play the two processes; each reduction exchanges values at a barrier
    import threading

    barrier = threading.Barrier(2)
    box: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    results: dict[int, torch.Tensor] = {}

    def reducer(side: int, op):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            box[side].append(t.clone())
            barrier.wait()
            mine, theirs = box[side][-1], box[1 - side][-1]
            barrier.wait()
            t.copy_(op(mine, theirs))
            return t

        return reduce

    def worker(side: int):
        results[side] = sinkhorn(
            halves[side],
            0.05,
            3,
            all_reduce_sum=reducer(side, torch.add),
            all_reduce_max=reducer(side, torch.maximum),
        )

    threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat([results[0], results[1]]), whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_global,num_crops", [(2, 2), (2, 6), (1, 3)])
def test_swav_loss_matches_direct_swapped_cross_entropy(num_global, num_crops):
    scores = [_cosine_scores(24, 10, seed=10 + v) for v in range(num_crops)]
    loss = swav_loss(scores, num_global=num_global, temperature=0.1, epsilon=0.05, iterations=3)
    expected = swav_loss_reference([s.double().numpy() for s in scores], num_global, 0.1, 0.05, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_swav_loss_gradient_flows_only_through_predictions():
    scores = [_cosine_scores(16, 8, seed=v).requires_grad_(True) for v in range(2)]
    loss = swav_loss(scores, num_global=2)
    loss.backward()
    # analytic gradient of l(0,1)/2 wrt scores[1]: (softmax(s1/T) - q0) / (T * B * 2)
    q0 = torch.from_numpy(sinkhorn_reference(scores[0].detach().double().numpy(), 0.05, 3)).float()
    expected = (F.softmax(scores[1].detach() / 0.1, dim=1) - q0) / (0.1 * 16 * 2)
    torch.testing.assert_close(scores[1].grad, expected, atol=1e-5, rtol=1e-4)


def test_swav_loss_queue_joins_sinkhorn_only():
    scores = [_cosine_scores(8, 6, seed=v) for v in range(2)]
    queue = [_cosine_scores(32, 6, seed=20 + v) for v in range(2)]
    loss = swav_loss(scores, num_global=2, queue_scores=queue)
    # direct: codes of crop i = rows [:8] of sinkhorn over [batch; queue]
    total = 0.0
    for i in range(2):
        pool = torch.cat([scores[i], queue[i]]).double().numpy()
        codes = sinkhorn_reference(pool, 0.05, 3)[:8]
        log_p = F.log_softmax(scores[1 - i].double() / 0.1, dim=1).numpy()
        total += float(-(codes * log_p).sum(1).mean())
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_swav_loss_rejects_bad_crop_counts():
    with pytest.raises(ValueError, match="num_global"):
        swav_loss([_cosine_scores(4, 3)], num_global=1)
