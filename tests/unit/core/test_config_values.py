"""Values that cannot train are refused when the config is loaded (before a run directory is
touched), in one line that names the key path and the value as the user gave it."""

from __future__ import annotations

import pytest

from wildsight import config
from wildsight.config import ConfigError
from wildsight.train.resolve import pick_device


def group(**changes) -> dict:
    return {"count": 2, "size": 16, "scale": [0.3, 1.0]} | changes


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        # cadences: 0 divided the step count (ZeroDivisionError after the first step)
        ({"train": {"checkpoint_every_steps": 0}}, "train.checkpoint_every_steps must be >= 1, got 0"),
        ({"train": {"checkpoint_every_steps": -2}}, "train.checkpoint_every_steps must be >= 1, got -2"),
        ({"train": {"log_every_steps": 0}}, "train.log_every_steps must be >= 1, got 0"),
        ({"train": {"keep_last": 0}}, "train.keep_last must be >= 1, got 0"),
        ({"train": {"max_nonfinite_steps_in_a_row": 0}},
         "train.max_nonfinite_steps_in_a_row must be >= 1, got 0"),
        ({"train": {"checkpoint_every_s": 0}}, "train.checkpoint_every_s must be > 0, got 0.0"),
        # the LR as given, not the batch-scaled value (-1 * 8 / 256 = -0.03125)
        ({"optim": {"lr": -1}, "train": {"batch_size": 8}}, "optim.lr must be > 0, got -1.0"),
        ({"optim": {"final_lr": 0.5, "lr": 0.3}},
         "optim.final_lr must satisfy 0 <= final_lr <= optim.lr (0.3), got 0.5"),
        ({"optim": {"start_lr": -0.1}}, "optim.start_lr must be >= 0, got -0.1"),
        ({"optim": {"momentum": 1.0}}, "optim.momentum must satisfy 0 <= momentum < 1, got 1.0"),
        ({"optim": {"weight_decay": -1e-6}}, "optim.weight_decay must be >= 0, got -1e-06"),
        ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps must be >= 0, got -1"),
        ({"optim": {"plateau_window_steps": 0}}, "optim.plateau_window_steps must be >= 1, got 0"),
        # non-finite values pass every `<` comparison: each is named before any range check
        ({"optim": {"lr": float("nan")}}, "optim.lr must be a finite number, got nan"),
        ({"optim": {"final_lr": float("inf")}}, "optim.final_lr must be a finite number, got inf"),
        ({"optim": {"momentum": float("nan")}}, "optim.momentum must be a finite number, got nan"),
        ({"optim": {"weight_decay": float("nan")}},
         "optim.weight_decay must be a finite number, got nan"),
        ({"train": {"time_budget_s": float("nan")}},
         "train.time_budget_s must be a finite number, got nan"),
        ({"method": {"name": "swav", "temperature": float("inf")}},
         "method.temperature must be a finite number, got inf"),
        ({"train": {"device": "gpu"}},
         "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ({"train": {"device": "cuda:x"}},
         "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
        # views: the problem and its key path, not "expected ViewSpec | None, got {...}"
        ({"views": {"groups": [group(count=0)]}}, "views.groups[0].count must be >= 1, got 0"),
        ({"views": {"groups": [group(), group(scale=[1.5, 0.2])]}},
         "views.groups[1].scale must satisfy 0 < lo <= hi <= 1, got [1.5, 0.2]"),
        ({"views": {"groups": []}}, "views.groups must list at least one group"),
        ({"views": {}}, "views.groups is required"),
        ({"views": {"groups": [{"count": 2, "size": 16}]}}, "views.groups[0].scale is required"),
        ({"views": {"groups": [group(size=0)]}}, "views.groups[0].size must be >= 1 pixel, got 0"),
        ({"views": {"groups": [group(augment={"flip_p": 1.5})]}},
         "views.groups[0].augment.flip_p must be a probability in [0, 1], got 1.5"),
        ({"views": {"groups": [group(count="two")]}},
         "views.groups[0].count: expected an integer, got 'two'"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_its_key(tree, message):
    with pytest.raises(ConfigError) as err:
        config.load(tree)
    assert str(err.value) == message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_every_documented_device_form_loads(device):
    assert config.load({"train": {"device": device}}).train.device == device


def test_pick_device_refuses_an_unknown_name_instead_of_a_torch_message():
    with pytest.raises(
        ConfigError, match=r"^device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'$"
    ):
        pick_device("gpu")
    assert pick_device("cpu").type == "cpu"


def test_an_optional_key_reports_its_own_problem():
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer, got 'ten'$"):
        config.load({"train": {"steps": "ten"}})


def test_an_empty_config_file_is_named_not_read_as_all_defaults(tmp_path):
    (tmp_path / "config.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError) as err:
        config.read_yaml(tmp_path)
    assert str(err.value) == (
        f"config file {str(tmp_path / 'config.yaml')!r} is empty; it must hold a mapping of "
        "config keys"
    )
