"""Linear probe by mini-batch SGD with a decaying LR: the same objective as the L-BFGS probe.

"Revisiting self-supervised learning" (Kolesnikov et al., 2019, §3 and App.) trains the
linear model full-batch with L-BFGS and notes that SGD reaches the same accuracy only with many
epochs and a decaying learning rate. Here SGD with heavy-ball momentum minimises

    J(W, b) = (1/n) sum_i -log softmax(W x_i + b)[y_i]  +  (l2 / 2) ||W||_F^2

(``linear.logistic_objective``) on shuffled mini-batches, with a cosine LR decay to zero
(Loshchilov & Hutter, 2017), which lets the iterates settle at J's minimiser instead of
bouncing around it. LR and l2 are chosen on a held-out split of the training set
(``linear.select_on_train_split``), never on the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from wildsight.eval.linear import (
    LogisticFit,
    _objective_and_grad,
    logistic_objective,
    select_on_train_split,
)
from wildsight.eval.report import ProbeResult
from wildsight.train.schedules import warmup_cosine

SGD_LR_GRID: tuple[float, ...] = (0.1, 0.03)  # on standardised features, mean loss per batch
SGD_L2_GRID: tuple[float, ...] = (1e-3, 1e-4, 1e-5)  # strongest first: ties keep it
SGD_EPOCHS = 20


def fit_logistic_sgd(
    x: Tensor,
    y: Tensor,
    l2: float,
    *,
    lr: float,
    epochs: int = SGD_EPOCHS,
    batch_size: int = 256,
    momentum: float = 0.9,
    num_classes: int | None = None,
    seed: int = 0,
) -> LogisticFit:
    """Minimise J(W, b) with SGD: lr_t = cosine(lr -> 0) over all steps, momentum 0.9.

    x float [N, D], y int64 [N] in [0, K). Each epoch visits a fresh permutation drawn from a
    CPU generator seeded with ``seed`` (the same fit on every machine). The mini-batch gradient
    is the closed form of ``linear._objective_and_grad`` on the batch (mean over the batch, plus
    l2 W), so no autograd graph is built. ``iterations`` counts SGD steps.
    """
    if l2 < 0 or lr <= 0 or epochs < 1 or batch_size < 1 or not 0 <= momentum < 1:
        raise ValueError(
            f"SGD probe needs l2 >= 0, lr > 0, epochs >= 1, batch_size >= 1, 0 <= momentum < 1; "
            f"got l2={l2}, lr={lr}, epochs={epochs}, batch_size={batch_size}, momentum={momentum}"
        )
    if x.dtype not in (torch.float32, torch.float64) or x.ndim != 2:
        raise ValueError(f"x must be a float32/64 [N, D] tensor, got {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    y = y.to(device=x.device, dtype=torch.long)
    weight = torch.zeros(k, d, dtype=x.dtype, device=x.device)  # [K, D]
    bias = torch.zeros(k, dtype=x.dtype, device=x.device)  # [K]
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    steps_per_epoch = -(-n // batch_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)  # [N]
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]  # [B]
            _, grad_w, grad_b = _objective_and_grad(x[idx], y[idx], weight, bias, l2)
            lr_t = warmup_cosine(step, base=lr, warmup_steps=0, total_steps=total_steps)
            velocity_w.mul_(momentum).add_(grad_w)  # v <- m v + g
            velocity_b.mul_(momentum).add_(grad_b)
            weight.sub_(lr_t * velocity_w)  # W <- W - lr_t v
            bias.sub_(lr_t * velocity_b)
            step += 1
    objective = float(logistic_objective(x, y, weight, bias, l2))
    return LogisticFit(weight, bias, objective, step)


def linear_probe_sgd(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    lr_grid: Sequence[float] = SGD_LR_GRID,
    l2_grid: Sequence[float] = SGD_L2_GRID,
    epochs: int = SGD_EPOCHS,
    batch_size: int = 256,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Linear probe trained by SGD; (lr, l2) chosen on a split of TRAIN, test scored once.

    train_x [N, D], train_y int [N]; test_x [M, D], test_y int [M]. Features are standardised
    with training statistics as in ``linear_probe``. The grid is every (l2, lr) pair, strongest
    l2 first; with the defaults 6 fits of 20 epochs on 80% of TRAIN, then one refit.
    """
    if not lr_grid or not l2_grid:
        raise ValueError(
            f"SGD probe needs non-empty grids, got lr {list(lr_grid)}, l2 {list(l2_grid)}"
        )
    candidates = [
        {"lr": float(lr), "l2": float(l2)}
        for l2 in sorted(set(l2_grid), reverse=True)
        for lr in lr_grid
    ]

    def fit(
        x: Tensor, t: Tensor, num_classes: int, params: dict[str, Any]
    ) -> Callable[[Tensor], Tensor]:
        model = fit_logistic_sgd(
            x, t, params["l2"], lr=params["lr"], epochs=epochs, batch_size=batch_size,
            num_classes=num_classes, seed=seed,
        )  # fmt: skip
        return model.predict

    return select_on_train_split(
        "SGD linear probe", train_x, train_y, test_x, test_y, candidates=candidates, fit=fit,
        val_fraction=val_fraction, seed=seed, device=device,
    )  # fmt: skip
