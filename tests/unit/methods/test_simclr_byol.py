"""SimCLR v2 and BYOL methods: the EMA schedule, EMA targets, the memory queue, the v2 encoder."""

import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from wildsight import config
from wildsight.backbones import build_backbone
from wildsight.methods import build_method
from wildsight.methods.byol import BYOL
from wildsight.methods.simclr import SimCLR
from wildsight.train.optim import param_groups
from wildsight.views import default_views, make_views


def _build(name, **overrides):
    cfg = config.load({"method": {"name": name, **overrides}}).method
    spec = default_views(16, name)
    torch.manual_seed(0)
    return build_method(cfg, build_backbone("regnetx_200mf", small_input=True), spec), spec


def _byol():
    return _build("byol", hidden_dim=32, out_dim=16, predictor_hidden_dim=24)


def _simclr(**overrides):
    return _build("simclr", hidden_dim=32, out_dim=16, **overrides)


def _views(spec, seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=gen)
    return make_views(images, spec, torch.Generator().manual_seed(seed))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------- BYOL


def test_tau_rises_from_0996_to_1_by_a_cosine():
    method, _ = _byol()
    assert method.tau(0) == method.tau(500) == 0.996  # run length unknown: tau_base
    method.set_total_steps(1000)
    assert method.tau(0) == pytest.approx(0.996, abs=1e-15)
    assert method.tau(1000) == 1.0 and method.tau(1200) == 1.0
    assert method.tau(500) == pytest.approx(0.998, abs=1e-15)  # halfway: cos(pi/2) = 0
    taus = [method.tau(k) for k in range(0, 1001, 50)]
    assert all(a < b for a, b in zip(taus, taus[1:], strict=False))


def test_target_starts_as_online_copy_without_gradients_and_is_saved():
    method, _ = _byol()
    for online, target in ((method.backbone, method.target_backbone),
                           (method.projector, method.target_projector)):  # fmt: skip
        for a, b in zip(online.parameters(), target.parameters(), strict=True):
            assert torch.equal(a, b) and not b.requires_grad
    keys = method.state_dict().keys()
    assert any(k.startswith("target_backbone.") for k in keys)
    assert any(k.startswith("target_projector.") for k in keys)
    optimised = {id(p) for g in param_groups(method, 1e-6) for p in g["params"]}
    assert not optimised & {id(p) for p in method.target_backbone.parameters()}
    assert {id(p) for p in method.predictor.parameters()} <= optimised


def test_after_step_makes_target_the_ema_of_online_weights():
    method, spec = _byol()
    method.set_total_steps(10)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for step in range(3):
        xi = _params(method.target_backbone) + _params(method.target_projector)
        out = method(_views(spec, step), step)
        optimizer.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in method.target_backbone.parameters())
        optimizer.step()
        theta = _params(method.backbone) + _params(method.projector)
        method.after_step(step, out)
        tau = 1 - (1 - 0.996) * (math.cos(math.pi * step / 10) + 1) / 2
        new = _params(method.target_backbone) + _params(method.target_projector)
        for x_new, x_old, t in zip(new, xi, theta, strict=True):
            torch.testing.assert_close(x_new, tau * x_old + (1 - tau) * t, rtol=1e-6, atol=1e-7)
        assert out.metrics["tau"].item() == pytest.approx(tau)
    assert not torch.equal(new[0], theta[0])  # the target lags behind


def test_loss_is_symmetric_in_the_two_views_and_within_bounds():
    method, spec = _byol()
    v1, v2 = _views(spec)
    a, b = method([v1, v2], 0).loss, method([v2, v1], 0).loss
    torch.testing.assert_close(a, b)  # L + L~: same terms swapped (BN sees the same batch)
    assert 0 <= a.item() <= 8


def test_byol_views_keep_the_asymmetric_solarisation():
    spec = default_views(28, "byol")
    assert spec.num_views == 2 and spec.num_global == 2
    assert [g.augment.solarize_p for g in spec.groups] == [0.0, 0.2]


# -------------------------------------------------------------------------------- SimCLR


def test_head_has_three_layers_with_batchnorm_and_backbone_width():
    method, _ = _build("simclr")
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    width = method.backbone.feature_dim
    assert [(m.in_features, m.out_features) for m in linears] == [
        (width, width), (width, width), (width, 128)
    ]  # fmt: skip
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in method.projector) == 3
    two, _ = _build("simclr", head_layers=2)
    assert sum(isinstance(m, torch.nn.Linear) for m in two.projector) == 2


