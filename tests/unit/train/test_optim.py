"""LARS against a hand computation of SwAV's LARC(SGD, clip=False), and the parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wildsight.train.optim import LARS, OPTIMIZERS, build_optimizer, param_groups


def _norm(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs))


def _larc_reference(
    p: list[float], grads: list[list[float]], *, lr: float, m: float, wd: float, eta: float
) -> list[float]:
    """apex LARC (clip=False) + SGD momentum, in plain Python floats, one step per grad."""
    eps = 1e-8
    buf = [0.0] * len(p)
    for g in grads:
        p_norm, g_norm = _norm(p), _norm(g)
        if p_norm > 0 and g_norm > 0:
            ratio = eta * p_norm / (g_norm + wd * p_norm + eps)
            g = [(gi + wd * pi) * ratio for gi, pi in zip(g, p, strict=True)]
        buf = [m * bi + gi for bi, gi in zip(buf, g, strict=True)]
        p = [pi - lr * bi for pi, bi in zip(p, buf, strict=True)]
    return p


def _run(opt_param: nn.Parameter, opt: torch.optim.Optimizer, grads: list[list[float]]) -> None:
    for g in grads:
        opt_param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()


def test_lars_matches_hand_computation_float64() -> None:
    p0 = [0.5, -1.25, 2.0, 0.75]
    grads = [[0.1, 0.3, -0.2, 0.05], [-0.4, 0.1, 0.2, 0.3], [0.02, -0.01, 0.5, -0.3]]
    p = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = LARS([p], lr=9.6, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.001)
    _run(p, opt, grads)
    expected = _larc_reference(p0, grads, lr=9.6, m=0.9, wd=1e-2, eta=0.001)
    torch.testing.assert_close(
        p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert set(opt.state[p]) == {"momentum_buffer"}


def test_lars_one_step_closed_form() -> None:
    # p = (3, 4): ||p|| = 5; g = (0, 2): ||g|| = 2; wd = 0.1 -> denominator 2 + 0.5 (+eps)
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    p.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opt.step()
    ratio = 0.01 * 5.0 / (2.5 + 1e-8)
    update = torch.tensor([0.3, 2.4], dtype=torch.float64) * ratio  # g + wd * p = (0.3, 2.4)
    torch.testing.assert_close(
        p.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) - 2.0 * update, rtol=0, atol=1e-15
    )


def test_excluded_group_is_plain_sgd_momentum() -> None:
    torch.manual_seed(0)
    init = torch.randn(5, dtype=torch.float64)
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    lars = LARS(
        [{"params": [a], "weight_decay": 0.0, "lars_exclude": True}], lr=0.3, weight_decay=0.5
    )
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9, weight_decay=0.0)
    for _ in range(4):
        g = torch.randn(5, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-15)


def test_trust_ratio_makes_the_update_invariant_to_gradient_scale() -> None:
    torch.manual_seed(0)
    init, g = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt_a = LARS([a], lr=1.0, weight_decay=0.0, eps=0.0)  # eps only perturbs at ~1e-8/||g||
    opt_b = LARS([b], lr=1.0, weight_decay=0.0, eps=0.0)
    a.grad, b.grad = g.clone(), 10.0 * g
    opt_a.step()
    opt_b.step()
    assert not torch.equal(a.detach(), init)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=0)
    # the step length is eta * ||p|| * lr: LARS sets the relative change per layer
    step_len = torch.linalg.vector_norm(init - a.detach())
    torch.testing.assert_close(step_len, 0.001 * torch.linalg.vector_norm(init), rtol=1e-6, atol=0)


def test_zero_param_or_zero_grad_leave_the_gradient_unscaled() -> None:
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LARS([p], lr=0.5, momentum=0.0, weight_decay=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt.step()  # ||p|| = 0: plain SGD step, like LARC
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, 1.0, -0.25], dtype=torch.float64))
    q = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LARS([q], lr=0.5, weight_decay=0.1)
    q.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()  # ||g|| = 0: LARC adds no weight decay either
    assert torch.equal(q.detach(), torch.ones(3, dtype=torch.float64))


def _conv_bn_linear() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.GroupNorm(2, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 4, bias=False),
    )


def test_param_groups_excludes_exactly_the_1d_parameters() -> None:
    model = _conv_bn_linear()
    groups = param_groups(model, 1e-5)
    by_name = {g["name"]: g for g in groups}
    decay, no_decay = by_name["decay"], by_name["no_decay"]
    assert decay["weight_decay"] == 1e-5 and decay["lars_exclude"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    expected_excluded = {id(p) for p in model.parameters() if p.ndim == 1}
    assert {id(p) for p in no_decay["params"]} == expected_excluded
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    names = sorted(n for n, p in model.named_parameters() if p.ndim == 1)
    # conv bias, BatchNorm, GroupNorm, linear bias, LayerNorm; the bias-free layers add none
    assert names == [
        "0.bias",
        "1.bias",
        "1.weight",
        "4.bias",
        "4.weight",
        "7.bias",
        "8.bias",
        "8.weight",
    ]


def test_param_groups_single_group_and_frozen_params() -> None:
    model = _conv_bn_linear()
    model[0].weight.requires_grad_(False)
    (group,) = param_groups(model, 0.1, exclude_bias_and_norm=False)
    assert group["lars_exclude"] is False and group["weight_decay"] == 0.1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]


def test_param_groups_give_a_scaled_submodule_groups_of_its_own() -> None:
    model = _conv_bn_linear()  # "7" is Linear(8, 16) with a bias, "9" the bias-free last layer
    groups = param_groups(model, 1e-4, lr_scales={"7": 10.0, "9": 0.5})
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["decay", "decay@7", "decay@9", "no_decay", "no_decay@7"]
    assert [id(p) for p in by_name["decay@7"]["params"]] == [id(model[7].weight)]
    assert [id(p) for p in by_name["no_decay@7"]["params"]] == [id(model[7].bias)]
    assert [id(p) for p in by_name["decay@9"]["params"]] == [id(model[9].weight)]
    assert by_name["no_decay@7"]["weight_decay"] == 0.0
    assert by_name["decay@7"]["weight_decay"] == 1e-4
    scales = {name: g["lr_scale"] for name, g in by_name.items()}
    assert scales == {"decay": 1.0, "no_decay": 1.0, "decay@7": 10.0, "no_decay@7": 10.0,
                      "decay@9": 0.5}  # fmt: skip
    every = [id(p) for g in groups for p in g["params"]]  # each parameter exactly once
    assert sorted(every) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ValueError, match="'head', which is not a submodule"):
        param_groups(model, 1e-4, lr_scales={"head": 2.0})
    with pytest.raises(ValueError, match=r"lr_scales\['7'\] must be > 0"):
        param_groups(model, 1e-4, lr_scales={"7": 0.0})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_build_optimizer_steps(name: str) -> None:
    torch.manual_seed(0)
    model = _conv_bn_linear()
    opt = build_optimizer(name, param_groups(model, 1e-4), lr=0.1, momentum=0.9, weight_decay=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_build_optimizer_unknown_name_lists_choices() -> None:
    expected = r"^unknown optimizer 'lamb'; choose from \['adamw', 'lars', 'sgd'\]$"
    with pytest.raises(ValueError, match=expected):
        build_optimizer("lamb", [], lr=0.1, momentum=0.9, weight_decay=0.0)


def test_lars_norm_of_sum_is_simclr_and_byol_form() -> None:
    """SimCLR's / BYOL's LARS adds the weight decay first and divides by the norm of the sum:
    p = (3, 4), g = (-0.4, 0.3) is perpendicular to p with ||g|| = wd ||p|| = 0.5, where the two
    forms differ most: ||g + wd p|| = sqrt(0.5) * (||g|| + wd ||p||)."""
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01,
               trust_norm="norm_of_sum")  # fmt: skip
    p.grad = torch.tensor([-0.4, 0.3], dtype=torch.float64)
    opt.step()
    d = [-0.4 + 0.3, 0.3 + 0.4]  # g + wd * p
    ratio = 0.01 * 5.0 / _norm(d)
    expected = [3.0 - 2.0 * d[0] * ratio, 4.0 - 2.0 * d[1] * ratio]
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-15)  # fmt: skip
    larc = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    other = LARS([larc], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    larc.grad = torch.tensor([-0.4, 0.3], dtype=torch.float64)
    other.step()
    moved = _norm([a - b for a, b in zip(expected, [3.0, 4.0], strict=True)])
    moved_larc = _norm([a - b for a, b in zip(larc.detach().tolist(), [3.0, 4.0], strict=True)])
    assert moved_larc / moved == pytest.approx(math.sqrt(0.5), rel=1e-6)
    with pytest.raises(ValueError, match="trust_norm"):
        LARS([p], lr=1.0, trust_norm="l1")


def test_momentum_of_updates_keeps_each_steps_lr_in_the_buffer() -> None:
    """SimCLR's TF LARS sums LR-scaled updates: v <- m v + lr_t u_t, p <- p - v. With a
    warming-up LR this differs from torch's p <- p - lr_t (m b + u_t) (BYOL's form too)."""
    p0, grads, lrs = [3.0, 4.0], [[0.5, -0.2], [0.1, 0.3]], [0.5, 2.0]
    m, wd, eta = 0.9, 0.1, 0.01

    def scaled(p: list[float], g: list[float]) -> list[float]:  # norm_of_sum trust ratio
        d = [gi + wd * pi for gi, pi in zip(g, p, strict=True)]
        ratio = eta * _norm(p) / _norm(d)
        return [di * ratio for di in d]

    p, v = list(p0), [0.0, 0.0]
    for g, lr in zip(grads, lrs, strict=True):  # the reference, in plain floats
        u = scaled(p, g)
        v = [m * vi + lr * ui for vi, ui in zip(v, u, strict=True)]
        p = [pi - vi for pi, vi in zip(p, v, strict=True)]
    param = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = LARS([param], lr=lrs[0], momentum=m, weight_decay=wd, trust_coefficient=eta,
               trust_norm="norm_of_sum", momentum_of="update")  # fmt: skip
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor(p, dtype=torch.float64),
                               rtol=0, atol=1e-15)  # fmt: skip
    torchlike = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    other = LARS([torchlike], lr=lrs[0], momentum=m, weight_decay=wd, trust_coefficient=eta,
                 trust_norm="norm_of_sum")  # fmt: skip
    for g, lr in zip(grads, lrs, strict=True):
        other.param_groups[0]["lr"] = lr
        torchlike.grad = torch.tensor(g, dtype=torch.float64)
        other.step()
    assert not torch.allclose(torchlike, param)  # the LR rose: the two forms differ
    with pytest.raises(ValueError, match="momentum_of"):
        LARS([param], lr=1.0, momentum_of="both")
