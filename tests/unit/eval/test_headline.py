"""Which row a one-number summary quotes (eval/protocols.headline_index)."""

from __future__ import annotations

from wildsight.eval.protocols import headline_index


def row(layer: str, val: float | None, top1: float, k: int | None = None) -> dict:
    return {"layer": layer, "val_top1": val, "top1": top1, **({"k": k} if k else {})}


def test_the_pre_logits_row_wins_whatever_the_scores() -> None:
    rows = [row("stage3", 0.9, 0.9), row("pre_logits", 0.5, 0.5), row("stage4_grid", 0.95, 0.95)]
    assert headline_index(rows) == 1


def test_among_layers_the_best_held_out_score_wins_not_the_best_test_score() -> None:
    rows = [
        row("stage2_grid", 0.80, 0.99),  # best on test: must not matter
        row("stage3_grid", 0.88, 0.85),
        row("stage4_grid", 0.86, 0.86),
    ]
    assert headline_index(rows) == 1
    tied = [row("stage3_grid", 0.88, 0.8), row("stage4_grid", 0.88, 0.9)]
    assert headline_index(tied) == 0  # a tie goes to the earlier layer


def test_knn_rows_without_held_out_scores_quote_the_last_layer_first_k() -> None:
    rows = [row("stage3", None, 0.7, k=10), row("stage3", None, 0.71, k=20),
            row("stage4_grid", None, 0.8, k=10), row("stage4_grid", None, 0.81, k=20)]  # fmt: skip
    assert headline_index(rows) == 2
