"""MLP probe: it fits what no linear probe can (XOR), keeps the train-only selection, and
is a Linear -> BatchNorm -> ReLU -> Linear network."""

from __future__ import annotations

import torch
from torch import nn

from wildsight.eval import MLPProbe, fit_mlp, linear_probe, mlp_probe


def xor(n: int, *, seed: int, noise_dims: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs at (+-2, +-2); class = [sign(x0) != sign(x1)]: x float32 [n, 2 +
    noise_dims], y int64 [n]. Every line leaves two blobs of each class on the same side."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[2.0, 2.0], [-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0]])
    which = torch.randint(0, 4, (n,), generator=g)  # [n]
    signal = corners[which] + 0.5 * torch.randn(n, 2, generator=g)
    x = torch.cat([signal, torch.randn(n, noise_dims, generator=g)], dim=1)
    return x, (which >= 2).long()


def test_mlp_fits_xor_where_the_linear_probe_cannot() -> None:
    x, y = xor(800, seed=0)
    test_x, test_y = xor(400, seed=1)
    linear = linear_probe(x, y, test_x, test_y, l2_grid=(1e-4,))
    mlp = mlp_probe(x, y, test_x, test_y, hidden_dim=32, wd_grid=(1e-3,), epochs=25, batch_size=64)
    assert linear.top1 < 0.65  # a line gets at most about half of the four blobs right
    assert mlp.top1 > 0.97 and mlp.val_top1 > 0.97
    assert mlp.params["hidden_dim"] == 32 and "weight_decay" in mlp.params
    assert mlp.top1 == float((mlp.predictions == test_y).double().mean())


def test_mlp_probe_structure_and_eval_mode_prediction() -> None:
    model = MLPProbe(5, 7, 3)
    kinds = [type(m) for m in model.children()]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.Linear]
    assert model.hidden.bias is None  # BN's shift plays the bias
    x = torch.randn(10, 5)
    model.train()
    with torch.no_grad():
        expected = model.eval()(x).argmax(dim=1)  # running statistics
    model.train()
    assert torch.equal(model.predict(x), expected) and model.training


def test_fit_mlp_is_deterministic_in_its_seed() -> None:
    x, y = xor(200, seed=2)
    a = fit_mlp(x, y, num_classes=2, hidden_dim=8, epochs=2, batch_size=32, seed=3)
    b = fit_mlp(x, y, num_classes=2, hidden_dim=8, epochs=2, batch_size=32, seed=3)
    c = fit_mlp(x, y, num_classes=2, hidden_dim=8, epochs=2, batch_size=32, seed=4)
    assert torch.equal(a.out.weight, b.out.weight) and not torch.equal(a.out.weight, c.out.weight)


def test_mlp_choice_never_sees_the_test_set() -> None:
    x, y = xor(300, seed=5)
    test_x, test_y = xor(100, seed=6)
    kwargs = dict(hidden_dim=8, epochs=3, wd_grid=(0.5, 1e-4), batch_size=32)
    result = mlp_probe(x, y, test_x, test_y, **kwargs)
    scrambled = mlp_probe(x, y, torch.randn_like(test_x), 1 - test_y, **kwargs)
    assert (scrambled.params, scrambled.val_top1) == (result.params, result.val_top1)
