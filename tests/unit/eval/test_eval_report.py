"""format_table, ProbeResult.to_dict, the confusion matrix and top-1 accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import accuracy_score

from wildsight.eval import ProbeResult, confusion_matrix, format_table, top1_accuracy


def test_columns_are_aligned_and_top1_is_a_percentage() -> None:
    rows = [
        {"probe": "linear", "top1": 0.84312, "val_top1": 0.9, "l2": 1e-4, "num_train": 60000},
        {"probe": "k-NN (k=20)", "top1": 0.8551, "num_train": 60000},
    ]
    text = format_table(rows, ["probe", "top1", "val_top1", "l2", "num_train"], title="FMNIST")
    assert text.splitlines() == [
        "FMNIST",
        "probe         top1  val_top1      l2  num_train",
        "-----------  -----  --------  ------  ---------",
        "linear       84.3%     90.0%  0.0001     60,000",
        "k-NN (k=20)  85.5%                       60,000",
    ]


def test_docstring_example_exactly() -> None:
    text = format_table([{"probe": "linear", "top1": 0.8431}], ["probe", "top1"])
    assert text == "probe    top1\n------  -----\nlinear  84.3%"


def test_missing_and_non_top1_values() -> None:
    text = format_table([{"a": 1.5, "top1": 1.5}, {"a": None}], ["a", "top1"])
    assert text.splitlines()[2:] == ["1.5   1.5", "  -"]
    with pytest.raises(ValueError, match="at least one column"):
        format_table([], [])


def test_probe_result_to_dict_is_json() -> None:
    result = ProbeResult(0.5, float("nan"), {"k": 20}, 10, 5, 3)
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == {
        "top1": 0.5,
        "val_top1": None,
        "params": {"k": 20},
        "num_train": 10,
        "num_test": 5,
        "feature_dim": 3,
    }
    d["params"]["k"] = 1
    assert result.params == {"k": 20}


def test_confusion_matrix_is_a_direct_count() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (300,), generator=g)
    predicted = torch.randint(0, 6, (300,), generator=g)  # 5 = a label outside the list
    labels = [0, 1, 2, 3, 4]
    counts = confusion_matrix(true, predicted, labels)
    expected = [[0] * 5 for _ in labels]
    for t, p in zip(true.tolist(), predicted.tolist(), strict=True):
        if p in labels:
            expected[labels.index(t)][labels.index(p)] += 1
    assert counts == expected
    assert sum(map(sum, counts)) == int((predicted < 5).sum())
    # label values need not be 0..C-1; rows follow the order of `labels`
    names = torch.tensor([7, 3, 9, 4, 1])
    assert confusion_matrix(names[true], names[predicted.clamp(max=4)], [7, 3, 9, 4, 1]) == (
        confusion_matrix(true, predicted.clamp(max=4), labels)
    )
    with pytest.raises(ValueError, match="300 labels but 2 predictions"):
        confusion_matrix(true, predicted[:2], labels)


def test_top1_accuracy_matches_scikit_learn_and_the_confusion_diagonal() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (997,), generator=g)
    predicted = torch.where(torch.rand(997, generator=g) < 0.6, true, torch.randint(0, 5, (997,)))
    acc = top1_accuracy(predicted, true)
    assert acc == pytest.approx(accuracy_score(true.numpy(), predicted.numpy()), abs=1e-12)
    counts = torch.tensor(confusion_matrix(true, predicted, range(5)))
    assert acc == pytest.approx(int(counts.diag().sum()) / int(counts.sum()), abs=1e-12)
    assert top1_accuracy(true, true) == 1.0


def test_top1_accuracy_refuses_mismatched_or_empty_inputs() -> None:
    with pytest.raises(ValueError, match="3 predictions but 4 labels"):
        top1_accuracy(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        top1_accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
