"""PatchST: the hard-feature loss, the target standardisation, the per-position map statistics and their
round trip through a state dict."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdad.blocks.coreset import greedy_coreset
from kdad.blocks.patchnet import PatchNet
from kdad.config import from_dict
from kdad.errors import ConfigError
from kdad.hardware import cpu_has_fast_bf16
from kdad.methods import patchst
from kdad.synthesis import PERLIN_TEXTURE_EVERY_IMAGE, TextureBank, synthesize

TINY = {"backbone": "resnet18", "weights": "random"}


def _model(**kw: object) -> patchst.Model:
    torch.manual_seed(0)
    return patchst.Model(from_dict(patchst.Config, {**TINY, **kw}))


def _loader(n: int, size: int = 64, seed: int = 0) -> DataLoader:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return DataLoader([{"image": im} for im in x], batch_size=3)


def test_patchnet_gives_the_stride_8_grid() -> None:
    net = PatchNet(7, width=4, extra=1)
    assert net(torch.rand(1, 3, 256, 256)).shape == (1, 7, 32, 32)
    assert net(torch.rand(1, 3, 64, 96)).shape == (1, 7, 8, 12)


def test_hard_mse_keeps_only_the_largest_errors() -> None:
    t = torch.zeros(1, 1, 10, 10)
    s = torch.zeros(1, 1, 10, 10)
    s.view(-1)[:5] = torch.tensor([10.0, 9.0, 1.0, 1.0, 1.0])  # 100 errors: two large, three small, 95 zero
    assert float(patchst.hard_mse(t, s, 0.0)) == pytest.approx((100 + 81 + 3) / 100)
    # the largest 2 % of the 100 squared errors: 100 and 81
    assert float(patchst.hard_mse(t, s, 0.98)) == pytest.approx((100 + 81) / 2)


def test_prepare_standardises_the_target_per_channel() -> None:
    model = _model()
    loader = _loader(7)
    patchst.prepare(model, loader, torch.device("cpu"))
    raw = torch.cat([model.raw_target(b["image"]) for b in loader])
    assert torch.allclose(model.feat_mean.flatten(), raw.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.feat_std.flatten(), raw.std((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    (t,), _ = model.pairs(torch.cat([b["image"] for b in loader]))
    assert torch.allclose(t.mean((0, 2, 3)), torch.zeros(t.shape[1]), atol=1e-4)


def test_calibrate_divides_the_map_by_its_mean_per_position_and_survives_a_state_dict() -> None:
    model = _model()
    patchst.prepare(model, _loader(6), torch.device("cpu"))
    normals = _loader(5, seed=1)
    patchst.calibrate(model, normals, torch.device("cpu"))
    grids = torch.cat([model.error_grid(b["image"]) for b in normals])
    assert model.map_mean.shape == (1, 1, 8, 8)
    assert torch.allclose(model.map_mean, grids.mean(0, keepdim=True), atol=1e-5)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.inference_mode():
        out = model(x)
        z = model.error_grid(x) / model.map_mean
    expected = model.blur(F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=False))
    assert torch.allclose(out.anomaly_map, expected, atol=1e-5)
    fresh = _model()  # uncalibrated: empty statistics until the state dict sizes them
    assert fresh.map_mean.numel() == 0
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.inference_mode():
        assert torch.allclose(fresh(x).anomaly_map, out.anomaly_map, atol=1e-6)


def test_without_position_statistics_the_map_is_the_raw_error() -> None:
    model = _model(map_norm="none")
    patchst.calibrate(model, _loader(4), torch.device("cpu"))
    assert model.map_mean.numel() == 0
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.inference_mode():
        raw = model.blur(F.interpolate(model.error_grid(x), size=(64, 64), mode="bilinear", align_corners=False))
        assert torch.allclose(model(x).anomaly_map, raw)


def test_a_first_layer_off_stride_8_is_refused() -> None:
    with pytest.raises(ConfigError, match="stride-8"):
        _model(layers=[1, 2])
    with pytest.raises(ConfigError, match="hard_quantile"):
        _model(hard_quantile=1.0)


def test_hard_mse_is_the_error_of_the_difference_and_keeps_at_least_one() -> None:
    t = torch.ones(1, 1, 10, 10)
    s = t.clone()
    s.view(-1)[:2] = torch.tensor([11.0, 10.0])  # errors 10 and 9 on a nonzero target
    assert float(patchst.hard_mse(t, s, 0.0)) == pytest.approx((100 + 81) / 100)
    assert float(patchst.hard_mse(t, s, 0.99)) == pytest.approx(100.0)  # 1 % of 100 errors: the largest alone


def test_nearest_sq_equals_brute_force_distance_in_chunks() -> None:
    g = torch.Generator().manual_seed(3)
    t, bank = torch.randn(2, 5, 3, 4, generator=g), torch.randn(11, 5, generator=g)
    brute = torch.cdist(t.permute(0, 2, 3, 1).reshape(-1, 5), bank).min(1).values ** 2 / 5
    for rows in (1, 7, 4096):  # chunk boundaries must not change the result
        got = patchst.nearest_sq(t, bank, rows=rows)
        assert got.shape == (2, 1, 3, 4)
        assert torch.allclose(got.flatten(), brute, atol=1e-5)


def test_memory_branch_samples_standardised_training_positions_and_adds_its_map() -> None:
    model = _model(memory=50)
    loader = _loader(4)
    patchst.prepare(model, loader, torch.device("cpu"))
    assert model.bank.shape == (50, model.feat_mean.shape[1])
    (t,), _ = model.pairs(torch.cat([b["image"] for b in loader]))
    rows = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    # every bank row is one of the standardised training positions, and no position is taken twice
    assert torch.cdist(model.bank, rows, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-4
    assert len({tuple(r.round(decimals=4).tolist()) for r in model.bank}) == 50
    # the second channel of the grid is the branch error
    x = torch.cat([b["image"] for b in loader])[:1]
    model.eval()
    with torch.inference_mode():
        grid = model.error_grid(x)
    assert grid.shape == (1, 2, 8, 8)
    normals = _loader(5, seed=1)
    patchst.calibrate(model, normals, torch.device("cpu"))
    assert model.map_mean.shape == (1, 2, 8, 8)
    xt = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = model(xt)
        z = (model.error_grid(xt) / model.map_mean).sum(1, keepdim=True)
    expected = model.blur(F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=False))
    assert torch.allclose(out.anomaly_map, expected, atol=1e-5)
    fresh = _model(memory=50)
    assert fresh.bank.numel() == 0
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.inference_mode():
        assert torch.allclose(fresh(xt).anomaly_map, out.anomaly_map, atol=1e-6)
    with pytest.raises(ConfigError, match="model.memory"):
        _model(memory=-1)


def test_coreset_memory_is_the_greedy_k_centre_of_all_training_positions() -> None:
    """memory_sampling=coreset: the bank is kdad.blocks.coreset's choice among all standardised positions (its
    coverage is tested in tests/blocks/test_coreset.py)."""
    loader = _loader(4)
    rnd, cs = _model(memory=40), _model(memory=40, memory_sampling="coreset")
    patchst.prepare(rnd, loader, torch.device("cpu"))
    patchst.prepare(cs, loader, torch.device("cpu"))
    (t,), _ = cs.pairs(torch.cat([b["image"] for b in loader]))
    rows = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    idx = greedy_coreset(rows, 40, seed=0, bf16=bool(cpu_has_fast_bf16()))  # _model seeds torch with 0
    assert torch.allclose(cs.bank, rows[idx], atol=1e-4)  # batched vs whole-set forward: float noise only
    assert not torch.allclose(cs.bank, rnd.bank)  # not the random draw
    with pytest.raises(ConfigError, match="memory_sampling"):
        _model(memory=40, memory_sampling="kmeans")


def test_coreset_pool_draws_its_candidates_at_random_first() -> None:
    """coreset_pool < positions: the coreset is taken among a seeded uniform draw of that many positions, the
    same draw a random memory of that size takes, so the cost stays bounded on large or tiled sets."""
    loader = _loader(4)  # 4 images x 8 x 8 = 256 positions
    pool, cs = _model(memory=100), _model(memory=40, memory_sampling="coreset", coreset_pool=100)
    patchst.prepare(pool, loader, torch.device("cpu"))  # _model seeds torch with 0 for each
    patchst.prepare(cs, loader, torch.device("cpu"))
    idx = greedy_coreset(pool.bank, 40, seed=0, bf16=bool(cpu_has_fast_bf16()))
    assert torch.allclose(cs.bank, pool.bank[idx], atol=1e-4)
    full = _model(memory=40, memory_sampling="coreset")
    patchst.prepare(full, loader, torch.device("cpu"))
    assert not torch.allclose(cs.bank, full.bank)  # the pool did bind
    with pytest.raises(ConfigError, match="coreset_pool"):
        _model(memory=40, memory_sampling="coreset", coreset_pool=20)


def test_memory_fusion_scores_with_the_memory_branch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """fusion=memory: the map is the memory branch's error over its own per-position mean, the student unused."""
    loader, normals = _loader(4), _loader(5, seed=1)
    both, mem = _model(memory=50), _model(memory=50, fusion="memory")
    for m in (both, mem):
        patchst.prepare(m, loader, torch.device("cpu"))
        patchst.calibrate(m, normals, torch.device("cpu"))
        m.eval()
    assert torch.equal(mem.bank, both.bank) and mem.map_mean.shape == (1, 1, 8, 8)
    assert torch.allclose(mem.map_mean, both.map_mean[:, 1:], atol=1e-6)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        z = both.error_grid(x)[:, 1:] / both.map_mean[:, 1:]
        expected = both.blur(F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=False))
        monkeypatch.setattr(mem.student, "forward", lambda *a: pytest.fail("the student ran"))
        assert torch.allclose(mem(x).anomaly_map, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="model.memory > 0"):
        _model(fusion="memory")
    with pytest.raises(ConfigError, match="fusion"):
        _model(memory=50, fusion="max")


