"""The SwAV method's invariants: SPEC §1 and the traps of SPEC §4."""

import torch
import torch.nn.functional as F

from wildsight import config
from wildsight.backbones import build_backbone
from wildsight.methods import build_method
from wildsight.views import default_views, make_views


def _swav(**overrides):
    tree = {"name": "swav", "hidden_dims": [32], "out_dim": 16, "num_prototypes": 12,
            "freeze_prototypes_steps": 3, "queue_length": 8, **overrides}  # fmt: skip
    cfg = config.from_dict(type(config.load({}).method), tree)
    spec = default_views(16, "swav")
    return build_method(cfg, build_backbone("regnetx_200mf", small_input=True), spec), spec


def test_prototypes_have_no_bias_and_are_normalised_before_each_step():
    method, _ = _swav()
    names = [n for n, _ in method.prototypes.named_parameters()]
    assert names == ["weight"]  # a linear layer WITHOUT bias
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method.before_step(0)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(12))


def test_prototypes_frozen_for_the_first_steps_only():
    method, _ = _swav()
    assert list(method.frozen_parameters(2)) == [method.prototypes.weight]
    assert list(method.frozen_parameters(3)) == []


def test_queue_is_persistent_state_filled_with_normalised_global_features():
    method, spec = _swav()
    assert "queue" in method.state_dict() and "queue_size" in method.state_dict()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    for step in range(2):
        out = method(make_views(images, spec, torch.Generator().manual_seed(step)), step)
        method.after_step(step, out)
    assert int(method.queue_size) == 8
    torch.testing.assert_close(method.queue.norm(dim=2), torch.ones(2, 8))
    # the newest batch sits first: the global crops' features of the last step
    z = out.aux["global_z"].view(2, 4, 16)
    torch.testing.assert_close(method.queue[:, :4], z)


def test_loss_uses_the_queue_once_full():
    method, spec = _swav(queue_length=4)
    method.eval()  # BN in eval mode: the forward is a deterministic function of the weights
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    views = make_views(images, spec, torch.Generator().manual_seed(0))
    before = method(views, 0).loss
    method.queue.copy_(F.normalize(torch.randn(2, 4, 16), dim=2))
    method.queue_size.fill_(4)
    after = method(views, 0).loss
    assert not torch.isclose(before, after)
