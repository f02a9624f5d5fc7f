"""Run metrics: one JSON line per log step (metrics.jsonl), TensorBoard scalars, a progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    """Appends metrics to RUN_DIR/metrics.jsonl and RUN_DIR/tb; shows step, loss, img/s and ETA.

    metrics.jsonl is opened in append mode and flushed per line, so a resumed run continues the
    same file and a crash loses at most the line being written.
    """

    def __init__(
        self, run_dir: Path, *, total_steps: int | None, initial_step: int, progress: bool
    ):
        self.run_dir = run_dir
        self._jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=initial_step or None)
        except ImportError:  # tensorboard is a declared dependency; degrade, don't die
            self._tb = None
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            leave=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line per 30 s
        )

    def set_total(self, total_steps: int) -> None:
        self._bar.total = total_steps  # shown at the next update

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {
            k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
            for k, v in metrics.items()
        }
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        shown = {"loss": metrics.get("loss"), "img/s": metrics.get("images_per_s")}
        self._bar.set_postfix(
            {k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, float)}, refresh=False
        )

    def message(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows
