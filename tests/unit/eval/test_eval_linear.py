"""Linear probe: L-BFGS against scikit-learn's optimum; l2 chosen without any test data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from wildsight.eval import (
    fit_logistic,
    linear_probe,
    logistic_objective,
    standardize,
    stratified_split,
)


def blobs(n: int, d: int, k: int, *, seed: int, spread: float = 0.7) -> tuple[torch.Tensor, ...]:
    """Overlapping Gaussian classes: x float64 [n, d], y int64 [n] (not separable)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g, dtype=torch.float64)  # [k, d]
    y = torch.randint(0, k, (n,), generator=g)  # [n]
    x = spread * centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)  # [n, d]
    return x, y


def sklearn_fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> LogisticRegression:
    """sklearn minimises C * sum_i CE_i + ||W||^2 / 2; with C = 1 / (l2 n) that is J / l2."""
    clf = LogisticRegression(C=1.0 / (l2 * x.shape[0]), tol=1e-12, max_iter=10_000)
    return clf.fit(x.numpy(), y.numpy())


@pytest.mark.parametrize("l2", [1e-3, 1e-2, 1e-1])
def test_fit_logistic_reaches_sklearn_optimum_float64(l2: float) -> None:
    x, y = blobs(600, 20, 4, seed=0)
    fit = fit_logistic(x, y, l2)
    clf = sklearn_fit(x, y, l2)
    w_ref, b_ref = torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)  # [4, 20], [4]
    # J = l2 * (sklearn's objective); compare J at both solutions (ours may only be lower).
    j_ref = float(logistic_objective(x, y, w_ref, b_ref, l2))
    assert fit.objective == pytest.approx(j_ref, rel=1e-7, abs=1e-9)
    assert fit.objective <= j_ref + 1e-9
    proba = fit.predict_proba(x)  # [600, 4]
    ref = torch.from_numpy(clf.predict_proba(x.numpy()))
    torch.testing.assert_close(proba, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(fit.weight, w_ref, atol=1e-3, rtol=0)


def test_fit_logistic_float32_is_close_to_the_optimum() -> None:
    # float32 cannot resolve objective changes below ~1e-8, so it stops ~1e-3 away in probability.
    x, y = blobs(600, 20, 4, seed=1)
    fit = fit_logistic(x.float(), y, 1e-2)
    ref = torch.from_numpy(sklearn_fit(x, y, 1e-2).predict_proba(x.numpy()))
    torch.testing.assert_close(fit.predict_proba(x.float()).double(), ref, atol=2e-3, rtol=0)


def test_closed_form_gradient_matches_autograd() -> None:
    from wildsight.eval.linear import _objective_and_grad

    x, y = blobs(50, 6, 3, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = logistic_objective(x, y, w, b, 0.3)
    gw, gb = torch.autograd.grad(loss, (w, b))
    loss2, gw2, gb2 = _objective_and_grad(x, y, w.detach(), b.detach(), 0.3)
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(gw2, gw)
    torch.testing.assert_close(gb2, gb)


def test_warm_start_reaches_the_same_optimum() -> None:
    x, y = blobs(400, 10, 3, seed=4)
    cold = fit_logistic(x, y, 1e-2)
    warm = fit_logistic(x, y, 1e-2, init=(cold.weight + 0.5, cold.bias - 0.5))
    torch.testing.assert_close(warm.predict_proba(x), cold.predict_proba(x), atol=1e-5, rtol=0)


def test_fit_logistic_works_on_inference_tensors() -> None:
    x, y = blobs(100, 5, 3, seed=5)
    with torch.inference_mode():
        x_inf = x.clone()
    assert fit_logistic(x_inf, y, 1e-2).iterations > 0


def test_stratified_split_keeps_class_proportions() -> None:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 50, 250, 7])])
    y = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(0))]
    fit_idx, val_idx = stratified_split(y, 0.2, seed=3)
    assert torch.cat([fit_idx, val_idx]).sort().values.tolist() == list(range(y.numel()))
    assert torch.bincount(y[val_idx]).tolist() == [20, 10, 50, 1]
    assert torch.bincount(y[fit_idx]).tolist() == [80, 40, 200, 6]
    again, _ = stratified_split(y, 0.2, seed=3)
    assert torch.equal(again, fit_idx)
    other, _ = stratified_split(y, 0.2, seed=4)
    assert not torch.equal(other, fit_idx)


GRID = (1e-4, 1e-2, 1e-1, 1.0, 10.0)


