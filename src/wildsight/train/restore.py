"""How a run starts from saved weights: `--resume` (continue exactly) or `--init-from` (new run).

- `--resume` restores everything (model, optimizer, schedule, loader position, RNG). It is
  refused when the new config describes another model: another backbone or method, or any
  weight of another shape (a head resized, more prototypes, a queue added). The message names
  the config keys that differ. Budget, LR, logging, workers and checkpoint cadence may change.
- `--init-from` copies trained weights into a new run whose optimizer, schedule, step and
  loader start fresh. Same method: every tensor of the method (heads, prototypes, EMA target,
  queue). Another method: the backbone only. Either way the load is strict: a missing, extra
  or differently shaped tensor is an error naming it.

Both read checkpoints through `checkpoint.load_checkpoint` (safetensors + JSON, never pickle).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from wildsight.config import ConfigError
from wildsight.train import checkpoint

__all__ = [
    "check_out_folder",
    "init_from",
    "load_for_resume",
    "model_tensors",
    "read_for_resume",
    "resolve_checkpoint",
]

# config keys that define the model: a change here means the saved weights do not fit
ARCHITECTURE_KEYS = ("backbone.name", "backbone.small_input", "method.name")
ARCHITECTURE_PREFIXES = ("backbone.", "method.", "views.")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its checkpoints/), a checkpoints directory, its `latest` pointer file
    (= that directory) or one ckpt-* directory."""
    p = Path(path)
    if p.name == checkpoint.LATEST_FILE and p.is_file():
        return p.parent
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def model_tensors(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Tensor]:
    """The method's state dict out of a checkpoint's flat tensors and meta."""
    mine = {k: v for k, v in tensors.items() if k.startswith("model/")}
    return checkpoint.unflatten_state(mine, {"model": meta["model"]})["model"]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
    """{dotted key: (old, new)} for every leaf that differs (missing = None)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _shape_differences(saved: Mapping[str, Tensor], model: nn.Module) -> list[str]:
    """One phrase per tensor that is missing, extra or differently shaped."""
    mine = model.state_dict()
    out = [f"{k} missing from the checkpoint" for k in mine if k not in saved]
    out += [f"{k} not in the model" for k in saved if k not in mine]
    out += [
        f"{k} is {list(saved[k].shape)} in the checkpoint, {list(v.shape)} here"
        for k, v in mine.items()
        if k in saved and saved[k].shape != v.shape
    ]
    return out


def _describe(diffs: Mapping[str, tuple], limit: int = 6) -> str:
    shown = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diffs.items())[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(shown) + more


def check_out_folder(run_dir: Path, *, resume: bool, has_budget: bool) -> None:
    """Refuses, before anything is written, a new run into a folder that holds one (its
    checkpoints, metrics and evaluations would be overwritten or mixed up), and a resume
    with nothing to resume and no budget to start a new run with."""
    ckpt_dir = run_dir / "checkpoints"
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    if latest is not None and not resume:
        step = int(latest.name.removeprefix("ckpt-"))
        raise ConfigError(
            f"{str(run_dir)!r} holds a run at step {step}; continue it with --resume, "
            "or choose another --out / delete the folder"
        )
    if latest is None and resume and not has_budget:
        why = "checkpoints/ holds no checkpoint" if ckpt_dir.is_dir() else "no checkpoints/"
        raise ConfigError(
            f"no run in {str(run_dir)!r} to resume ({why}); drop --resume to start a new run"
        )


def read_for_resume(ckpt_dir: Path, new_config: Mapping[str, Any]) -> tuple[dict, dict] | None:
    """`(tensors, state)` of the run's latest checkpoint, None if it has none. Refuses
    (ConfigError) a config with another backbone or method before anything is built."""
    if checkpoint.latest_checkpoint(ckpt_dir) is None:
        foreign = sorted(
            p.name
            for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else ())
            if not p.name.startswith((".tmp-", "ckpt-"))  # what a save killed mid-way leaves
        )
        if foreign:
            raise checkpoint.CheckpointError(
                f"{ckpt_dir} holds {foreign[0]!r} but no wildsight checkpoint (no 'latest'); "
                "wildsight never unpickles .pt/.pth files: move them away to start a new run"
            )
        return None
    tensors, state = checkpoint.load_checkpoint(ckpt_dir)
    diffs = config_differences(state["config"], new_config)
    arch = {k: v for k, v in diffs.items() if k in ARCHITECTURE_KEYS}
    if arch:
        raise _refuse(ckpt_dir.parent, arch)
    return tensors, state


def load_for_resume(
    model: nn.Module, saved: Mapping[str, Tensor], saved_config: Mapping, new_config: Mapping
) -> None:
    """Strict load; a tensor of another shape (a resized head, a queue added) is refused
    naming the config keys that changed under backbone/method/views."""
    shapes = _shape_differences(saved, model)
    if shapes:
        diffs = config_differences(saved_config, new_config)
        related = {k: v for k, v in diffs.items() if k.startswith(ARCHITECTURE_PREFIXES)}
        raise _refuse(Path(new_config["train"]["out"]), related, shapes[0])
    model.load_state_dict(saved, strict=True)


def _refuse(run_dir: Path, diffs: Mapping[str, tuple], shape: str = "") -> ConfigError:
    keys = _describe(diffs) if diffs else f"no config key, but {shape}"
    return ConfigError(
        f"cannot resume {run_dir}: its checkpoint holds another model ({keys}); resume with the "
        "run's own config, or start a new run with --init-from and another --out"
    )


def init_from(path: str | Path, method: nn.Module, config: Mapping[str, Any]) -> str:
    """Load trained weights into `method` (see module docstring); returns what was loaded."""
    ckpt_dir = resolve_checkpoint(path)
    try:
        tensors, state = checkpoint.load_checkpoint(ckpt_dir)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"--init-from: {err}") from err
    if not isinstance(state, Mapping) or "tensor_meta" not in state or "config" not in state:
        raise ConfigError(f"{path} is a checkpoint but not of a wildsight pretrain run")
    saved = model_tensors(tensors, state["tensor_meta"])
    saved_cfg = state["config"]
    fixed = ("backbone.name", "backbone.small_input")
    diffs = {k: v for k, v in config_differences(saved_cfg, config).items() if k in fixed}
    if diffs:
        raise ConfigError(
            f"cannot init from {path}: another backbone ({_describe(diffs)}); "
            "use the same backbone settings"
        )
    same_method = saved_cfg.get("method", {}).get("name") == config["method"]["name"]
    target: nn.Module = method if same_method else method.backbone  # type: ignore[assignment]
    if not same_method:
        prefix = "backbone."
        saved = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    problems = _shape_differences(saved, target)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ConfigError(
            f"cannot init from {path}: the weights do not fit ({'; '.join(problems[:3])}{more}); "
            "use the same method/head settings as that run"
        )
    target.load_state_dict(saved, strict=True)
    what = "all method weights" if same_method else "backbone weights"
    return f"{what} from {checkpoint.latest_checkpoint(ckpt_dir) or ckpt_dir}"
