"""extract_features: equals a direct eval forward; mode restored; bf16; no inference tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wildsight.eval import extract_features


def to_float(batch: torch.Tensor) -> torch.Tensor:
    assert batch.dtype == torch.uint8  # the transform receives the raw uint8 batch
    return batch.float() / 255.0


def small_model() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm and Dropout make train mode and eval mode give different outputs.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(1),
        nn.Linear(4 * 6 * 6, 5),
    )


def images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def test_matches_a_direct_eval_forward_in_any_batch_size() -> None:
    model, x = small_model(), images(37)
    model.eval()
    with torch.no_grad():
        expected = model(to_float(x))  # [37, 5]
    model.train()
    for batch_size in (1, 10, 37, 512):
        got = extract_features(model, x, transform=to_float, batch_size=batch_size)
        assert got.shape == (37, 5) and got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, expected)
    assert model.training  # mode given back
    assert not got.is_inference() and not got.requires_grad


def test_eval_mode_restored_as_it_was_even_on_error() -> None:
    model = small_model().eval()
    extract_features(model, images(4), transform=to_float)
    assert not model.training
    model.train()

    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        extract_features(model, images(4), transform=broken)
    assert model.training


def test_bf16_runs_under_autocast_and_returns_float32() -> None:
    model, x = small_model().eval(), images(6)  # a plain callable is not switched to eval
    seen = []

    def spy(inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        seen.append(out.dtype)
        return out

    got = extract_features(spy, x, transform=to_float, precision="bf16")
    assert seen == [torch.bfloat16] and got.dtype == torch.float32
    ref = extract_features(model, x, transform=to_float)
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


def test_plain_callables_work() -> None:
    got = extract_features(lambda t: t.flatten(1)[:, :3], images(5), transform=to_float)
    torch.testing.assert_close(got, to_float(images(5)).flatten(1)[:, :3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=torch.zeros(2, 3, 8, 8)), "uint8 images"),
        (dict(images=torch.zeros(0, 3, 8, 8, dtype=torch.uint8)), "no images"),
        (dict(precision="fp16"), "unknown precision 'fp16'"),
        (dict(batch_size=0), "batch_size"),
        (dict(model=lambda t: t), r"features \[B, D\]"),
    ],
)
def test_rejects_bad_inputs(kwargs: dict, message: str) -> None:
    args = dict(model=small_model(), images=images(2), transform=to_float)
    with pytest.raises(ValueError, match=message):
        extract_features(**{**args, **kwargs})
