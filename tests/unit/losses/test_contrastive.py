"""NT-Xent against an explicit double loop over pairs (float64), a closed form, and a simulated
2-process run: the gathered loss and its gradients equal one process on the whole batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from wildsight.losses import nt_xent_loss

N, D, T = 5, 7, 0.3


def _pair(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, D, generator=gen, dtype=torch.float64),
        torch.randn(n, D, generator=gen, dtype=torch.float64),
    )


def _loop_loss(z1, z2, temperature, bank=()):
    """SimCLR eq. 1 pair by pair with Python floats: views 0..N-1 = z1, N..2N-1 = z2."""
    views = [list(map(float, v)) for v in torch.cat([z1, z2]).detach()]
    bank = [list(map(float, v)) for v in bank]
    n = len(views) // 2

    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    total = 0.0
    for i, anchor in enumerate(views):
        twin = (i + n) % (2 * n)
        denominator = 0.0
        for k, other in enumerate(views + bank):
            if k != i:
                denominator += math.exp(cos(anchor, other) / temperature)
        total += -math.log(math.exp(cos(anchor, views[twin]) / temperature) / denominator)
    return total / (2 * n)


def test_matches_an_explicit_double_loop_over_pairs():
    z1, z2 = _pair()
    for temperature in (0.1, T, 1.0):
        loss = nt_xent_loss(z1, z2, temperature)
        assert loss.dtype == torch.float64
        assert loss.item() == pytest.approx(_loop_loss(z1, z2, temperature), rel=1e-12)


def test_closed_form_for_orthonormal_images():
    # both views of image n are e_n: each anchor has cos 1 with its twin and 0 with the other
    # 2N - 2 views, so l = log(1 + (2N - 2) exp(-1 / t)) for every anchor
    z = torch.eye(N, D, dtype=torch.float64) * 3.0  # the scale must not matter
    expected = math.log(1 + (2 * N - 2) * math.exp(-1 / T))
    assert nt_xent_loss(z, z, T).item() == pytest.approx(expected, rel=1e-12)


def test_gathered_loss_over_two_ranks_equals_one_process_on_the_whole_batch():
    world, n = 2, 3
    full1, full2 = _pair(world * n, seed=1)
    reference1, reference2 = full1.clone().requires_grad_(), full2.clone().requires_grad_()
    nt_xent_loss(reference1, reference2, T).backward()

    # simulate W processes in one: rank r holds rows r*n..(r+1)*n of each view. Its gather
    # returns every rank's [z1_r; z2_r] in rank order, differentiable w.r.t. all of them, so
    # backward sums every rank's gradient into each slice exactly as gather_with_grad does.
    a1, a2 = full1.clone().requires_grad_(), full2.clone().requires_grad_()
    slices = [slice(r * n, (r + 1) * n) for r in range(world)]
    losses = []
    for rank in range(world):

        def gather(local, rank=rank):
            parts = [torch.cat([a1[s], a2[s]]) for s in slices]
            expected = F.normalize(parts[rank], dim=1)
            torch.testing.assert_close(local, expected)  # the loss gathers normalised [z1; z2]
            parts = [F.normalize(p, dim=1) for p in parts]
            parts[rank] = local
            return torch.cat(parts)

        losses.append(nt_xent_loss(a1[slices[rank]], a2[slices[rank]], T, gather=gather, rank=rank))
    # DDP averages parameter gradients over ranks: the objective is the mean of the local losses
    global_loss = torch.stack(losses).mean()
    torch.testing.assert_close(global_loss, nt_xent_loss(full1, full2, T), rtol=1e-12, atol=0)
    global_loss.backward()
    torch.testing.assert_close(a1.grad, reference1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a2.grad, reference2.grad, rtol=1e-10, atol=1e-12)


def test_memory_bank_negatives_join_every_denominator_without_gradient():
    z1, z2 = (z.requires_grad_() for z in _pair())
    bank = torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bank.requires_grad_()
    loss = nt_xent_loss(z1, z2, T, negatives=bank)
    assert loss.item() == pytest.approx(_loop_loss(z1, z2, T, bank.detach()), rel=1e-12)
    assert loss.item() > nt_xent_loss(z1, z2, T).item()  # more negatives, larger loss
    loss.backward()
    assert bank.grad is None and z1.grad is not None  # the memory is a constant, as MoCo's queue
    z1, z2 = z1.detach(), z2.detach()
    empty = torch.zeros(0, D, dtype=torch.float64)
    assert nt_xent_loss(z1, z2, T, negatives=empty).item() == pytest.approx(
        nt_xent_loss(z1, z2, T).item(), rel=1e-15
    )


def test_logits_stay_float32_under_bf16_autocast():
    z1, z2 = (z.float() for z in _pair(64))
    reference = nt_xent_loss(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent_loss(z1, z2, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_refused_in_one_line():
    z1, z2 = _pair()
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z1, z2[:-1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent_loss(z1, z2, 0.0)
    with pytest.raises(ValueError, match=r"negatives must be \[M, 7\]"):
        nt_xent_loss(z1, z2, negatives=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same batch size"):
        nt_xent_loss(z1, z2, gather=lambda t: torch.cat([t, t[:-1]]), rank=1)