def test_denoising_images_get_a_synthetic_anomaly_and_the_clean_images_target() -> None:
    model = _model(denoise=0.5, hard_quantile=0.9)
    patchst.prepare(model, _loader(4), torch.device("cpu"))
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    textures = TextureBank.from_tensor(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    gen = torch.Generator().manual_seed(5)
    noisy, masks = synthesize(images[:2], PERLIN_TEXTURE_EVERY_IMAGE, torch.Generator().manual_seed(5), textures)
    assert masks.sum() > 0 and not torch.equal(noisy, images[:2])
    with torch.no_grad():
        t = model.target(images)
        s = model.student(model.encoder.normalize(torch.cat([noisy, images[2:]])))
        expected = ((t[:2] - s[:2]) ** 2).mean() + patchst.hard_mse(t[2:], s[2:], 0.9)
    opts = {"student": torch.optim.SGD(model.student.parameters(), lr=0.0)}
    seen: list[torch.Tensor] = []  # the student's input: its random-init output is too small to show in the loss
    hook = model.student.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    logs = patchst.train_step(model, {"image": images, "textures": textures}, opts, model.cfg, gen)
    hook.remove()
    assert torch.allclose(seen[0], model.encoder.normalize(torch.cat([noisy, images[2:]])))
    # the loss of the noisy half is against the CLEAN images' features: the student learns to remove anomalies
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert patchst.SPEC.needs_textures is not True
    assert patchst.needs_textures(model.cfg) and not patchst.needs_textures(_model().cfg)
    with pytest.raises(ConfigError, match="model.denoise"):
        _model(denoise=1.0)


def test_mahalanobis_residual_whitens_with_the_held_out_normals_covariance() -> None:
    """residual=mahalanobis: calibrate fits the residual's mean and ridge precision on the held-out normals, and the
    student's error is the squared Mahalanobis distance over C (not the mean squared residual)."""
    model = _model(residual="mahalanobis", residual_ridge=0.05)
    patchst.prepare(model, _loader(6), torch.device("cpu"))
    normals = _loader(9, seed=1)
    patchst.calibrate(model, normals, torch.device("cpu"))
    x = torch.cat([b["image"] for b in normals])
    with torch.inference_mode():
        (t,), (s,) = model.pairs(x)
        r = (t - s).permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
        cov = torch.cov(r.T)
        prec = torch.linalg.inv(cov + 0.05 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype))
        assert torch.allclose(model.res_mean.double(), r.mean(0), atol=1e-5)
        w = model.res_white.double()
        assert torch.allclose(w @ w.T, prec, rtol=1e-3, atol=1e-3 * float(prec.abs().max()))
        z = r - r.mean(0)
        want = ((z @ prec) * z).sum(1) / t.shape[1]
        got = model.error_grid(x).permute(0, 2, 3, 1).reshape(-1).double()
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(got, (r * r).mean(1), rtol=0.1)  # a switch back to the plain error fails here
        # the per-position mean is the whitened error's, so the calibrated map is the ratio to it
        assert torch.allclose(model.map_mean, model.error_grid(x).mean(0, keepdim=True), atol=1e-5)
    fresh = _model(residual="mahalanobis", residual_ridge=0.05)
    fresh.load_state_dict(model.state_dict())  # the statistics travel with the state dict
    assert torch.equal(fresh.res_white, model.res_white)


def test_a_state_dict_saved_before_the_residual_option_loads_as_the_plain_error() -> None:
    model = _model()
    patchst.prepare(model, _loader(4), torch.device("cpu"))
    patchst.calibrate(model, _loader(4, seed=1), torch.device("cpu"))
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("res_")}
    fresh = _model()
    fresh.load_state_dict(old)
    assert fresh.res_white.numel() == 0
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(fresh.eval()(x).anomaly_map, model.eval()(x).anomaly_map)
    with pytest.raises(ConfigError, match="residual"):
        _model(residual="cosine")
    with pytest.raises(ConfigError, match="residual_ridge"):
        _model(residual="mahalanobis", residual_ridge=0.0)
