"""RD++: losses on hand-checkable tensors, SSOT properties, gradient accumulation, projection layers."""

import math

import pytest
import torch
from torch import nn

from kdad.blocks.losses import pixel_cosine_loss
from kdad.config import from_dict, load_config
from kdad.errors import ConfigError
from kdad.methods import rdpp

TINY = {"backbone": "resnet18", "weights": "random"}


def px(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1, 1)


def test_recon_is_per_pixel_cosine() -> None:
    p = torch.zeros(1, 2, 1, 2)
    p[:, 0] = 1.0  # (1, 0) at both pixels
    q = p.clone()
    q[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # second pixel orthogonal
    assert pixel_cosine_loss([p], [q]).item() == pytest.approx(0.5, abs=1e-6)  # mean of (0, 1)
    assert pixel_cosine_loss([p, p], [p, q]).item() == pytest.approx(0.5, abs=1e-6)


def test_contrast_is_hinge_on_cosine_minus_margin() -> None:
    a, b = px(1.0, 0.0), px(0.8, 0.6)  # cos 0.8 -> max(0, 0.8 - 0.5) = 0.3
    assert rdpp.contrast_loss([a], [b]).item() == pytest.approx(0.3, abs=1e-6)
    c = px(0.2, 0.9797959)  # cos 0.2 -> 0
    assert rdpp.contrast_loss([a], [c]).item() == pytest.approx(0.0, abs=1e-6)
    both = rdpp.contrast_loss([torch.cat([a, a])], [torch.cat([b, c])])  # batch mean
    assert both.item() == pytest.approx(0.15, abs=1e-6)


def test_sinkhorn_divergence_zero_for_identical_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    x = nn.functional.normalize(torch.randn(3, 20, 4, generator=g), dim=2)
    y = nn.functional.normalize(torch.randn(3, 25, 4, generator=g) + 1.0, dim=2)
    same = rdpp.sinkhorn_divergence(x, x.clone(), eps=0.05, iters=20, scaling=0.7)
    assert torch.equal(same, torch.zeros(3))
    diff = rdpp.sinkhorn_divergence(x, y, eps=0.05, iters=20, scaling=0.7)
    assert (diff >= 0).all() and (diff > 1e-3).all()
    # a permutation of the points is the same measure
    perm = rdpp.sinkhorn_divergence(x, x[:, torch.randperm(20, generator=g)], eps=0.05, iters=50, scaling=0.7)
    assert perm.abs().max() < 1e-4


def test_ssot_loss_nonnegative_with_gradient_and_official_is_zero() -> None:
    cfg = rdpp.Config(**TINY)
    proj = [torch.rand(4, 8, 6, 6, requires_grad=True), torch.rand(4, 16, 3, 3, requires_grad=True)]
    loss = rdpp.ssot_loss(proj, cfg, torch.Generator().manual_seed(0))
    assert loss.item() >= 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in proj)
    same = [torch.ones(4, 8, 6, 6)]  # every image has the same cloud
    assert rdpp.ssot_loss(same, cfg, torch.Generator()).item() == 0.0
    official = rdpp.Config(**TINY, ssot="official")
    assert rdpp.ssot_loss(proj, official, torch.Generator()).item() == 0.0


def test_projection_layer_channels() -> None:
    layer = rdpp.ProjLayer(16, 16)
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 8), (8, 4), (4, 8), (8, 16)]
    assert all(c.bias is not None and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in layer.modules()) == 4
    assert all(m.negative_slope == 0.01 for m in layer.modules() if isinstance(m, nn.LeakyReLU))
    assert layer(torch.rand(2, 16, 5, 5)).shape == (2, 16, 5, 5)


def test_gradient_accumulation_steps_every_second_call() -> None:
    cfg = from_dict(rdpp.Config, TINY)
    torch.manual_seed(0)
    model = rdpp.Model(cfg)
    opts = rdpp.optimizers(model, cfg)
    assert set(opts) == {"proj", "distill"}
    assert opts["proj"].param_groups[0]["lr"] == 1e-3 and opts["distill"].param_groups[0]["lr"] == 5e-3
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    model.train()
    p0 = next(model.proj.parameters()).detach().clone()
    d0 = next(model.decoder.parameters()).detach().clone()
    logs = rdpp.train_step(model, {"image": x}, opts, cfg, gen)
    assert int(model.accum_count) == 1
    assert torch.equal(next(model.proj.parameters()), p0) and torch.equal(next(model.decoder.parameters()), d0)
    assert next(model.proj.parameters()).grad is not None  # accumulated, not yet applied
    rdpp.train_step(model, {"image": x}, opts, cfg, gen)
    assert int(model.accum_count) == 2
    assert not torch.equal(next(model.proj.parameters()), p0)
    assert not torch.equal(next(model.decoder.parameters()), d0)
    assert next(model.proj.parameters()).grad is None  # zeroed after the step
    l_proj = (logs["ssot"] + 0.01 * logs["recon"] + 0.1 * logs["contrast"]) / 1.11
    assert logs["loss"] == pytest.approx(logs["distill"] + 0.2 * l_proj, rel=1e-5)
    assert "accum_count" in model.state_dict()  # the counter travels with checkpoints