def test_l2_is_chosen_on_train_only_and_matches_an_independent_selection() -> None:
    x, y = blobs(500, 30, 3, seed=6, spread=0.25)
    test_x, test_y = blobs(300, 30, 3, seed=7, spread=0.25)
    kwargs = dict(l2_grid=GRID, seed=1)
    result = linear_probe(x, y, test_x, test_y, dtype=torch.float64, **kwargs)
    # Scrambled test labels and features: same choice, same validation accuracy.
    g = torch.Generator().manual_seed(8)
    scrambled = linear_probe(
        x,
        y,
        torch.randn(300, 30, generator=g, dtype=torch.float64),
        test_y[torch.randperm(300, generator=g)],
        dtype=torch.float64,
        **kwargs,
    )
    assert scrambled.params == result.params
    assert scrambled.val_top1 == result.val_top1
    # Independent selection with scikit-learn on the same split and statistics.
    fit_idx, val_idx = stratified_split(y, 0.2, seed=1)
    fit_x, val_x = standardize(x[fit_idx], x[val_idx])
    val_y = y[val_idx].numpy()
    val_acc = {
        l2: float(np.mean(sklearn_fit(fit_x, y[fit_idx], l2).predict(val_x.numpy()) == val_y))
        for l2 in GRID
    }
    assert result.val_top1 == pytest.approx(max(val_acc.values()))
    assert val_acc[result.params["l2"]] == pytest.approx(max(val_acc.values()))
    # The reported test accuracy is that of the refit on all of TRAIN with the chosen l2.
    full_x, std_test_x = standardize(x, test_x)
    clf = sklearn_fit(full_x, y, result.params["l2"])
    assert result.top1 == pytest.approx(np.mean(clf.predict(std_test_x.numpy()) == test_y.numpy()))
    assert (result.num_train, result.num_test, result.feature_dim) == (500, 300, 30)
    assert len(set(val_acc.values())) > 1  # the grid matters on this problem


def test_linear_probe_separable_problem_is_solved() -> None:
    x, y = blobs(300, 10, 3, seed=9, spread=6.0)
    test_x, test_y = blobs(100, 10, 3, seed=9, spread=6.0)
    result = linear_probe(x, y, test_x, test_y, l2_grid=(1e-3,))
    assert result.top1 == 1.0 and result.val_top1 == 1.0 and result.params == {"l2": 1e-3}


def good_inputs() -> dict[str, torch.Tensor]:
    x, y = blobs(40, 4, 2, seed=10)
    return dict(train_x=x, train_y=y, test_x=x[:10], test_y=y[:10])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_y=torch.zeros(39, dtype=torch.long)), "40 rows but labels have shape"),
        (dict(test_x=torch.zeros(0, 4)), "empty test set"),
        (dict(train_x=torch.zeros(0, 4), train_y=torch.zeros(0, dtype=torch.long)), "empty"),
        (dict(train_y=torch.zeros(40, dtype=torch.long)), "at least 2 classes"),
        (dict(test_x=torch.zeros(10, 5)), "4 dims but test features have 5"),
        (dict(train_y=torch.zeros(40)), "integer training labels"),
    ],
)
def test_linear_probe_rejects_bad_inputs(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        linear_probe(**{**good_inputs(), **change}, l2_grid=(1e-2,))


def test_linear_probe_rejects_unknown_labels_in_one_line() -> None:
    x, y = blobs(2000, 4, 2, seed=11)
    y = y.clone()
    y[:1234] = -1
    with pytest.raises(ValueError) as err:
        linear_probe(x, y, x, y.clamp(min=0))
    assert str(err.value) == (
        "linear probe needs labels for every training image; 1,234 have none (-1)"
    )


def test_label_values_need_not_be_contiguous() -> None:
    x, y = blobs(300, 8, 3, seed=12, spread=0.5)
    test_x, test_y = blobs(100, 8, 3, seed=13, spread=0.5)
    names = torch.tensor([2, 5, 9])
    base = linear_probe(x, y, test_x, test_y, l2_grid=(1e-2, 1e-1))
    renamed = linear_probe(x, names[y], test_x, names[test_y], l2_grid=(1e-2, 1e-1))
    assert (renamed.top1, renamed.val_top1, renamed.params) == (
        base.top1,
        base.val_top1,
        base.params,
    )
    # A test label never seen in training can only be an error.
    unseen = names[test_y].clone()
    unseen[:10] = 11
    correct_in_first_10 = (
        base.top1 * 100
        - linear_probe(x, y, test_x[10:], test_y[10:], l2_grid=(1e-2, 1e-1)).top1 * 90
    )
    result = linear_probe(x, names[y], test_x, unseen, l2_grid=(1e-2, 1e-1))
    assert result.top1 * 100 == pytest.approx(base.top1 * 100 - correct_in_first_10)
