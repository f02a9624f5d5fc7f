"""Linear probe: multinomial logistic regression on frozen features, full-batch L-BFGS.

The "Revisiting self-supervised learning" protocol (Kolesnikov et al., 2019, §3): "a linear
logistic regression model trained ... with L-BFGS" on frozen features. The problem is convex,
so the solver is checked against scikit-learn's optimum in the tests rather than against a
"loss went down" criterion.

Objective (mean cross-entropy, bias not penalised), with W [K, D], b [K]:

    J(W, b) = (1/n) sum_i -log softmax(W x_i + b)[y_i]  +  (l2 / 2) ||W||_F^2

scikit-learn's ``LogisticRegression`` minimises ``C sum_i loss_i + (1/2) ||W||^2`` instead;
dividing that by ``C n`` gives J exactly when ``C = 1 / (l2 * n)``, so both share the minimiser
and ``J = l2 * J_sklearn`` at any (W, b).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wildsight.eval.report import ProbeResult, top1_accuracy

L2_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-6, 1))  # 1e-6 ... 1


@dataclass(frozen=True)
class LogisticFit:
    """A fitted multinomial logistic regression: logits = x @ weight.T + bias."""

    weight: Tensor  # [K, D]
    bias: Tensor  # [K]
    objective: float  # J(W, b) at the solution
    iterations: int  # L-BFGS iterations used

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight.dtype) @ self.weight.T + self.bias  # [N, K]

    def predict_proba(self, x: Tensor) -> Tensor:
        return self.logits(x).softmax(dim=1)  # [N, K], rows sum to 1

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(dim=1)  # [N]


def logistic_objective(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float) -> Tensor:
    """J(W, b) = mean_i CE(W x_i + b, y_i) + l2/2 ||W||^2 (the bias is not penalised)."""
    logits = x @ weight.T + bias  # [N, K]
    return F.cross_entropy(logits, y) + 0.5 * l2 * weight.pow(2).sum()


def _objective_and_grad(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float
) -> tuple[Tensor, Tensor, Tensor]:
    """J and its closed-form gradient: dJ/dlogits = (softmax - onehot) / n."""
    n = x.shape[0]
    log_p = torch.log_softmax(x @ weight.T + bias, dim=1)  # [N, K]
    loss = -log_p.gather(1, y[:, None]).mean() + 0.5 * l2 * weight.pow(2).sum()
    residual = log_p.exp_()  # [N, K], softmax
    residual[torch.arange(n, device=x.device), y] -= 1.0
    residual /= n
    grad_w = residual.T @ x + l2 * weight  # [K, D]
    grad_b = residual.sum(dim=0)  # [K]
    return loss, grad_w, grad_b


def fit_logistic(
    x: Tensor,
    y: Tensor,
    l2: float,
    *,
    num_classes: int | None = None,
    max_iter: int = 500,
    init: tuple[Tensor, Tensor] | None = None,
    history_size: int = 10,
) -> LogisticFit:
    """Minimise J(W, b) (see the module docstring) with full-batch L-BFGS + strong-Wolfe search.

    x: float [N, D] (its dtype is the solver's dtype: float32 or float64), y: int64 [N] in
    [0, K). The gradient is closed-form (no autograd graph), so this also works on tensors made
    under ``torch.inference_mode()``. ``init`` = (W [K, D], b [K]) warm-starts the solver; for
    l2 > 0 the optimum is unique in W and in the probabilities (b only up to a common shift),
    so the start changes only the iterations needed.
    history_size is scipy's default (m = 10): the memory is 2 m K D numbers.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if x.dtype not in (torch.float32, torch.float64) or x.ndim != 2:
        raise ValueError(f"x must be a float32/64 [N, D] tensor, got {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    y = y.to(device=x.device, dtype=torch.long)
    if init is None:
        weight = torch.zeros(k, d, dtype=x.dtype, device=x.device)  # [K, D]
        bias = torch.zeros(k, dtype=x.dtype, device=x.device)  # [K]
    else:
        weight = init[0].detach().to(device=x.device, dtype=x.dtype).clone()
        bias = init[1].detach().to(device=x.device, dtype=x.dtype).clone()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=1e-10 if x.dtype == torch.float64 else 1e-7,
        tolerance_change=1e-12 if x.dtype == torch.float64 else 1e-9,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        loss, weight.grad, bias.grad = _objective_and_grad(x, y, weight, bias, l2)
        return loss

    with torch.no_grad():
        optimizer.step(closure)
        objective = float(logistic_objective(x, y, weight, bias, l2))
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LogisticFit(weight.detach(), bias.detach(), objective, iterations)


def stratified_split(y: Tensor, val_fraction: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split the indices of y [N] into (fit, val) with class proportions kept.

    val holds round(n_c * val_fraction) of each class c's n_c examples;
    every class keeps at least one example in the fit part. Deterministic in ``seed``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    y = y.cpu()
    fit_parts, val_parts = [], []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()  # [n_c]
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_val = min(round(members.numel() * val_fraction), members.numel() - 1)
        val_parts.append(members[:n_val])
        fit_parts.append(members[n_val:])
    fit_idx, val_idx = torch.cat(fit_parts).sort().values, torch.cat(val_parts).sort().values
    if val_idx.numel() == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {y.numel()} training images leaves no validation set"
        )
    return fit_idx, val_idx


def standardize(train_x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """(x - mean) / std with mean and std [D] of train_x only; constant features get std 1."""
    mean = train_x.mean(dim=0)  # [D]
    std = train_x.std(dim=0)  # [D]
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in (train_x, *others))


def check_probe_inputs(
    name: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate probe inputs; returns (train_x, train_y int64, test_x, test_y int64)."""
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    for split, x, y in (("training", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2:
            raise ValueError(f"{name} needs {split} features of shape [N, D], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} got an empty {split} set")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{name}: {split} features have {x.shape[0]:,} rows but labels have shape "
                f"{tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{name} needs integer {split} labels, got {y.dtype}")
        unknown = int((y < 0).sum())
        if unknown:
            raise ValueError(
                f"{name} needs labels for every {split} image; {unknown:,} have none (-1)"
            )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"{name}: training features have {train_x.shape[1]} dims but test features "
            f"have {test_x.shape[1]}"
        )
    num_train_classes = int(torch.unique(train_y).numel())
    if num_train_classes < 2:
        raise ValueError(f"{name} needs at least 2 classes in the training labels, got 1")
    return train_x, train_y.long(), test_x, test_y.long()


def _top1(fit: LogisticFit, x: Tensor, y: Tensor, classes: Tensor) -> float:
    """Accuracy of fit on x [M, D] against labels y [M]; output j of the fit means classes[j]."""
    return top1_accuracy(classes[fit.predict(x)], y)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    l2_grid: Sequence[float] = L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Linear probe: choose l2 on a held-out split of TRAIN, refit on all of TRAIN, score TEST.

    train_x [N, D], train_y int [N] in [0, K); test_x [M, D], test_y int [M]. Features are
    standardised with training statistics (those of the fit part while choosing l2, those of
    the whole training set for the final fit). The grid is walked from the strongest to the
    weakest l2 with warm starts; ties go to the stronger l2. Test data is used exactly once,
    by the final model. The model has one output per class present in train_y; a test label
    never seen in training counts as an error. ``dtype`` is the solver's precision: float32
    stops ~1e-3 from the optimal probabilities (it cannot resolve smaller objective changes),
    which never moves top-1 by more than noise; float64 gets within ~1e-5 at about 2x the cost.
    """
    train_x, train_y, test_x, test_y = check_probe_inputs(
        "linear probe", train_x, train_y, test_x, test_y
    )
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not grid or min(grid) < 0:
        raise ValueError(f"l2_grid must hold at least one value >= 0, got {list(l2_grid)}")
    device = torch.device(device)
    train_x = train_x.to(device=device, dtype=dtype)  # [N, D]
    classes, train_t = torch.unique(train_y.to(device), return_inverse=True)  # [C], [N] in [0, C)
    num_classes = int(classes.numel())

    # 1. Choose l2 on a class-stratified split of the training set.
    fit_idx, val_idx = stratified_split(train_t, val_fraction, seed=seed)
    fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
    fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])  # [N_fit, D], [N_val, D]
    fit_t, val_y = train_t[fit_idx], classes[train_t[val_idx]]
    best_l2, best_val, best_fit, init = grid[0], -1.0, None, None
    for l2 in grid:
        fit = fit_logistic(fit_x, fit_t, l2, num_classes=num_classes, max_iter=max_iter, init=init)
        init = (fit.weight, fit.bias)
        val_top1 = _top1(fit, val_x, val_y, classes)
        if val_top1 > best_val:
            best_l2, best_val, best_fit = l2, val_top1, fit
    del fit_x, val_x

    # 2. Refit on the whole training set with the chosen l2; score the test set once.
    full_x, test_x = standardize(train_x, test_x.to(device=device, dtype=dtype))
    assert best_fit is not None
    final = fit_logistic(
        full_x,
        train_t,
        best_l2,
        num_classes=num_classes,
        max_iter=max_iter,
        init=(best_fit.weight, best_fit.bias),
    )
    predictions = classes[final.predict(test_x)].cpu()  # [M], label values
    return ProbeResult(
        top1=top1_accuracy(predictions, test_y),
        val_top1=best_val,
        params={"l2": best_l2},
        predictions=predictions,
        num_train=int(train_x.shape[0]),
        num_test=int(test_x.shape[0]),
        feature_dim=int(train_x.shape[1]),
    )


def select_on_train_split(
    name: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    candidates: Sequence[dict[str, Any]],
    fit: Callable[[Tensor, Tensor, int, dict[str, Any]], Callable[[Tensor], Tensor]],
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """The protocol of ``linear_probe`` for any trainable probe: pick the hyper-parameters on a
    class-stratified split of TRAIN, refit on all of TRAIN, score TEST exactly once.

    ``fit(x [n, D] standardised, t int64 [n] in [0, C), C, params) -> predict`` where
    ``predict(x [m, D]) -> class index int64 [m] in [0, C)``. Candidates are tried in the given
    order and a tie keeps the earlier one, so list the most regularised first.
    """
    train_x, train_y, test_x, test_y = check_probe_inputs(name, train_x, train_y, test_x, test_y)
    if not candidates:
        raise ValueError(f"{name} needs at least one hyper-parameter candidate")
    device = torch.device(device)
    train_x = train_x.to(device=device, dtype=dtype)  # [N, D]
    classes, train_t = torch.unique(train_y.to(device), return_inverse=True)  # [C], [N]
    num_classes = int(classes.numel())
    fit_idx, val_idx = stratified_split(train_t, val_fraction, seed=seed)
    fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
    fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])  # [N_fit, D], [N_val, D]
    best_params, best_val = dict(candidates[0]), -1.0
    for params in candidates:
        predict = fit(fit_x, train_t[fit_idx], num_classes, dict(params))
        val_top1 = top1_accuracy(predict(val_x), train_t[val_idx])
        if val_top1 > best_val:
            best_params, best_val = dict(params), val_top1
    del fit_x, val_x
    full_x, test_x = standardize(train_x, test_x.to(device=device, dtype=dtype))
    predict = fit(full_x, train_t, num_classes, best_params)
    predictions = classes[predict(test_x)].cpu()  # [M], label values
    return ProbeResult(
        top1=top1_accuracy(predictions, test_y),
        val_top1=best_val,
        params=best_params,
        num_train=int(train_x.shape[0]),
        num_test=int(test_x.shape[0]),
        feature_dim=int(train_x.shape[1]),
        predictions=predictions,
    )
