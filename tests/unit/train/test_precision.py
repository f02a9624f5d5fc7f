"""precision="auto": bf16 only where the hardware has it; explicit names are kept."""

from __future__ import annotations

import pytest
import torch

from wildsight.train import precision


def test_auto_follows_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.resolve_precision("cpu", "auto") == "bf16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert precision.resolve_precision("cpu", "auto") == "bf16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    assert precision.resolve_precision("cpu", "auto") == "fp32"
    # under autocast "auto" without native bf16, a matmul stays float32
    a = torch.randn(4, 4)
    with precision.autocast("cpu", "auto"):
        assert (a @ a).dtype == torch.float32


def test_explicit_names_and_bad_name() -> None:
    assert precision.resolve_precision("cpu", "fp32") == "fp32"
    assert precision.resolve_precision("cpu", "bf16") == "bf16"
    a = torch.randn(4, 4)
    with precision.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        precision.resolve_precision("cpu", "fp16")


def test_cpu_flags_read_from_this_machine() -> None:
    flags = precision._cpu_flags()
    cpuinfo = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    assert ("avx512_bf16" in cpuinfo) == ("avx512_bf16" in flags)
