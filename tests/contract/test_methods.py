"""Every registered method: one real training step on a tiny backbone behaves as a method must."""

import pytest
import torch

from wildsight import config
from wildsight.backbones import build_backbone
from wildsight.methods import METHODS, build_method
from wildsight.views import default_views, make_views


def _method(name: str):
    cfg = config.load({"method": {"name": name}})
    method_cfg = cfg.method
    if name == "swav":
        method_cfg = config.from_dict(type(cfg.method), {"name": "swav", "hidden_dims": [32], "out_dim": 16,
                                                          "num_prototypes": 12, "freeze_prototypes_steps": 1,
                                                          "queue_length": 8})  # fmt: skip
    small = {  # small heads; SimCLR with its MoCo-style memory, so the momentum encoder runs too
        "simclr": {"hidden_dim": 32, "out_dim": 16, "memory": 8},
        "byol": {"hidden_dim": 32, "out_dim": 16, "predictor_hidden_dim": 24},
        "rotation": {"hidden_dims": [16]},
        "jigsaw": dict(embed_dim=8, hidden_dim=32, num_permutations=10, permutations_per_image=3),
        "rpl": {"embed_dim": 8, "hidden_dim": 32},
        "exemplar": {"embed_dim": 16},
    }
    if name in small:
        method_cfg = config.load({"method": {"name": name, **small[name]}}).method
    views = default_views(16, name)
    return build_method(method_cfg, build_backbone("regnetx_200mf", small_input=True), views), views


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_step_gives_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    method, spec = _method(name)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    views = make_views(images, spec, torch.Generator().manual_seed(0))
    method.before_step(5)
    out = method(views, 5)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    backbone_grads = [p.grad for p in method.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in backbone_grads)
    assert any(g.abs().sum() > 0 for g in backbone_grads)
    method.after_step(5, out)
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trips_strictly(name):
    a, _ = _method(name)
    b, _ = _method(name)
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_swav_step_on_one_image_reports_no_feature_spread_rather_than_warning():
    """A batch can hold one image (the rest of a batch skipped as broken files): the spread of
    one feature vector is undefined, so SwAV reports NaN (which the collapse monitor skips)
    without torch's degrees-of-freedom warning, and its loss stays finite."""
    import math
    import warnings

    from wildsight.train.guards import CollapseMonitor

    torch.manual_seed(0)
    method, spec = _method("swav")
    views = make_views(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), spec,
                       torch.Generator().manual_seed(0))  # fmt: skip
    method.before_step(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = method(views, 5)
    assert torch.isfinite(out.loss) and math.isnan(out.metrics["feature_std"].item())
    metrics = {k: v.item() for k, v in out.metrics.items()}
    warning = CollapseMonitor(patience=1).check(5, metrics)
    assert warning is None or "feature_std" not in warning
