"""MLP probe: one hidden layer on frozen features, the non-linear check of the linear probe.

"Revisiting self-supervised learning" (Kolesnikov et al., 2019, §4.3) probes the same frozen
representations with an MLP (one hidden layer, BatchNorm, ReLU) and finds it ranks models
like the linear probe. The probe is Linear(D, H) -> BatchNorm1d(H) -> ReLU -> Linear(H, K),
trained with AdamW and a cosine LR decay on mini-batches of standardised features; weight
decay is chosen on a held-out split of the training set (``linear.select_on_train_split``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.eval.linear import select_on_train_split
from wildsight.eval.report import ProbeResult
from wildsight.train.schedules import warmup_cosine

MLP_HIDDEN_DIM = 256
MLP_WD_GRID: tuple[float, ...] = (0.1, 1e-3)  # AdamW decoupled weight decay, strongest first
MLP_LR = 1e-3
MLP_EPOCHS = 10


class MLPProbe(nn.Module):
    """Linear(D, H) -> BatchNorm1d(H) -> ReLU -> Linear(H, K): features [B, D] -> logits [B, K]."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_dim, bias=False)  # BN's shift is the bias
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.out = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.bn(self.hidden(x))))  # [B, K]

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Class index int64 [N] of x [N, D], in eval mode (BN running statistics)."""
        was_training = self.training
        self.eval()
        try:
            parts = [
                self(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(parts)


def fit_mlp(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    hidden_dim: int = MLP_HIDDEN_DIM,
    weight_decay: float = 1e-3,
    lr: float = MLP_LR,
    epochs: int = MLP_EPOCHS,
    batch_size: int = 256,
    seed: int = 0,
) -> MLPProbe:
    """Train an MLPProbe on x float [N, D], y int64 [N] in [0, K) with AdamW, cosine LR to 0.

    Initial weights and the batch order come from ``seed`` (CPU generators), so the fit is
    the same on every run. A last batch of one example is dropped (BatchNorm needs two).
    """
    if hidden_dim < 1 or epochs < 1 or batch_size < 2 or lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"MLP probe needs hidden_dim >= 1, epochs >= 1, batch_size >= 2, lr > 0, "
            f"weight_decay >= 0; got {hidden_dim}, {epochs}, {batch_size}, {lr}, {weight_decay}"
        )
    n = x.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLPProbe(x.shape[1], hidden_dim, num_classes).to(device=x.device, dtype=x.dtype)
    y = y.to(device=x.device, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * -(-n // batch_size)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)  # [N]
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]  # [B]
            if idx.numel() < 2:
                continue
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, base=lr, warmup_steps=0, total_steps=total_steps)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


def mlp_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    hidden_dim: int = MLP_HIDDEN_DIM,
    wd_grid: Sequence[float] = MLP_WD_GRID,
    lr: float = MLP_LR,
    epochs: int = MLP_EPOCHS,
    batch_size: int = 256,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """MLP probe: weight decay chosen on a split of TRAIN, refit on all of TRAIN, TEST once.

    train_x [N, D], train_y int [N]; test_x [M, D], test_y int [M]; features standardised with
    training statistics, as for the linear probe.
    """
    if not wd_grid:
        raise ValueError("MLP probe needs at least one weight decay in wd_grid")
    candidates = [{"weight_decay": float(wd)} for wd in sorted(set(wd_grid), reverse=True)]

    def fit(
        x: Tensor, t: Tensor, num_classes: int, params: dict[str, Any]
    ) -> Callable[[Tensor], Tensor]:
        return fit_mlp(
            x, t, num_classes=num_classes, hidden_dim=hidden_dim, weight_decay=params["weight_decay"],
            lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
        ).predict  # fmt: skip

    result = select_on_train_split(
        "MLP probe", train_x, train_y, test_x, test_y, candidates=candidates, fit=fit,
        val_fraction=val_fraction, seed=seed, device=device,
    )  # fmt: skip
    params = {**result.params, "hidden_dim": hidden_dim, "epochs": epochs, "lr": lr}
    return ProbeResult(
        result.top1, result.val_top1, params, result.num_train, result.num_test,
        result.feature_dim, predictions=result.predictions,
    )  # fmt: skip
