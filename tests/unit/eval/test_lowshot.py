"""Label subsets for low-shot evaluation: class-balanced, exact size, fixed by the seed, nested.

Expectations are computed independently: class counts by a plain round-robin loop, sizes by
round(fraction * N), inclusion frequencies by the binomial law.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from wildsight.eval.lowshot import (
    LowshotRow,
    class_balanced_subset,
    label_order,
    run_lowshot,
    subset_size,
    summarize,
)


def shuffled_labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Labels with counts[c] images of class c, in a random order."""
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return torch.from_numpy(np.random.default_rng(seed).permutation(y))


def round_robin_counts(counts: list[int], n: int) -> list[int]:
    """Reference: hand out n labels one at a time, cycling over the classes that still have images.

    Which classes get the remainder depends on the cycling order, so the result is compared as a
    sorted multiset of counts for the classes that are not exhausted."""
    taken = [0] * len(counts)
    c = 0
    for _ in range(n):
        while taken[c] >= counts[c]:
            c = (c + 1) % len(counts)
        taken[c] += 1
        c = (c + 1) % len(counts)
    return taken


@pytest.mark.parametrize("fraction", [0.01, 0.013, 0.1, 0.37, 1.0])
def test_subset_is_class_balanced_and_exactly_the_requested_size(fraction: float) -> None:
    labels = shuffled_labels([100] * 10)  # N = 1000
    idx = class_balanced_subset(labels, fraction, seed=0)
    assert len(idx) == round(fraction * 1000)
    assert len(torch.unique(idx)) == len(idx)  # no image twice
    per_class = torch.bincount(labels[idx], minlength=10)
    assert int(per_class.max() - per_class.min()) <= 1
    assert sorted(per_class.tolist()) == sorted(round_robin_counts([100] * 10, len(idx)))


def test_imbalanced_classes_fill_up_like_water() -> None:
    """Water-filling: with the level L = max{L : sum_c min(n_c, L) <= n}, a class of n_c <= L
    images is taken whole and every other class gets L or L + 1 images."""
    counts = [3, 50, 20, 80, 7]
    labels = shuffled_labels(counts, seed=1)
    for n in (5, 12, 16, 40, 100, 160):
        idx = class_balanced_subset(labels, n / len(labels), seed=4)
        got = torch.bincount(labels[idx], minlength=len(counts)).tolist()
        level = max(lv for lv in range(max(counts) + 1) if sum(min(k, lv) for k in counts) <= n)
        assert sum(got) == n
        for g, k in zip(got, counts, strict=True):
            assert g == k if k <= level else g in (level, level + 1)


def test_same_seed_same_subset_whatever_the_global_rng_or_label_dtype() -> None:
    labels = shuffled_labels([60] * 10)
    torch.manual_seed(1)
    np.random.seed(1)
    first = class_balanced_subset(labels, 0.1, seed=3)
    torch.manual_seed(99)
    np.random.seed(99)
    torch.rand(1000)  # consume the global streams: the subset must not care
    second = class_balanced_subset(labels.to(torch.int32), 0.1, seed=3)
    assert torch.equal(first, second)


def test_other_seeds_give_other_subsets() -> None:
    labels = shuffled_labels([60] * 10)
    subsets = [set(class_balanced_subset(labels, 0.1, seed=s).tolist()) for s in range(5)]
    for a in range(5):
        for b in range(a + 1, 5):
            assert subsets[a] != subsets[b]
            # 60 of 600 drawn twice at random overlap in ~6 images, far from all 60
            assert len(subsets[a] & subsets[b]) < 30


def test_subsets_of_one_seed_are_nested() -> None:
    """Documented choice: for one seed, a larger fraction adds images, it never swaps them."""
    labels = shuffled_labels([600] * 10)
    small = set(class_balanced_subset(labels, 0.01, seed=2).tolist())
    large = set(class_balanced_subset(labels, 0.1, seed=2).tolist())
    assert small < large
    order = label_order(labels, seed=2)
    assert sorted(order.tolist()) == list(range(len(labels)))  # a ranking of every image


def test_every_image_of_a_class_is_equally_likely() -> None:
    """Over 400 seeds, an image of class c is picked with probability n_c / N_c = 0.1."""
    labels = shuffled_labels([20] * 10)  # N = 200; 2% ... here 10%: 2 per class
    hits = torch.zeros(200)
    for seed in range(400):
        hits[class_balanced_subset(labels, 0.1, seed=seed)] += 1
    mean, sd = 400 * 0.1, math.sqrt(400 * 0.1 * 0.9)  # binomial(400, 0.1): 40 +- 6
    assert abs(float(hits.mean()) - mean) < 1e-9  # exactly 20 picks per seed
    assert float(hits.min()) > mean - 5 * sd and float(hits.max()) < mean + 5 * sd


