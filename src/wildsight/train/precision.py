"""Mixed precision: one context manager, chosen by name.

SEER trained with fp16 (Apex O1); bf16 needs no loss scaling, so it is the only reduced
precision offered. Code that must stay in float32 under autocast (Sinkhorn codes, whose
``exp(score / 0.05)`` overflows 16-bit types) casts explicitly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast"]

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """No autocast for "fp32"; ``torch.autocast(device.type, dtype=torch.bfloat16)`` for "bf16"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
