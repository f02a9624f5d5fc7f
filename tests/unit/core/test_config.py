"""Strict typed configs: unknown keys and bad values are one-line errors; recipes all load."""

from importlib import resources

import pytest
import yaml

from wildsight import config
from wildsight.cli import main
from wildsight.methods import METHODS


def test_unknown_key_names_the_nearest_valid_spelling():
    with pytest.raises(
        config.ConfigError,
        match=r"method\.num_prototype: unknown config key; did you mean 'num_prototypes'",
    ):
        config.load({"method": {"name": "swav", "num_prototype": 10}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(
        config.ConfigError, match=r"train\.batch_size: expected an integer, got 'big'"
    ):
        config.load({"train": {"batch_size": "big"}})
    with pytest.raises(
        config.ConfigError, match=r"train\.precision: must be one of \['fp32', 'bf16', 'auto'\]"
    ):
        config.load({"train": {"precision": "fp16"}})


def test_unknown_method_is_refused_with_choices():
    with pytest.raises(config.ConfigError, match="unknown method 'swavv'; did you mean 'swav'"):
        config.load({"method": {"name": "swavv"}})


def test_dump_then_load_round_trips():
    cfg = config.load(
        {
            "train": {"steps": 5, "batch_size": 32},
            "views": {
                "groups": [
                    {"count": 2, "size": 32, "scale": [0.25, 1.0]},
                    {"count": 4, "size": 16, "scale": [0.1, 0.4]},
                ]
            },
        }
    )
    import yaml

    assert config.load(yaml.safe_load(config.dump(cfg))) == cfg


@pytest.mark.parametrize(
    "name",
    sorted(
        p.name[:-5]
        for p in (resources.files("wildsight") / "recipes").iterdir()
        if p.name.endswith(".yaml")
    ),
)
def test_every_recipe_is_a_valid_config(name):
    cfg = config.load(config.read_yaml(config.recipe_path(name)))
    assert type(cfg.method) is METHODS[cfg.method.name][1]  # `method.name` picks the config class


def test_seer_recipe_states_the_published_hyper_parameters():
    cfg = config.load(config.read_yaml(config.recipe_path("seer_regnety_256gf")))
    scale = cfg.train.batch_size / cfg.optim.lr_batch_reference
    assert cfg.optim.lr * scale == pytest.approx(9.6)
    assert cfg.optim.start_lr * scale == pytest.approx(0.15)
    assert cfg.optim.final_lr * scale == pytest.approx(0.0096)
    assert (cfg.method.num_prototypes, cfg.method.sinkhorn_iterations, cfg.method.out_dim) == (
        16384,
        10,
        256,
    )
    assert cfg.method.hidden_dims == (8192, 8192) and not cfg.method.head_batchnorm


def test_cli_bad_values_are_one_line_errors_with_exit_code_2(capsys, tmp_path):
    assert main(["pretrain", "--data", "fmnist:train", "--steps", "1", "--set", "method.epsilonn=0.1",
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'epsilon'" in err
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(tmp_path / "nowhere"),
                "--steps",
                "1",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err
    assert main(["pretrain", "--recipe", "fmnist_dem"]) == 2
    assert "did you mean 'fmnist_demo'" in capsys.readouterr().err


def test_exponent_floats_without_a_dot_are_numbers_in_yaml_files_and_overrides(tmp_path):
    # PyYAML follows YAML 1.1, where `1e-5` (no dot) is the string "1e-5"; users write it anyway
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  weight_decay: 1e-5\n  lr: 3E-1\n")
    tree = config.read_yaml(path)
    tree = config.set_path(tree, "optim.final_lr", yaml.safe_load("2.5e-4"))  # as --set does
    cfg = config.load(tree)
    assert cfg.optim.weight_decay == 0.00001 and cfg.optim.lr == 0.3
    assert cfg.optim.final_lr == 0.00025
    for text in ("1e-5x", "e5", "fast", ""):
        with pytest.raises(config.ConfigError, match=r"optim\.weight_decay: expected a number"):
            config.load({"optim": {"weight_decay": text}})


def test_override_values_read_as_yaml_1_2_numbers_where_yaml_1_1_leaves_strings():
    assert yaml.safe_load("1e-3") == "1e-3"  # the PyYAML behaviour the helper exists for
    assert config.yaml12_value("1e-3") == 0.001 and config.yaml12_value("-2E4") == -20000.0
    assert config.yaml12_value("0.97") == 0.97 and config.yaml12_value("32") == 32
    assert config.yaml12_value("[1, 2]") == [1, 2] and config.yaml12_value("true") is True
    assert config.yaml12_value("fast") == "fast" and config.yaml12_value("1e-3x") == "1e-3x"


def test_paper_recipes_state_their_published_optimisation():
    """The published values each recipe cites (SPEC §1 and the released scripts)."""
    load = lambda name: config.load(config.read_yaml(config.recipe_path(name)))  # noqa: E731
    seer, swav = load("seer_regnety_256gf"), load("swav_rn50_800ep")
    assert seer.train.syncbn_group_size == 64 and seer.optim.exclude_bias_and_norm
    # swav_800ep_pretrain.sh: --start_warmup 0.3 --base_lr 4.8 at batch 4,096, LARC and wd on
    # every parameter, SyncBN (apex) in groups of 8
    scale = swav.train.batch_size / swav.optim.lr_batch_reference
    assert (swav.optim.start_lr * scale, swav.optim.lr * scale) == pytest.approx((0.3, 4.8))
    assert not swav.optim.exclude_bias_and_norm and swav.train.syncbn_group_size == 8
    simclr, byol = load("simclr_v2"), load("byol")
    assert simclr.optim.trust_norm == byol.optim.trust_norm == "norm_of_sum"
    assert simclr.optim.momentum_of == "update"  # SimCLR's TF LARS: v <- m v + lr u
    # torch SGD under LARC (SwAV, SEER); BYOL's optax chain scales by the LR after the momentum
    assert seer.optim.momentum_of == swav.optim.momentum_of == byol.optim.momentum_of == "gradient"
    assert simclr.train.syncbn_group_size >= simclr.train.batch_size  # global BN
    # a fixed 255 px square of the 292 px shorter-side resize: from the square, not the picture
    # (as an area of a whole 4:3 picture no such square fits, and every crop would be the centre)
    assert not load("jigsaw").data.whole_images and not load("rpl").data.whole_images
    assert load("rotation").data.whole_images and seer.data.whole_images  # Inception-style crops
    for name in ("rotation", "jigsaw", "rpl", "exemplar"):  # Revisiting: / 10 at 15 and 25 of 35
        cfg = load(name)
        assert cfg.optim.schedule == "step" and cfg.train.epochs == 35
        assert [round(m * 35, 6) for m in cfg.optim.lr_decay_at] == [15, 25]
        assert cfg.optim.lr_decay_factor == 0.1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schedule": "step"}, "needs optim.lr_decay_at"),
        ({"schedule": "step", "lr_decay_at": [0.7, 0.4]}, "increasing fractions"),
        ({"lr_decay_at": [1.5]}, "increasing fractions"),
        ({"lr_decay_factor": 0}, "lr_decay_factor"),
        ({"trust_norm": "l1"}, "trust_norm"),
    ],
)
def test_bad_step_schedule_and_trust_norm_values_are_refused(change, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load({"optim": change})
