"""The pretext-task methods: their options run, their state is checkpointed, bad settings fail
in one line, and the published recipes use the published presets."""

import pytest
import torch

from wildsight import config
from wildsight.backbones import build_backbone
from wildsight.methods import build_method
from wildsight.views import CropGroup, ViewSpec, default_views, make_views, presets
from wildsight.views.pretext import permutation_set

SMALL = {
    "rotation": {},
    "jigsaw": {
        "embed_dim": 8,
        "hidden_dim": 16,
        "num_permutations": 12,
        "permutations_per_image": 2,
    },
    "rpl": {"embed_dim": 8, "hidden_dim": 16},
    "exemplar": {"embed_dim": 8},
}


def _build(name, views=None, **overrides):
    cfg = config.load({"method": {"name": name, **SMALL[name], **overrides}}).method
    spec = views or default_views(28, name)
    return build_method(cfg, build_backbone("regnetx_200mf", small_input=True), spec), spec


def _step(method, spec, batch=6):
    images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
    out = method(make_views(images, spec, torch.Generator().manual_seed(0)), 0)
    out.loss.backward()
    return out


@pytest.mark.parametrize(
    ("name", "overrides", "metric"),
    [
        ("rpl", {"all_neighbours": False}, "pretext_accuracy"),
        ("exemplar", {"loss": "classification"}, "copy_retrieval_accuracy"),
        ("exemplar", {"mining": "hard", "standardize": False}, "copy_retrieval_accuracy"),
        ("rotation", {"standardize": True, "hidden_dims": [8]}, "pretext_accuracy"),
    ],
)
def test_options_train(name, overrides, metric):
    torch.manual_seed(0)
    method, spec = _build(name, **overrides)
    out = _step(method, spec)
    assert torch.isfinite(out.loss) and 0.0 <= float(out.metrics[metric]) <= 1.0
    assert method.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_chance_level_loss_at_initialisation():
    # a freshly initialised 4-way (rotation) and 8-way (rpl) classifier starts near ln K
    torch.manual_seed(0)
    for name, classes in (("rotation", 4), ("rpl", 8)):
        method, spec = _build(name)
        out = _step(method, spec, batch=16)
        assert abs(out.loss.item() - torch.log(torch.tensor(float(classes))).item()) < 0.6


def test_jigsaw_permutation_set_is_checkpointed_state():
    method, _ = _build("jigsaw")
    state = method.state_dict()
    assert torch.equal(state["permutations"], permutation_set(12, 9, seed=0))
    other, _ = _build("jigsaw", permutation_seed=3)
    with pytest.raises(RuntimeError):  # a different set is a different model: strict load refuses
        other.load_state_dict({**state, "permutations": state["permutations"][:5]}, strict=True)


def test_patch_tasks_refuse_views_too_small_or_of_mixed_sizes():
    tiny = ViewSpec((CropGroup(count=1, size=5, scale=(0.5, 1.0)),))
    with pytest.raises(
        ValueError, match=r"^jigsaw: a 5 px crop cut 3 x 3 gives 1 px tiles; use larger crops"
    ):
        _build("jigsaw", views=tiny)
    mixed = ViewSpec(
        (
            CropGroup(count=1, size=48, scale=(0.5, 1.0)),
            CropGroup(count=1, size=32, scale=(0.5, 1.0)),
        )
    )
    with pytest.raises(ValueError, match="one size"):
        _build("rpl", views=mixed)
    with pytest.raises(ValueError, match="copies"):
        _build("exemplar", views=ViewSpec((CropGroup(count=1, size=28, scale=(0.5, 1.0)),)))


def test_bad_configs_fail_in_one_line():
    for tree, key in (
        ({"name": "jigsaw", "jitter_fraction": 0.3}, "jitter_fraction"),
        ({"name": "jigsaw", "permutations_per_image": 200}, "permutations_per_image"),
        ({"name": "rpl", "dropout": 1.0}, "dropout"),
        ({"name": "exemplar", "mining": "easy"}, "mining"),
        ({"name": "rotation", "hidden_dim": 3}, "hidden_dims"),
    ):
        with pytest.raises(config.ConfigError, match=key) as err:
            config.load({"method": tree})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["rotation", "jigsaw", "rpl", "exemplar"])
def test_published_recipes_use_the_published_presets(name):
    recipe = config.load(config.read_yaml(config.recipe_path(name)))
    assert recipe.views == presets.PRESETS[name]
    assert recipe.optim.lr == 0.1 and recipe.optim.momentum == 0.9  # Revisiting: 0.1 per 256
    assert recipe.train.epochs == 35