def test_subsets_depend_only_on_labels_not_on_the_order_of_the_call() -> None:
    labels = shuffled_labels([30] * 4)
    before = [class_balanced_subset(labels, 0.25, seed=s) for s in range(3)]
    after = [class_balanced_subset(labels, 0.25, seed=s) for s in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("fraction", "match"),
    [
        (0.0, "in \\(0, 1\\]"),
        (1.5, "in \\(0, 1\\]"),
        (-0.1, "in \\(0, 1\\]"),
        (float("nan"), "a number"),
        ("0.1", "a number"),
        (True, "a number"),
        (0.001, "fewer than the 10 classes"),
    ],
)
def test_bad_fractions_are_one_line_errors(fraction: object, match: str) -> None:
    labels = shuffled_labels([100] * 10)
    with pytest.raises(ValueError, match=match) as info:
        class_balanced_subset(labels, fraction, seed=0)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None])
def test_bad_seeds_are_one_line_errors(seed: object) -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        class_balanced_subset(shuffled_labels([10] * 3), 0.5, seed=seed)  # type: ignore[arg-type]


def test_unlabelled_images_are_refused() -> None:
    labels = torch.tensor([0, 1, -1, 1, 0, 1])
    with pytest.raises(ValueError, match="no label"):
        label_order(labels, seed=0)


def test_subset_size_rounds_to_the_nearest_image() -> None:
    assert subset_size(60_000, 0.01, 10) == 600
    assert subset_size(60_000, 0.1, 10) == 6_000
    assert subset_size(999, 0.5, 2) == round(499.5)


def test_run_lowshot_refuses_bad_arguments_before_training() -> None:
    def never(model: str, seed: int):  # noqa: ANN202
        raise AssertionError("no model should be built")

    from wildsight.eval.finetune import InputSpec
    from wildsight.eval.models import LabelledImages

    train = LabelledImages("x", torch.zeros(20, 3, 8, 8, dtype=torch.uint8),
                           shuffled_labels([10, 10]), None)  # fmt: skip
    spec = InputSpec(8, (0.5,) * 3, (0.5,) * 3)
    cases = [({"seeds": 0}, "seeds"), ({"fractions": [2.0]}, "fraction"),
             ({"fractions": []}, "at least one"), ({"protocol": "knn"}, "protocol"),
             ({"jobs": 0}, "jobs"), ({"jobs": 1.5}, "jobs"),
             ({"protocol": "linear", "jobs": 2}, "probe")]  # fmt: skip
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            run_lowshot(never, spec, train, train.images, train.labels, **kwargs)


def test_summary_mean_and_sample_std_per_model_and_fraction() -> None:
    accs = {("pretrained", 0.01): [0.80, 0.84, 0.83], ("random init", 0.01): [0.70, 0.72, 0.71]}
    rows = [LowshotRow(m, f, s, 600, a, 1.0, {}) for (m, f), v in accs.items()
            for s, a in enumerate(v)]  # fmt: skip
    by_model = {r["model"]: r for r in summarize(rows)}
    for (model, _), values in accs.items():
        assert by_model[model]["mean"] == pytest.approx(float(np.mean(values)))
        assert by_model[model]["std"] == pytest.approx(float(np.std(values, ddof=1)))
        assert by_model[model]["seeds"] == 3
    one = summarize([LowshotRow("pretrained", 0.1, 0, 6000, 0.9, 1.0, {})])
    assert one[0]["std"] == 0.0 and one[0]["mean"] == statistics.fmean([0.9])


def test_extra_distillation_teachers_are_the_same_training_with_other_seeds() -> None:
    """distillation.teachers = 2 without self-training: teacher 2 is the run's fine-tune again
    with seed + 1000 on the same subset, so fine-tuning it here by hand gives its top-1."""
    import dataclasses

    from tests.unit.eval.test_finetune import SPEC, brightness_task, small_classifier
    from wildsight.eval.distill import TEACHER_SEED_STRIDE, DistillConfig
    from wildsight.eval.finetune import FinetuneConfig, finetune
    from wildsight.eval.models import LabelledImages

    x, y = brightness_task(8, seed=0)
    test_x, test_y = brightness_task(10, seed=1)
    train = LabelledImages("toy", x, y, ["dark", "mid", "bright"])
    # 2 steps: seeds 0 and 1000 end at different test accuracies (1.0 and 0.47 here)
    cfg = FinetuneConfig(steps=2, batch_size=8, lr=0.4, precision="fp32", device="cpu")
    distillation = DistillConfig(teachers=2, teacher_flip=True,
                                 train=dataclasses.replace(cfg, steps=3))  # fmt: skip
    rows = run_lowshot(lambda model, seed: small_classifier(seed), SPEC, train, test_x, test_y,
                       fractions=[0.5], seeds=1, cfg=cfg, models=["pretrained"],
                       distillation=distillation, log=lambda _: None)  # fmt: skip
    assert [r.model for r in rows] == ["pretrained", "pretrained + distillation"]
    params = rows[1].params
    assert params["teachers"] == 2 and params["teacher_flip"] is True
    idx = class_balanced_subset(y, 0.5, 0)
    again = finetune(small_classifier(TEACHER_SEED_STRIDE), x[idx], y[idx], test_x, test_y,
                     inputs=SPEC, cfg=dataclasses.replace(cfg, seed=TEACHER_SEED_STRIDE))  # fmt: skip
    assert params["teacher_top1s"] == [rows[0].top1, again.top1]
    assert rows[1].seconds > params["teacher_seconds"] > 0
