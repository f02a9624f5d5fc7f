"""Fine-tuning: the whole network learns a tiny labelled task; budget, schedule and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wildsight import config as config_lib
from wildsight.backbones import build_backbone
from wildsight.eval.finetune import (
    Classifier,
    FinetuneConfig,
    InputSpec,
    batch_indices,
    feature_dim,
    finetune,
)
from wildsight.eval.models import (
    build_encoder,
    head_layers_to_keep,
    load_classifier,
    save_classifier,
)
from wildsight.train.schedules import step_decay
from wildsight.train.trainer import resolve_config

SPEC = InputSpec(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FAST = FinetuneConfig(steps=60, batch_size=16, lr=0.4, precision="fp32", device="cpu")


def brightness_task(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes told apart by brightness (40, 120, 200 +- noise): any crop or flip keeps it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)  # [3n]
    level = 40.0 + 80.0 * labels.float()
    noise = torch.randn(len(labels), 1, 16, 16, generator=g) * 15
    images = (
        (level[:, None, None, None] + noise).clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    )
    return images.contiguous(), labels


def tiny_encoder() -> nn.Module:
    """Conv-BN-ReLU x 2, global average pool: images [B, 3, 16, 16] -> [B, 16]. (A RegNet would
    teach the same in ~10x the time; the backbones have their own contract tests.)"""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def small_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    encoder = tiny_encoder()
    return Classifier(encoder, feature_dim(encoder, SPEC), num_classes=3)


def test_finetune_beats_chance_and_changes_the_backbone() -> None:
    train_x, train_y = brightness_task(16, seed=0)
    test_x, test_y = brightness_task(20, seed=1)
    model = small_classifier()
    before = copy.deepcopy(model.encoder.state_dict())
    result = finetune(model, train_x, train_y, test_x, test_y, inputs=SPEC, cfg=FAST)
    assert result.top1 >= 0.9  # chance is 1/3
    assert result.num_train == 48 and result.num_test == 60 and result.steps == 60
    changed = [k for k, v in model.encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]  # fmt: skip
    assert set(before) - {"1.num_batches_tracked", "4.num_batches_tracked"} <= set(changed)
    assert result.predictions is not None and len(result.predictions) == 60


def test_the_classifier_sees_standardised_features_whatever_the_encoder_scale() -> None:
    """The parameter-free BN under the head: an encoder whose features are 50x larger (the SwAV
    demo model's pre-logits have ~25x the norm of a random init's) gives the same logits and the
    same head gradients, so one LR fits both; in eval mode the norm is the running statistics."""
    images, labels = brightness_task(8, seed=1)
    x = SPEC.eval(images)
    small = small_classifier(seed=3)
    large = copy.deepcopy(small)
    large.encoder = nn.Sequential(large.encoder, _Scale(50.0))
    grads = []
    for model in (small, large):
        model.train()
        logits = model(x)  # [24, 3]
        nn.functional.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), model.head.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)
    small.eval()
    with torch.no_grad():  # eval: (f - running_mean) / sqrt(running_var + eps), then the head
        f = small.encoder(x)
        expected = small.head(
            (f - small.norm.running_mean) / (small.norm.running_var + 1e-5).sqrt()
        )
        torch.testing.assert_close(small(x), expected)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_the_test_set_is_only_used_after_training() -> None:
    """Same seed, different test sets: bitwise the same trained weights (no test-set selection)."""
    train_x, train_y = brightness_task(8, seed=0)
    cfg = FinetuneConfig(steps=6, batch_size=8, precision="fp32", device="cpu", seed=3)
    weights = []
    for test_seed in (1, 2):
        test_x, test_y = brightness_task(4, seed=test_seed)
        model = small_classifier()
        finetune(model, train_x, train_y, test_x, test_y, inputs=SPEC, cfg=cfg)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bf16_autocast_on_cpu_trains() -> None:
    train_x, train_y = brightness_task(8, seed=0)
    cfg = FinetuneConfig(steps=3, batch_size=8, precision="bf16", device="cpu")
    result = finetune(small_classifier(), train_x, train_y, train_x, train_y, inputs=SPEC, cfg=cfg)
    assert 0.0 <= result.top1 <= 1.0 and result.last_loss == result.last_loss  # finite


def test_step_decay_is_seer_schedule() -> None:
    """SEER fine-tuning: LR 0.0125 for 30 of 35 epochs, then 0.00125."""
    lrs = [step_decay(e, base=0.0125, total_steps=35, milestones=(30 / 35,), factor=0.1)
           for e in range(35)]  # fmt: skip
    assert lrs[:30] == [0.0125] * 30
    assert lrs[30:] == pytest.approx([0.00125] * 5)
    two = [step_decay(s, base=1.0, total_steps=10, milestones=(0.5, 0.8), factor=0.5)
           for s in range(10)]  # fmt: skip
    assert two == [1.0] * 5 + [0.5] * 3 + [0.25] * 2


def test_lr_warms_up_linearly_then_follows_the_step_decay() -> None:
    """lr_at = linear ramp (step + 1) / W over W = warmup_fraction * T steps, times SEER's decay,
    times batch / 256; no warm-up = step_decay exactly."""
    cfg = FinetuneConfig(steps=20, batch_size=64, lr=0.4, warmup_fraction=0.2,
                         lr_decay_at=(0.5,), lr_decay_factor=0.1)  # fmt: skip
    base = 0.4 * 64 / 256
    got = [cfg.lr_at(s, 20) for s in range(20)]
    want = [base * min(1.0, (s + 1) / 4) * (0.1 if s >= 10 else 1.0) for s in range(20)]
    assert got == pytest.approx(want)
    assert got[3] == pytest.approx(base) and got[0] == pytest.approx(base / 4)
    flat = FinetuneConfig(steps=35, batch_size=256, lr=0.0125, warmup_fraction=0.0)
    assert [flat.lr_at(s, 35) for s in range(35)] == [
        step_decay(s, base=0.0125, total_steps=35, milestones=(30 / 35,), factor=0.1)
        for s in range(35)
    ]


def test_batches_cover_each_epoch_without_repeats() -> None:
    n, b = 50, 8  # 6 batches per epoch, 2 images left out of each epoch
    for epoch in range(3):
        steps = range(epoch * 6, epoch * 6 + 6)
        seen = torch.cat([batch_indices(n, b, seed=1, step=s) for s in steps])
        assert len(seen) == 48 and len(torch.unique(seen)) == 48
    assert torch.equal(batch_indices(n, b, 1, 7), batch_indices(n, b, 1, 7))
    assert len(batch_indices(5, 8, 0, 3)) == 5  # fewer images than a batch: all of them


def test_epochs_budget_counts_whole_batches() -> None:
    assert FinetuneConfig(steps=None, epochs=2, batch_size=64).total_steps(600) == 2 * (600 // 64)
    assert FinetuneConfig(steps=7).total_steps(600) == 7
    assert FinetuneConfig(steps=5, epochs=1.0, batch_size=10).total_steps(100) == 10  # epochs win


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": None}, "budget"),
        ({"epochs": -1.0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"crop_scale": (0.5, 1.5)}, "crop_scale"),
        ({"precision": "fp16"}, "precision"),
        ({"lr_decay_at": (1.2,)}, "lr_decay_at"),
        ({"flip_p": 2.0}, "flip_p"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
    ],  # fmt: skip
)
def test_bad_config_values_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        FinetuneConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_labels_are_refused() -> None:
    x, y = brightness_task(2, seed=0)
    model = small_classifier()
    with pytest.raises(ValueError, match="labels in \\[0, 3\\)"):
        finetune(model, x, y.clone().fill_(-1), x, y, inputs=SPEC, cfg=FAST)
    with pytest.raises(ValueError, match="labels of shape"):
        finetune(model, x, y[:3], x, y, inputs=SPEC, cfg=FAST)


def _simclr_config() -> config_lib.Config:
    tree = {"data": {"sources": ["fmnist:train"], "image_size": 16},
            "backbone": {"name": "regnetx_200mf", "small_input": True},
            "method": {"name": "simclr", "hidden_dim": 24, "out_dim": 8},
            "views": {"groups": [{"count": 2, "size": 16, "scale": [0.5, 1.0]}]},
            "train": {"steps": 1}}  # fmt: skip
    return resolve_config(config_lib.load(tree))


def test_simclr_v2_fine_tunes_from_the_first_projection_head_layer() -> None:
    """keep_head_layers=1: features = ReLU(BN(W h)) of the pretrained head's first layer."""
    from wildsight.methods import build_method

    cfg = _simclr_config()
    torch.manual_seed(0)
    pretrained = build_method(cfg.method, build_backbone("regnetx_200mf", small_input=True),
                              cfg.views)  # fmt: skip
    with torch.no_grad():  # non-trivial BN statistics, so a wrong layer would show
        pretrained.projector[1].running_mean.uniform_(-1, 1)
        pretrained.projector[1].running_var.uniform_(0.5, 2)
    state = pretrained.state_dict()
    encoder = build_encoder(cfg, build_backbone("regnetx_200mf", small_input=True), 1, state)
    assert feature_dim(encoder, SPEC) == 24
    x = SPEC.eval(brightness_task(2, seed=0)[0])
    pretrained.eval()
    encoder.eval()
    with torch.no_grad():
        linear, bn = pretrained.projector[0], pretrained.projector[1]
        expected = torch.relu(bn(linear(pretrained.backbone(x))))  # [B, 24]
        assert torch.allclose(encoder(x), expected, atol=1e-5)
    assert head_layers_to_keep(cfg, None) == 0  # the run's own setting
    assert build_encoder(cfg, pretrained.backbone, 0, None) is pretrained.backbone