def test_config_validation_and_presets() -> None:
    with pytest.raises(ConfigError, match="ssot"):
        rdpp.Config(ssot="geomloss")
    with pytest.raises(ConfigError, match="simplex"):
        rdpp.Config(synthesis={"kind": "cutpaste"})
    assert rdpp.Config(synthesis={"simplex_field": "fresh"}).synthesis_config().kind == "simplex"
    paper, cpu = load_config("rdpp_paper"), load_config("rdpp_cpu")
    assert paper.model["backbone"] == "wide_resnet50_2" and paper.train.batch_size == 16
    assert cpu.model["backbone"] == "efficientnet_lite0"


def _ot_reference(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int = 400) -> torch.Tensor:
    """Entropic OT between uniform clouds, cost |x-y|^2/2: plain alternating log-domain Sinkhorn in float64."""
    x, y = x.double(), y.double()
    c = 0.5 * torch.cdist(x, y) ** 2
    log_a, log_b = -math.log(x.shape[1]), -math.log(y.shape[1])
    f, g = torch.zeros(x.shape[:2], dtype=torch.float64), torch.zeros(y.shape[:2], dtype=torch.float64)
    for _ in range(iters):
        f = -eps * torch.logsumexp(log_b + (g.unsqueeze(1) - c) / eps, dim=2)
        g = -eps * torch.logsumexp(log_a + (f.unsqueeze(2) - c) / eps, dim=1)
    return f.mean(1) + g.mean(1)


@pytest.mark.parametrize("same_size", [True, False])
def test_sinkhorn_divergence_matches_a_float64_reference(same_size: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = nn.functional.normalize(torch.randn(2, 5, 3, generator=g), dim=2)
    y = nn.functional.normalize(torch.randn(2, 5 if same_size else 7, 3, generator=g) + 0.5, dim=2)
    eps = 0.1
    want = _ot_reference(x, y, eps) - 0.5 * _ot_reference(x, x, eps) - 0.5 * _ot_reference(y, y, eps)
    got = rdpp.sinkhorn_divergence(x, y, eps=eps, iters=50, scaling=0.7)
    assert got.shape == (2,) and torch.allclose(got.double(), want, atol=2e-5), (got, want)


def test_ssot_loss_compares_each_image_with_a_rolled_partner() -> None:
    cfg = rdpp.Config(**TINY)
    p = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(3))  # (B, C, H, W) all different, grid-sized
    shift = int(torch.randint(1, 3, (1,), generator=torch.Generator().manual_seed(5)))
    cloud = nn.functional.normalize(p.flatten(2).transpose(1, 2), dim=2)
    want = rdpp.sinkhorn_divergence(cloud, torch.roll(cloud, shift, 0), cfg.ssot_eps, cfg.ssot_iters, cfg.ssot_scaling)
    got = rdpp.ssot_loss([p], cfg, torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(want.mean().item(), rel=1e-5)
    assert rdpp.ssot_loss([p[:2]], cfg, torch.Generator()).item() > 0  # two images are enough


def test_contrast_loss_batch_differs_from_channels() -> None:
    # B = 3 images of C = 2 channels (a target sized from the channel axis would not match the batch)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(3, 2, 1, 1)
    b = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]).view(3, 2, 1, 1)  # cos 0.8, 0.6, 1.0
    assert rdpp.contrast_loss([a], [b]).item() == pytest.approx((0.3 + 0.1 + 0.5) / 3, abs=1e-6)


def test_ssot_shift_comes_from_the_given_generator_only() -> None:
    cfg = rdpp.Config(**TINY)
    p = torch.randn(4, 4, 2, 3, generator=torch.Generator().manual_seed(3))
    want = rdpp.ssot_loss([p], cfg, torch.Generator().manual_seed(5)).item()
    shifted = {rdpp.ssot_loss([p], cfg, torch.Generator().manual_seed(s)).item() for s in range(8)}
    assert len(shifted) == 2  # shift 2 pairs other images than shifts 1 and 3 (the same pairs, reversed)
    for seed in range(6):  # the global RNG does not matter
        torch.manual_seed(seed)
        assert rdpp.ssot_loss([p], cfg, torch.Generator().manual_seed(5)).item() == want
    gen, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rdpp.ssot_loss([p], cfg, gen)
    torch.randint(1, 4, (1,), generator=twin)
    assert torch.equal(gen.get_state(), twin.get_state())  # one draw from the generator


def test_ssot_pools_height_and_width_to_the_grid_whatever_the_channels() -> None:
    cfg = rdpp.Config(**TINY, ssot_grid=4)
    p = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(4))  # C = 3 < grid < H, W
    cloud = nn.functional.normalize(nn.functional.adaptive_avg_pool2d(p, (4, 4)).flatten(2).transpose(1, 2), dim=2)
    want = rdpp.sinkhorn_divergence(cloud, torch.roll(cloud, 1, 0), cfg.ssot_eps, cfg.ssot_iters, cfg.ssot_scaling)
    assert rdpp.ssot_loss([p], cfg, torch.Generator()).item() == pytest.approx(want.mean().item(), rel=1e-5)
