"""Helpers shared by the reliability tests: a straight reference run, checkpoint reading, the CLI
as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from wildsight.train import checkpoint

REPO = Path(__file__).resolve().parents[2]


def model_at(run_or_ckpt: Path) -> dict[str, torch.Tensor]:
    """The method's state dict in a run directory's latest checkpoint, or in one ckpt-* dir."""
    path = run_or_ckpt / "checkpoints" if (run_or_ckpt / "checkpoints").is_dir() else run_or_ckpt
    tensors, state = checkpoint.load_checkpoint(path)
    return checkpoint.unflatten_state(tensors, state["tensor_meta"])["model"]


def pretrain_killed_at_step(tree: dict, step: int, monkeypatch) -> None:  # noqa: ANN001
    """Run the SwAV config `tree` and kill it (KeyboardInterrupt) as step `step` ends, before
    that step's checkpoint; what it saved before stays on disk for a --resume."""
    import pytest

    from wildsight import api, config
    from wildsight.methods.swav import SwAV

    original = SwAV.after_step

    def crash(self, at, output):  # noqa: ANN001, ANN202
        if at == step:
            raise KeyboardInterrupt("simulated kill")
        return original(self, at, output)

    with monkeypatch.context() as patch:
        patch.setattr(SwAV, "after_step", crash)
        with pytest.raises(KeyboardInterrupt):
            api.pretrain(config.load(tree))


def checkpoint_step(run_dir: Path) -> int:
    _, state = checkpoint.load_checkpoint(run_dir / "checkpoints")
    return int(state["train"]["step"])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical, buffers (queue, BN) included


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def cli_env() -> dict[str, str]:
    """The test process's environment with one compute thread, as the in-process runs use
    (conftest), so that a run in a subprocess is bit-identical to one in the test process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m wildsight ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "wildsight", *args],
        capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=REPO,
    )  # fmt: skip


def cli_popen(*args: str, code: str = "", **kwargs) -> subprocess.Popen:
    """A pretrain in the background; `code` runs first in that process (e.g. a patch)."""
    script = f"import sys\n{code}\nfrom wildsight.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=cli_env(), cwd=REPO, **kwargs,
    )  # fmt: skip


def crash_then_resume(monkeypatch, cls: type, tree: dict, *, crash_step: int = 4):  # noqa: ANN001, ANN201
    """Runs `tree` with `cls.after_step` raising at `crash_step` (a simulated kill after the
    forward/backward of that step), then resumes it; returns the resumed TrainResult."""
    import pytest

    from wildsight import api, config

    original = cls.after_step

    def crash(self, step, output):  # noqa: ANN001, ANN202
        if step == crash_step:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step, output)

    monkeypatch.setattr(cls, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        api.pretrain(config.load(tree))
    monkeypatch.setattr(cls, "after_step", original)
    return api.pretrain(config.load(tree), resume=True)
