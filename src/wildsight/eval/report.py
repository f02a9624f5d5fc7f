"""Probe results and how they are shown: a frozen record, a JSON-ready dict, a plain table,
a confusion matrix. The HTML page is built in ``eval/html.py`` from the JSON files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome. Accuracies are fractions in [0, 1]."""

    top1: float  # test accuracy
    val_top1: float  # accuracy on the held-out part of TRAIN used to choose hyper-parameters
    params: dict[str, Any] = field(default_factory=dict)  # chosen, e.g. {"l2": 1e-4}
    num_train: int = 0
    num_test: int = 0
    feature_dim: int = 0
    # test-set predictions int64 [M] in label space (not serialised; feeds the confusion matrix)
    predictions: Tensor | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (params copied; NaN, e.g. k-NN's val_top1, becomes None)."""
        return {
            "top1": _json_float(self.top1),
            "val_top1": _json_float(self.val_top1),
            "params": dict(self.params),
            "num_train": int(self.num_train),
            "num_test": int(self.num_test),
            "feature_dim": int(self.feature_dim),
        }


def top1_accuracy(predicted: Tensor, true: Tensor) -> float:
    """Fraction of positions where predicted equals true (int [M] each, any devices): top-1
    accuracy of class predictions, or the agreement of two models' predictions."""
    predicted, true = predicted.cpu().flatten(), true.cpu().flatten()
    if predicted.shape != true.shape:
        raise ValueError(f"top-1 got {predicted.numel()} predictions but {true.numel()} labels")
    if predicted.numel() == 0:
        raise ValueError("top-1 of no predictions is undefined: the test set is empty")
    return float((predicted == true).double().mean())


def confusion_matrix(true: Tensor, predicted: Tensor, labels: Sequence[int]) -> list[list[int]]:
    """counts[i][j] = #{n : true[n] == labels[i] and predicted[n] == labels[j]}.

    true and predicted int [M] hold label values; a value outside ``labels`` is not counted.
    Rows are true classes, columns predicted ones (scikit-learn's convention).
    """
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)  # [C]
    true, predicted = true.long().cpu().flatten(), predicted.long().cpu().flatten()
    if true.shape != predicted.shape:
        raise ValueError(
            f"confusion matrix got {true.numel()} labels but {predicted.numel()} predictions"
        )
    c = labels_t.numel()
    lookup = {int(v): i for i, v in enumerate(labels_t.tolist())}
    row = torch.tensor([lookup.get(int(v), -1) for v in true.tolist()], dtype=torch.long)
    col = torch.tensor([lookup.get(int(v), -1) for v in predicted.tolist()], dtype=torch.long)
    keep = (row >= 0) & (col >= 0)
    counts = torch.bincount(row[keep] * c + col[keep], minlength=c * c).reshape(c, c)
    return counts.tolist()


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _cell(column: str, value: Any) -> str:
    """Text of one cell: top1 fractions as percentages ('84.3%'), other floats with 4 digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if "top1" in column and 0.0 <= value <= 1.0:
            return f"{100.0 * value:.1f}%"
        return f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_table(
    rows: list[dict[str, Any]], columns: list[str], *, title: str | None = None
) -> str:
    """Aligned plain-text table of ``rows`` restricted to ``columns`` (missing keys shown blank).

    Numbers are right-aligned, text left-aligned; a column is numeric when all its present
    values are numbers. Floats in [0, 1] under a column whose name contains "top1" are shown
    as percentages with one decimal.

    >>> print(format_table([{"probe": "linear", "top1": 0.8431}], ["probe", "top1"]))
    probe    top1
    ------  -----
    linear  84.3%
    """
    if not columns:
        raise ValueError("format_table needs at least one column")
    cells = [[_cell(c, row[c]) if c in row else "" for c in columns] for row in rows]
    numeric = [
        all(_is_number(row[c]) for row in rows if c in row and row[c] is not None) for c in columns
    ]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(texts: list[str]) -> str:
        parts = [
            t.rjust(w) if num else t.ljust(w)
            for t, w, num in zip(texts, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [] if title is None else [title]
    out += [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)