def test_keep_head_layers_on_a_method_without_them_is_an_error() -> None:
    swav = resolve_config(config_lib.load({"method": {"name": "swav"}, "train": {"steps": 1},
                                           "data": {"image_size": 16}}))  # fmt: skip
    assert head_layers_to_keep(swav, None) == 0
    with pytest.raises(ValueError, match="no projection-head layers"):
        head_layers_to_keep(swav, 1)


def test_saved_classifier_loads_to_the_same_function(tmp_path) -> None:  # noqa: ANN001
    cfg = _simclr_config()
    torch.manual_seed(0)
    encoder = build_encoder(cfg, build_backbone("regnetx_200mf", small_input=True), 1, None)
    model = Classifier(encoder, feature_dim(encoder, SPEC), 3)
    nn.init.normal_(model.head.weight)
    spec = InputSpec.from_config(cfg)
    save_classifier(tmp_path / "ft", model,
                    {"config": config_lib.to_dict(cfg), "keep_head_layers": 1})  # fmt: skip
    loaded, loaded_spec, meta = load_classifier(tmp_path / "ft")
    assert loaded_spec == spec and meta["num_classes"] == 3
    x = spec.eval(brightness_task(2, seed=0)[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(FileNotFoundError, match="no fine-tuned classifier"):
        load_classifier(tmp_path / "nothing")


def test_a_kill_while_saving_never_pairs_old_metadata_with_new_weights(
    tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    """save_classifier writes model.safetensors and classifier.json; a kill between them leaves
    a folder load_classifier refuses (no classifier.json), not new weights under old metadata."""
    from wildsight.eval import models

    cfg = _simclr_config()
    meta = {"config": config_lib.to_dict(cfg), "keep_head_layers": 0}
    backbone = build_backbone("regnetx_200mf", small_input=True)
    save_classifier(tmp_path / "ft", Classifier(backbone, feature_dim(backbone, SPEC), 3), meta)
    wider = Classifier(backbone, feature_dim(backbone, SPEC), 5)  # another class count

    def killed(path, data):  # noqa: ANN001, ANN202 - the process dies before the metadata
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_classifier(tmp_path / "ft", wider, meta)
    with pytest.raises(FileNotFoundError, match="no classifier.json"):
        load_classifier(tmp_path / "ft")
    monkeypatch.undo()
    save_classifier(tmp_path / "ft", wider, meta)  # the same --save again: a whole classifier
    assert load_classifier(tmp_path / "ft")[2]["num_classes"] == 5
