"""Self-training (FixMatch after fine-tuning) end to end on a tiny task. The loss itself is checked
against its formula in tests/unit/losses/test_fixmatch.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.unit.eval.test_finetune import SPEC, brightness_task, small_classifier
from wildsight.eval import selftrain
from wildsight.eval.finetune import FinetuneConfig, finetune
from wildsight.eval.selftrain import SelfTrainConfig, self_train

START = FinetuneConfig(steps=4, batch_size=16, lr=0.4, precision="fp32", device="cpu")
TRAIN = dataclasses.replace(START, steps=30, batch_size=3)


def started(seed: int = 0):  # noqa: ANN201
    """A classifier fine-tuned briefly on one labelled image per class (67% on the test set)."""
    x, y = brightness_task(1, seed=seed)
    test_x, test_y = brightness_task(30, seed=20 + seed)
    model = small_classifier(seed)
    finetune(model, x, y, test_x, test_y, inputs=SPEC, cfg=dataclasses.replace(START, seed=seed))
    return model, x, y, test_x, test_y


def run(weight: float, threshold: float, **kwargs):  # noqa: ANN201
    model, x, y, test_x, test_y = started()
    unlabelled, _ = brightness_task(40, seed=10)  # labels dropped
    cfg = SelfTrainConfig(threshold=threshold, weight=weight, unlabelled_ratio=10,
                          strong_jitter=0.0, train=TRAIN, **kwargs)  # fmt: skip
    return self_train(model, x, y, unlabelled, test_x, test_y, inputs=SPEC, cfg=cfg), model


def test_reaches_the_task_from_a_weak_start_and_labels_most_unlabelled_images() -> None:
    result, _ = run(weight=1.0, threshold=0.7)
    assert result.top1_before < 0.9 and result.top1 >= 0.95  # chance is 1/3
    assert result.pseudo_label_rate_end >= 0.9 > result.pseudo_label_rate_start
    assert result.num_labelled == 3 and result.num_unlabelled == 120 and result.num_test == 90
    assert result.steps == 30 and result.params["threshold"] == 0.7


def test_a_threshold_no_image_passes_is_training_on_the_labels_alone() -> None:
    """threshold 1 masks every pseudo-label (softmax < 1 for finite logits): the same weights as
    weight 0, bit for bit; a reachable threshold changes them."""
    masked, masked_model = run(weight=1.0, threshold=1.0)
    alone, alone_model = run(weight=0.0, threshold=0.7)
    used, used_model = run(weight=1.0, threshold=0.0)
    assert masked.pseudo_label_rate_end == 0.0 and used.pseudo_label_rate_end == 1.0
    same = masked_model.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in alone_model.state_dict().items())
    assert not all(torch.equal(v, same[k]) for k, v in used_model.state_dict().items())


def test_the_returned_model_is_the_moving_average_of_the_weights_of_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ema_decay d: e_0 = w_0 (the fine-tuned weights), e_k = d e_(k-1) + (1 - d) w_k after each
    of the steps, computed here from snapshots of the trained weights; training itself is the
    same as without the average (same last weights and accuracy)."""
    snapshots: list[dict[str, torch.Tensor]] = []
    real_fit = selftrain.fit

    def recording_fit(model, batch_loss, **kwargs):  # noqa: ANN001, ANN202
        def loss(step: int):  # noqa: ANN202
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return batch_loss(step)

        stats = real_fit(model, loss, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return stats

    monkeypatch.setattr(selftrain, "fit", recording_fit)
    decay = 0.8
    averaged, model = run(weight=1.0, threshold=0.7, strong_cutout=0.3, ema_decay=decay)
    assert len(snapshots) == TRAIN.steps + 1
    expected = dict(snapshots[0])
    for weights in snapshots[1:]:
        expected = {k: decay * e + (1 - decay) * weights[k] if e.is_floating_point() else
                    weights[k] for k, e in expected.items()}  # fmt: skip
    got = model.state_dict()
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    snapshots.clear()
    plain, _ = run(weight=1.0, threshold=0.7, strong_cutout=0.3)
    assert plain.top1_last == plain.top1 == averaged.top1_last
    last = snapshots[-1]
    assert any(not torch.allclose(got[k], last[k]) for k in last if last[k].is_floating_point())


def test_bad_input() -> None:
    model, x, y, test_x, test_y = started()
    with pytest.raises(ValueError, match="one label per labelled image"):
        self_train(model, x, y[:2], x, test_x, test_y, inputs=SPEC)
    with pytest.raises(ValueError, match="uint8 unlabelled"):
        self_train(model, x, y, x.float(), test_x, test_y, inputs=SPEC)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": 1.5}, "threshold"), ({"unlabelled_ratio": 0}, "unlabelled_ratio"), ({"unlabelled_ratio": 2.0}, "unlabelled_ratio"),
     ({"weight": -1.0}, "weight"), ({"strong_crop_scale": (0.5, 0.2)}, "strong_crop_scale"),
     ({"strong_jitter": 1.0}, "strong_jitter"), ({"strong_cutout": 1.5}, "strong_cutout"),
     ({"ema_decay": 1.0}, "ema_decay")],
)  # fmt: skip
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelfTrainConfig(**kwargs)
