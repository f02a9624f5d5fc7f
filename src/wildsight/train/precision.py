"""Mixed precision: one context manager, chosen by name.

SEER trained with fp16 (Apex O1); bf16 needs no loss scaling, so it is the only reduced
precision offered. Code that must stay in float32 under autocast (Sinkhorn codes, whose
``exp(score / 0.05)`` overflows 16-bit types) casts explicitly.

"auto" picks bf16 only where the hardware computes it natively: a CUDA device that supports
it, or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32
(measured 4x slower for a 1024^2 matmul on an AVX-512 CPU without the BF16 extension).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast", "native_bf16", "resolve_precision"]

PRECISIONS = ("fp32", "bf16", "auto")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, assume no native bf16
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matrix math runs in hardware on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """ "fp32" or "bf16": "auto" becomes bf16 where `native_bf16(device)`, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """No autocast for "fp32"; ``torch.autocast(device.type, dtype=torch.bfloat16)`` for "bf16"."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
