"""Optimisers: LARS as SwAV/SEER ran it, parameter groups that exclude bias and norm, a builder.

SEER (Goyal et al., 2021): "LARS (momentum 0.9, trust coefficient 0.001; bias and norm
parameters excluded from weight decay and from the LARS scaling), weight decay 1e-5".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LARS", "OPTIMIZERS", "TRUST_NORMS", "build_optimizer", "param_groups"]

TRUST_NORMS = ("sum_of_norms", "norm_of_sum")  # LARC (SwAV, SEER); SimCLR's and BYOL's LARS
# what the momentum buffer sums: gradients, the LR applied after (torch SGD, so LARC in SwAV and
# SEER; BYOL's optax chain too), or updates already scaled by their step's LR (SimCLR's TF LARS)
MOMENTUM_OF = ("gradient", "update")


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SwAV/SEER: SGD momentum with a per-parameter trust ratio.

    This is exactly SwAV's ``LARC(SGD(momentum=0.9), trust_coefficient=0.001, clip=False)``
    (apex ``LARC.py``) folded into one optimiser. For each parameter p with gradient g, in
    a group with learning rate lr, momentum m, weight decay wd and trust coefficient eta:

        if ||p|| > 0 and ||g|| > 0:          # ||.||: L2 norm over all elements
            g <- (g + wd * p) * eta * ||p|| / (||g|| + wd * ||p|| + eps)
        buf <- m * buf + g                   # buf starts at 0
        p   <- p - lr * buf

    The norm in the denominator is the one LARC uses: ``||g||`` is the norm of the raw
    gradient BEFORE weight decay is added, and ``wd * ||p||`` is added to it (an upper bound
    of ``||g + wd * p||``, equal when g and p are parallel). When ``||p|| == 0`` or
    ``||g|| == 0`` LARC leaves the gradient unscaled and adds no weight decay; so does this.
    The trust ratio never depends on lr (``clip=False``), so the LR schedule and the ratio
    multiply.

    ``trust_norm="norm_of_sum"`` (a group key, or the constructor's default) is the form of
    SimCLR's and BYOL's LARS instead: weight decay is added first and the ratio is taken of
    the norm of the sum, ``d = g + wd * p; g <- d * eta * ||p|| / ||d||`` (``d`` unscaled where
    ``||p||`` or ``||d||`` is 0). It differs from LARC's ratio when g and p are not parallel
    (by up to 1/sqrt(2), at g perpendicular to p and ||g|| == wd * ||p||).

    ``momentum_of="update"`` keeps the LR inside the momentum buffer as SimCLR's TF LARS
    does (``buf <- m * buf + lr * g; p <- p - buf``): the same steps at a constant LR,
    but while the LR warms up or decays, earlier steps keep the LR they were taken with.

    A param group with ``"lars_exclude": True`` gets neither the trust ratio nor any special
    treatment: ``g <- g + wd * p`` with the group's own wd (0 for bias/norm from
    ``param_groups``), then the same momentum update, i.e. plain ``torch.optim.SGD``.

    State per parameter: ``"momentum_buffer"`` (as ``torch.optim.SGD``), absent when m == 0.
    The update is computed without host synchronisation (``torch.where``, no ``.item()``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_norm: str = "sum_of_norms",
        momentum_of: str = "gradient",
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if trust_norm not in TRUST_NORMS:
            raise ValueError(f"trust_norm must be one of {TRUST_NORMS}, got {trust_norm!r}")
        if momentum_of not in MOMENTUM_OF:
            raise ValueError(f"momentum_of must be one of {MOMENTUM_OF}, got {momentum_of!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "trust_norm": trust_norm,
            "momentum_of": momentum_of,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            eta, eps, excluded = group["trust_coefficient"], group["eps"], group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                if excluded:
                    if wd != 0.0:
                        g = g.add(p, alpha=wd)
                elif group["trust_norm"] == "norm_of_sum":  # SimCLR / BYOL
                    d = g.add(p, alpha=wd) if wd != 0.0 else g
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    apply = (p_norm > 0) & (d_norm > 0)
                    g = torch.where(apply, d * (eta * p_norm / d_norm.clamp(min=1e-30)), d)
                else:
                    p_norm = torch.linalg.vector_norm(p)  # 0-d
                    g_norm = torch.linalg.vector_norm(g)  # 0-d, raw gradient (LARC)
                    apply = (p_norm > 0) & (g_norm > 0)
                    ratio = eta * p_norm / (g_norm + wd * p_norm + eps)
                    # LARC: scaled (g + wd p) where the norms are positive, else g untouched.
                    g = torch.where(apply, g.add(p, alpha=wd) * ratio, g)
                step_lr = lr
                if group["momentum_of"] == "update":  # SimCLR: the LR inside the buffer
                    g, step_lr = g * lr, 1.0
                if momentum != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf.mul_(momentum).add_(g)
                    g = buf
                p.add_(g, alpha=-step_lr)
        return loss


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_bias_and_norm: bool = True,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed group and a bias/norm group.

    Every parameter with ``ndim <= 1`` (BN/LN/GN weights and biases, conv/linear biases,
    scalars) goes to a group with ``weight_decay=0.0`` and ``lars_exclude=True``; all others
    get ``weight_decay`` and the LARS trust ratio. With ``exclude_bias_and_norm=False`` there
    is a single group. Parameters with ``requires_grad=False`` (e.g. a BYOL target network)
    are left out; shared parameters appear once. Empty groups are dropped. Each group has a
    ``"name"`` ("decay" or "no_decay") for logging and an ``"lr_scale"`` (1.0): the trainer
    sets each group's LR to the scheduled LR times its scale.

    ``lr_scales`` maps a submodule name of ``model`` (e.g. ``"predictor"``) to the LR multiplier
    of its parameters: they get groups of their own, named "decay@predictor" etc. A name that
    is not a submodule of ``model``, or a scale that is not > 0, is a ValueError.
    """
    scales = dict(lr_scales or {})
    modules = dict(model.named_modules())
    for prefix, factor in scales.items():
        if not prefix or prefix not in modules:
            raise ValueError(f"lr_scales names {prefix!r}, which is not a submodule of the model")
        if not factor > 0:
            raise ValueError(f"lr_scales[{prefix!r}] must be > 0, got {factor}")

    def owner(name: str) -> str:  # the longest scaled prefix a parameter lies under, or ""
        hits = [k for k in scales if name == k or name.startswith(k + ".")]
        return max(hits, key=len, default="")

    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for prefix in ["", *scales]:
        for decayed in (True, False):
            buckets[(prefix, decayed)] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (exclude_bias_and_norm and p.ndim <= 1)
        buckets[(owner(name), decayed)].append(p)
    groups: list[dict[str, Any]] = []
    for (prefix, decayed), params in buckets.items():
        if not params:
            continue
        base = "decay" if decayed else "no_decay"
        groups.append({
            "name": f"{base}@{prefix}" if prefix else base, "params": params,
            "weight_decay": weight_decay if decayed else 0.0, "lars_exclude": not decayed,
            "lr_scale": float(scales.get(prefix, 1.0)),
        })  # fmt: skip
    return groups


def _lars(groups: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _sgd(groups: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adamw(groups: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    # momentum is AdamW's beta1 (the EMA rate of the gradient); beta2 stays at 0.999.
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[[Any, float, float, float], torch.optim.Optimizer]] = {
    "lars": _lars,
    "sgd": _sgd,
    "adamw": _adamw,
}


def build_optimizer(
    name: str, groups: Any, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Build ``OPTIMIZERS[name]`` over ``groups`` (from ``param_groups`` or plain parameters).

    ``weight_decay`` is the default for groups that do not set their own (``param_groups``
    sets it on both groups). For "adamw", ``momentum`` is beta1. The ``lars_exclude`` key is
    ignored by "sgd" and "adamw"; its group's ``weight_decay=0`` still applies.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](groups, lr, momentum, weight_decay)
