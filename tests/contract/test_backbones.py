"""Every backbone in BACKBONES keeps the contract the rest of wildsight is written against.

For each name, with small_input=True at 32 px: forward gives [B, feature_dim]; forward_stages
gives [B, C_i] per stage and its last element equals forward; gradients are finite; activation
checkpointing changes nothing (outputs, gradients and BN running stats are bitwise equal); the
analytic complexity matches the built model. Models too big to run quickly on a shared 2-core
CPU (> 25M params or > 1.5 GMACs at 32 px; every code path still runs in a smaller sibling) are
only built and shape-checked on the meta device.
"""

from __future__ import annotations

import copy

import pytest
import torch

from wildsight.backbones import BACKBONES, Backbone, build_backbone, count_params

BATCH, SIZE = 2, 32
MAX_PARAMS, MAX_MACS = 25e6, 1.5e9  # above either: meta device only


def _check_shapes(model: Backbone, y: torch.Tensor, stages: list[torch.Tensor]) -> None:
    assert y.shape == (BATCH, model.feature_dim)
    assert [tuple(s.shape) for s in stages] == [(BATCH, c) for c in model.stage_dims]
    assert model.stage_dims[-1] == model.feature_dim


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_contract(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name, small_input=True)
    cx = model.complexity(SIZE)
    assert count_params(model) == cx.params
    if cx.params > MAX_PARAMS or cx.flops > MAX_MACS:
        x = torch.empty(BATCH, 3, SIZE, SIZE, device="meta")
        stages = model.forward_stages(x)
        _check_shapes(model, stages[-1], stages)
        return

    torch.manual_seed(0)
    model = build_backbone(name, small_input=True)
    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(True)
    x = torch.randn(BATCH, 3, SIZE, SIZE)

    y = model(x)
    y.square().mean().backward()
    y_ckpt = twin(x)
    y_ckpt.square().mean().backward()

    assert torch.equal(y, y_ckpt)
    for (key, p), p_ckpt in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, p_ckpt.grad), key
    for (key, b), b_ckpt in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, b_ckpt), key  # recomputation does not update BN stats twice

    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)

    with torch.no_grad():
        stages = model.forward_stages(x)
    _check_shapes(model, y, stages)
    assert torch.isfinite(y).all()
    assert torch.equal(stages[-1], y.detach())  # train-mode BN: batch statistics, same output


def test_checkpointing_is_off_by_default_and_skipped_without_grad() -> None:
    model = build_backbone("regnetx_200mf", small_input=True)
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing()
    with torch.no_grad():
        assert model(torch.randn(BATCH, 3, SIZE, SIZE)).shape == (BATCH, 368)


def test_unknown_name_is_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown backbone 'regnety_401mf'; did you mean 'regnety_400mf'\?"
    ):
        build_backbone("regnety_401mf")
