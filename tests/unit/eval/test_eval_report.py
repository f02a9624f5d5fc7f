"""format_table and ProbeResult.to_dict."""

from __future__ import annotations

import json

import pytest

from wildsight.eval import ProbeResult, format_table


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
