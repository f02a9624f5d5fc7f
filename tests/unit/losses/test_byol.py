"""BYOL's loss against its definition (Grill et al., 2020, eq. 2): the squared distance of the
L2-normalised prediction and target, computed row by row in float64."""

import math

import pytest
import torch

from wildsight.losses import byol_loss


def _rows(seed, b=6, d=5):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _squared_distance_of_unit_vectors(p, z):
    total = 0.0
    for u, v in zip(p.tolist(), z.tolist(), strict=True):
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(b * b for b in v))
        total += sum((a / nu - b / nv) ** 2 for a, b in zip(u, v, strict=True))
    return total / len(p)


def test_matches_the_squared_distance_of_normalised_vectors():
    p, z = _rows(0), _rows(1)
    loss = byol_loss(p, z)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_squared_distance_of_unit_vectors(p, z), rel=1e-12)


def test_closed_forms_same_opposite_orthogonal_and_scale_free():
    e = torch.eye(4, dtype=torch.float64)
    assert byol_loss(e, 5 * e).item() == pytest.approx(0.0, abs=1e-15)  # cos 1
    assert byol_loss(e, -2 * e).item() == pytest.approx(4.0, rel=1e-15)  # cos -1
    assert byol_loss(e, e.roll(1, dims=1)).item() == pytest.approx(2.0, rel=1e-15)  # cos 0


def test_gradient_reaches_the_prediction_only_when_the_target_is_detached():
    p, z = _rows(2).requires_grad_(), _rows(3).requires_grad_()
    byol_loss(p, z.detach()).backward()
    assert p.grad is not None and z.grad is None
    # d/dp (2 - 2 p.z/(|p||z|)) / B = -2/B (z/|z| - cos * p/|p|) / |p|, row by row
    pn, zn = p.detach().norm(dim=1, keepdim=True), z.detach().norm(dim=1, keepdim=True)
    cos = (p.detach() * z.detach()).sum(1, keepdim=True) / (pn * zn)
    expected = -2 / len(p) * (z.detach() / zn - cos * p.detach() / pn) / pn
    torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        byol_loss(_rows(0), _rows(1, d=4))