def test_encoder_keeps_the_first_head_layer_when_asked():
    plain, _ = _simclr()
    assert plain.encoder() is plain.backbone
    method, spec = _simclr(keep_head_layers=1)
    method.eval()
    encoder = method.encoder()
    x = _views(spec)[0]
    first = method.projector[0]
    expected = F.relu(method.projector[1](first(method.backbone(x))))
    torch.testing.assert_close(encoder(x), expected)
    assert encoder.feature_dim == 32 and encoder(x).shape == (4, 32)
    # the same weights as the method's, not a copy
    assert {id(p) for p in encoder.parameters()} <= {id(p) for p in method.parameters()}


def test_no_memory_means_no_momentum_encoder():
    method, _ = _simclr()
    assert not any(k.startswith("memory") for k in method.state_dict())


def test_memory_queue_is_a_ring_of_the_momentum_encoder_keys():
    method, spec = _simclr(memory=10)
    method.eval()  # deterministic forward: the keys can be recomputed below
    expected = deque(maxlen=10)
    for step in range(4):  # 4 steps x 8 keys (2 views x 4 images) wrap around the 10 rows
        views = _views(spec, step)
        out = method(views, step)
        keys = F.normalize(method.memory_projector(method.memory_backbone(torch.cat(views))), dim=1)
        torch.testing.assert_close(out.aux["keys"], keys)
        method.after_step(step, out)
        expected.extend(keys.detach())
    assert int(method.memory_size) == 10 and int(method.memory_ptr) == 32 % 10
    # ring order: the row after the write pointer is the oldest
    ptr = int(method.memory_ptr)
    ring = torch.cat([method.memory_bank[ptr:], method.memory_bank[:ptr]])
    torch.testing.assert_close(ring, torch.stack(list(expected)))


def test_memory_encoder_is_an_ema_and_the_memory_enters_the_loss():
    method, spec = _simclr(memory=16, memory_momentum=0.9)
    method.eval()
    views = _views(spec)
    empty_queue = method(views, 0).loss
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.01)
    theta, xi = _params(method.backbone), _params(method.memory_backbone)
    method.after_step(0, method(views, 0))
    for new, x, t in zip(_params(method.memory_backbone), xi, theta, strict=True):
        torch.testing.assert_close(new, 0.9 * x + 0.1 * t)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.sub_(0.01)
    assert int(method.memory_size) == 8
    assert method(views, 1).loss > empty_queue  # 8 more negatives in every denominator


def test_queue_survives_a_strict_state_dict_round_trip():
    a, spec = _simclr(memory=12)
    for step in range(2):
        a.after_step(step, a(_views(spec, step), step))
    b, _ = _simclr(memory=12)
    b.load_state_dict(a.state_dict(), strict=True)
    for name in ("memory_bank", "memory_ptr", "memory_size"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert int(b.memory_size) == 12 and int(b.memory_ptr) == 16 % 12
    a.eval(), b.eval()
    views = _views(spec, 5)
    assert torch.equal(a(views, 2).loss, b(views, 2).loss)


def test_bad_configs_are_refused_in_one_line():
    with pytest.raises(config.ConfigError, match="keep_head_layers must be 0 or 1"):
        config.load({"method": {"name": "simclr", "keep_head_layers": 2}})
    with pytest.raises(config.ConfigError, match="keep_head_layers must be 0 or 1 and less"):
        config.load({"method": {"name": "simclr", "head_layers": 1, "keep_head_layers": 1}})
    with pytest.raises(config.ConfigError, match="memory must be >= 0"):
        config.load({"method": {"name": "simclr", "memory": -1}})
    with pytest.raises(config.ConfigError, match="did you mean 'memory'"):
        config.load({"method": {"name": "simclr", "memroy": 8}})
    with pytest.raises(config.ConfigError, match="tau_base must be in"):
        config.load({"method": {"name": "byol", "tau_base": 1.5}})
    spec = default_views(16, "swav")  # 2 + 4 crops
    backbone = build_backbone("regnetx_200mf", small_input=True)
    for cls, name in ((SimCLR, "simclr"), (BYOL, "byol")):
        cfg = config.load({"method": {"name": name}}).method
        with pytest.raises(ValueError, match="exactly 2 views"):
            cls(backbone, spec, cfg)
