"""Typed, strict run configuration: frozen dataclasses, loaded from YAML + command-line overrides.

An unknown key is a one-line error naming the key and its nearest valid spelling; a value of the
wrong type names the key, the expected type and what was given. Each component receives only its
own section (`SwAV(backbone, views, cfg.method)`). The resolved config is written to every run
directory, and `--config RUN_DIR/config.yaml` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from wildsight.methods import MethodConfig, method_config_class
from wildsight.views import AugmentSpec, CropGroup, SpecError, ViewSpec

# a YAML 1.2 float such as 1e-5 or 3E4, which PyYAML (YAML 1.1) leaves as a string
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line and names the key."""


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ("fmnist:train",)
    image_size: int = (
        0  # side of the square images handed to the views; 0 = 28 for fmnist, else 256
    )
    num_workers: int = 2
    max_skip_fraction: float = 0.5
    # pretraining crops cover the whole picture (stored squashed to image_size, with its aspect
    # ratio; data/decode.decode_whole) as SwAV/SEER/SimCLR/BYOL crop it; false: its centre
    # square only. Evaluations always use the centre square.
    whole_images: bool = True


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet50"
    small_input: bool | None = None  # None = small stem when image_size <= 64
    grad_checkpointing: bool = False
    # channels-last memory: 1.5x faster for RegNetX-200MF on this CPU (benchmarks/fmnist.py), but
    # measured 1.5-3x SLOWER for grouped-conv RegNetY on GPUs (SPEC §4): off unless measured.
    channels_last: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """LR values are per `lr_batch_reference` images and scaled linearly with the global batch."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.3  # SwAV/SEER: 4.8 at batch 4096 = 9.6 at 8192 = 0.3 per 256
    start_lr: float = 0.0
    final_lr: float = 0.0003
    lr_batch_reference: int = 256
    schedule: Literal["cosine", "plateau", "constant", "step"] = "cosine"
    warmup_steps: int = 0
    # schedule "step" (Revisiting's pretext training): LR x lr_decay_factor at each fraction
    # of the run in lr_decay_at (15/35 and 25/35 of 35 epochs), after the linear warm-up
    lr_decay_at: tuple[float, ...] = ()
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    # LARS's ratio eta ||w|| / (||g|| + wd ||w||) as LARC (SwAV, SEER), or eta ||w|| / ||g + wd w||
    # as SimCLR's and BYOL's LARS
    trust_norm: Literal["sum_of_norms", "norm_of_sum"] = "sum_of_norms"
    # LARS's momentum sums gradients, the LR applied after (torch SGD: SwAV, SEER; BYOL's optax
    # chain), or updates already scaled by their step's LR (SimCLR's TF LARS)
    momentum_of: Literal["gradient", "update"] = "gradient"
    exclude_bias_and_norm: bool = True
    clip_grad_norm: float = 0.0  # 0 = off
    plateau_patience_steps: int = 2000
    plateau_window_steps: int = 500


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/pretrain"
    steps: int | None = None
    epochs: float | None = None
    time_budget_s: float | None = None
    batch_size: int = 256  # global batch, over all processes
    precision: Literal["fp32", "bf16", "auto"] = "auto"  # auto: bf16 where the hardware has it
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    checkpoint_every_steps: int = 1000
    checkpoint_every_s: float | None = None  # also checkpoint when this much wall time has passed
    online: bool = False  # SEER online: read the stream forever (stop with SIGTERM/SIGINT)
    keep_last: int = 3
    log_every_steps: int = 10
    progress: bool = True
    init_from: str | None = None  # run or checkpoint directory: its weights, a fresh optimizer
    max_nonfinite_steps_in_a_row: int = 20  # skipped NaN/inf steps before the run stops
    # several processes (torchrun), train/parallel.py: DDP replicates the model, FSDP shards it
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # BN statistics over groups of this many processes (SEER: 64); >= the process count: global BN
    syncbn_group_size: int = 0
    accumulate_steps: int = 1  # micro-batches per optimizer step (batch_size is per step, global)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=lambda: method_config_class("swav")())
    views: ViewSpec | None = None  # None = default_views(image_size, method)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        sections = {"data": self.data, "method": self.method, "optim": self.optim,
                    "train": self.train}  # fmt: skip
        for name, section in sections.items():  # nan passes every `<` check: refuse it here
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{name}.{f.name} must be a finite number, got {value}")
        _check_train(self.train)
        _check_optim(self.optim)
        if self.data.image_size < 0:
            raise ConfigError(f"data.image_size must be >= 0, got {self.data.image_size}")
        if not self.data.sources:
            raise ConfigError("data.sources is empty; pass --data SOURCE")


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # train.device, --device


def _check_train(t: TrainConfig) -> None:
    if t.batch_size < 2:
        raise ConfigError(f"train.batch_size must be >= 2, got {t.batch_size}")
    if t.syncbn_group_size < 0 or t.accumulate_steps < 1:  # parallel keys (train/parallel.py)
        raise ConfigError(
            "train.syncbn_group_size must be >= 0 (0 = off) and train.accumulate_steps >= 1, "
            f"got {t.syncbn_group_size} and {t.accumulate_steps}"
        )
    # cadences (steps between checkpoints / log lines) and counts: 0 would divide by zero
    for key in ("checkpoint_every_steps", "log_every_steps", "keep_last",
                "max_nonfinite_steps_in_a_row"):  # fmt: skip
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.checkpoint_every_s is not None and t.checkpoint_every_s <= 0:
        raise ConfigError(f"train.checkpoint_every_s must be > 0, got {t.checkpoint_every_s}")
    for key in ("steps", "epochs", "time_budget_s"):
        value = getattr(t, key)
        if value is not None and value <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {value}")
    if not DEVICE_PATTERN.fullmatch(t.device):
        raise ConfigError(
            f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {t.device!r}"
        )


def _check_optim(o: OptimConfig) -> None:
    """The values as given (before the linear batch scaling), so the message quotes them."""
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not 0 <= o.final_lr <= o.lr:
        raise ConfigError(
            f"optim.final_lr must satisfy 0 <= final_lr <= optim.lr ({o.lr}), got {o.final_lr}"
        )
    if o.start_lr < 0:
        raise ConfigError(f"optim.start_lr must be >= 0, got {o.start_lr}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must satisfy 0 <= momentum < 1, got {o.momentum}")
    for key in ("weight_decay", "clip_grad_norm", "warmup_steps"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key} must be >= 0, got {getattr(o, key)}")
    if o.trust_coefficient <= 0:
        raise ConfigError(f"optim.trust_coefficient must be > 0, got {o.trust_coefficient}")
    if o.schedule == "step" and not o.lr_decay_at:
        raise ConfigError("optim.schedule 'step' needs optim.lr_decay_at, e.g. [0.4286, 0.7143] "
                          "(LR / 10 at epochs 15 and 25 of 35)")  # fmt: skip
    if any(not 0 < m < 1 for m in o.lr_decay_at) or list(o.lr_decay_at) != sorted(o.lr_decay_at):
        raise ConfigError(f"optim.lr_decay_at must be increasing fractions of the run in (0, 1), "
                          f"got {list(o.lr_decay_at)}")  # fmt: skip
    if not 0 < o.lr_decay_factor <= 1:
        raise ConfigError(f"optim.lr_decay_factor must be in (0, 1], got {o.lr_decay_factor}")
    for key in ("lr_batch_reference", "plateau_patience_steps", "plateau_window_steps"):
        if getattr(o, key) < 1:
            raise ConfigError(f"optim.{key} must be >= 1, got {getattr(o, key)}")


# ----------------------------------------------------------------------------- conversion


def _fail(path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {message}" if path else message)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # `X | None`: X's own error says what is wrong
            return _convert(candidates[0], value, path)
        errors = []
        for arg in candidates:
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        _fail(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            _fail(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            _fail(path, f"expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads `1e-5` (YAML 1.1: no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug, not user input


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, refusing unknown keys and ill-typed values."""
    if cls is MethodConfig or path == "method":
        if not isinstance(data, Mapping):
            _fail(path, f"expected a mapping with a 'name', got {data!r}")
        try:
            cls = method_config_class(str(data.get("name", "swav")))
        except ValueError as err:
            _fail(f"{path}.name", str(err))
    if not isinstance(data, Mapping):
        _fail(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            _fail(f"{path}.{key}" if path else str(key), f"unknown config key{hint}")
        kwargs[key] = _convert(hints[key], value, f"{path}.{key}" if path else key)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key not in kwargs:
            raise ConfigError(f"{path}.{key} is required" if path else f"{key} is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except SpecError as err:  # a view field: name its key path (`views.groups[0].count ...`)
        raise ConfigError(f"{path}.{err.field} {err.problem}" if path else str(err)) from None
    except (ValueError, TypeError) as err:
        _fail(path, str(err))


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def merge(base: dict, override: Mapping) -> dict:
    """Recursive dict merge; a changed method name drops the old method's keys."""
    out = dict(base)
    for key, value in override.items():
        if key == "method" and isinstance(value, Mapping) and "name" in value:
            if (
                isinstance(out.get("method"), Mapping)
                and out["method"].get("name") != value["name"]
            ):
                out["method"] = {}
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def yaml12_value(raw: str) -> Any:
    """A `--set KEY=VALUE` value as YAML 1.2 reads it: PyYAML (YAML 1.1) leaves `1e-3` a string,
    this gives the float 0.001, so the CLI and the benchmarks (whose JSON records echo the
    overrides) hold the number."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def set_path(tree: dict, dotted: str, value: Any) -> dict:
    """{'a': {'b': 1}} with 'a.c', 2 -> {'a': {'b': 1, 'c': 2}} (a new dict)."""
    keys = dotted.split(".")
    override: dict = {}
    node = override
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return merge(tree, override)


def recipe_path(name: str) -> Path:
    """A named recipe shipped with the package (src/wildsight/recipes/NAME.yaml)."""
    folder = resources.files("wildsight") / "recipes"
    names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown recipe {name!r}; {hint}choose from {names}")
    return Path(str(folder / f"{name}.yaml"))


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir() and (p / "config.yaml").exists():
        p = p / "config.yaml"
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}"
        ) from None
    if data is None:  # an empty run config.yaml would silently mean "all defaults"
        raise ConfigError(f"config file {str(p)!r} is empty; it must hold a mapping of config keys")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load(tree: Mapping | None = None) -> Config:
    """Config from a plain mapping (e.g. read_yaml + merged overrides)."""
    return from_dict(Config, dict(tree or {}))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "AugmentSpec",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "CropGroup",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "ViewSpec",
    "dump",
    "from_dict",
    "load",
    "merge",
    "read_yaml",
    "recipe_path",
    "set_path",
    "to_dict",
]
