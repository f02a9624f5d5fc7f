"""SGD linear probe: it converges to the L-BFGS optimum of the same convex objective, and its
(lr, l2) are chosen on the training set only."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from wildsight.eval import fit_logistic, fit_logistic_sgd, linear_probe_sgd, logistic_objective
from wildsight.eval.linear import select_on_train_split


def blobs(n: int, d: int, k: int, *, seed: int, spread: float = 0.7) -> tuple[torch.Tensor, ...]:
    """Overlapping Gaussian classes: x float64 [n, d], y int64 [n] (not separable)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g, dtype=torch.float64)  # [k, d]
    y = torch.randint(0, k, (n,), generator=g)  # [n]
    return spread * centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


def test_sgd_reaches_the_optimum_of_the_lbfgs_objective() -> None:
    # The optimum of J (what the L-BFGS probe reaches, test_eval_linear.py) from scikit-learn,
    # which minimises C sum_i CE_i + ||W||^2 / 2 = J / l2 for C = 1 / (l2 n).
    x, y = blobs(600, 20, 4, seed=0)
    l2 = 1e-2
    clf = LogisticRegression(C=1.0 / (l2 * 600), tol=1e-12, max_iter=10_000).fit(
        x.numpy(), y.numpy()
    )
    w_opt, b_opt = torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)  # [4, 20], [4]
    j_opt = float(logistic_objective(x, y, w_opt, b_opt, l2))
    gaps = []
    for epochs in (5, 100):
        fit = fit_logistic_sgd(x, y, l2, lr=0.1, epochs=epochs, batch_size=32, seed=1)
        assert fit.iterations == epochs * 19  # ceil(600 / 32) steps per epoch
        gaps.append(fit.objective - j_opt)
    assert gaps[0] > 0 and gaps[1] >= -1e-12  # nothing beats the optimum
    assert gaps[1] < 1e-4 * j_opt  # within 0.01% of the optimum objective
    assert gaps[1] < gaps[0] / 10  # the decaying LR keeps converging
    # Strong convexity (modulus l2): ||W - W*||^2 <= 2 gap / l2.
    assert float((fit.weight - w_opt).pow(2).sum()) <= 2 * gaps[1] / l2 + 1e-9
    proba = torch.from_numpy(clf.predict_proba(x.numpy()))
    torch.testing.assert_close(fit.predict_proba(x), proba, atol=1e-2, rtol=0)


def test_sgd_is_deterministic_in_its_seed() -> None:
    x, y = blobs(200, 5, 3, seed=2)
    a = fit_logistic_sgd(x.float(), y, 1e-3, lr=0.1, epochs=3, seed=4)
    b = fit_logistic_sgd(x.float(), y, 1e-3, lr=0.1, epochs=3, seed=4)
    c = fit_logistic_sgd(x.float(), y, 1e-3, lr=0.1, epochs=3, seed=5)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_sgd_probe_choice_never_sees_the_test_set() -> None:
    x, y = blobs(400, 12, 3, seed=6, spread=0.3)
    test_x, test_y = blobs(200, 12, 3, seed=7, spread=0.3)
    kwargs = dict(lr_grid=(0.3, 0.01), l2_grid=(1.0, 1e-4), epochs=4, seed=2)
    result = linear_probe_sgd(x, y, test_x, test_y, **kwargs)
    g = torch.Generator().manual_seed(8)
    scrambled = linear_probe_sgd(
        x, y, torch.randn(200, 12, generator=g, dtype=torch.float64), test_y.flip(0), **kwargs
    )
    assert scrambled.params == result.params and scrambled.val_top1 == result.val_top1
    assert set(result.params) == {"lr", "l2"} and result.predictions is not None
    assert result.top1 == pytest.approx(float((result.predictions == test_y).double().mean()))


def test_selection_keeps_the_best_and_the_first_of_ties() -> None:
    x, y = blobs(300, 4, 2, seed=9, spread=3.0)
    calls = []

    def fit(fx, ft, num_classes, params):  # noqa: ANN001, ANN202
        calls.append((len(fx), params["name"]))
        if params["name"] == "wrong":
            return lambda q: 1 - ft.new_zeros(len(q))  # always class 1: ~50% on val
        return fit_logistic(fx, ft, 1e-2, num_classes=num_classes).predict

    candidates = [{"name": "wrong"}, {"name": "good"}, {"name": "good-too"}]
    result = select_on_train_split("probe", x, y, x[:50], y[:50], candidates=candidates, fit=fit)
    assert result.params == {"name": "good"}  # "good-too" ties and comes later
    assert calls == [(240, "wrong"), (240, "good"), (240, "good-too"), (300, "good")]


def test_sgd_probe_solves_a_separable_problem_and_rejects_bad_settings() -> None:
    x, y = blobs(300, 10, 3, seed=10, spread=6.0)
    result = linear_probe_sgd(x, y, x[:100], y[:100], lr_grid=(0.1,), l2_grid=(1e-4,), epochs=5)
    assert result.top1 == 1.0 and result.val_top1 == 1.0
    with pytest.raises(ValueError, match="lr > 0"):
        fit_logistic_sgd(x, y, 1e-3, lr=0.0)
    with pytest.raises(ValueError, match="non-empty grids"):
        linear_probe_sgd(x, y, x, y, lr_grid=())
