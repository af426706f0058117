import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from kdad.blocks.maps import (
    AnomalyMapHead,
    GaussianBlur,
    cosine_distance,
    cosine_similarity,
    symmetric_indices,
)


def test_symmetric_indices_match_scipy_reflect() -> None:
    # scipy 'reflect' pads d c b a | a b c d | d c b a
    assert symmetric_indices(4, 3).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]


@pytest.mark.parametrize("size", [16, 64, 256])
def test_blur_matches_scipy_gaussian_filter(size: int) -> None:
    rng = np.random.default_rng(0)
    m = rng.random((2, 1, size, size)).astype(np.float32)
    ours = GaussianBlur(4.0)(torch.from_numpy(m)).numpy()
    ref = np.stack([gaussian_filter(m[i, 0].astype(np.float64), sigma=4)[None] for i in range(2)])
    assert ours.shape == m.shape
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_cosine_distance_range_and_identity() -> None:
    a = torch.randn(2, 8, 4, 4)
    assert torch.allclose(cosine_distance(a, a), torch.zeros(2, 1, 4, 4), atol=1e-6)
    assert torch.allclose(cosine_distance(a, -a), torch.full((2, 1, 4, 4), 2.0), atol=1e-6)


def test_head_sum_vs_mul_and_score_is_max() -> None:
    t = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    for fuse in ("sum", "mul"):
        out = AnomalyMapHead("cosine", fuse, sigma=0.0)(t, s, (32, 32))
        assert out.anomaly_map.shape == (2, 1, 32, 32)
        assert torch.allclose(out.score, out.anomaly_map.flatten(1).amax(1))
    head = AnomalyMapHead("cosine", "sum", sigma=0.0, align_corners=True)
    summed = head(t, s, (8, 8)).anomaly_map
    maps = head.layer_maps(t, s)
    up = torch.nn.functional.interpolate(maps[1], size=(8, 8), mode="bilinear", align_corners=True)
    assert torch.allclose(summed, maps[0] + up, atol=1e-6)


def test_head_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="fuse"):
        AnomalyMapHead("cosine", "max")  # type: ignore[arg-type]


def test_cosine_similarity_matches_torch_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 5, 4, generator=g)
    b = torch.randn(3, 8, 5, 4, generator=g)
    a[0, :, 0, 0] = 0.0  # a zero vector: both clamp its norm at eps and give 0
    for dim in (1, 3):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        ours, ref = cosine_similarity(x, y, dim), F.cosine_similarity(x2, y2, dim=dim, eps=1e-8)
        torch.testing.assert_close(ours, ref)
        (ours * ref.detach()).sum().backward()
        (ref * ref.detach()).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(y.grad, y2.grad)


def test_pool_features_is_a_local_mean_that_ignores_padding() -> None:
    from kdad.blocks.maps import pool_features

    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)
    assert pool_features([x], 1)[0] is x
    p = pool_features([x], 3)[0]
    assert p[0, 0, 2, 2] == x[0, 0, 1:4, 1:4].mean()
    assert p[0, 0, 0, 0] == x[0, 0, :2, :2].mean()  # the corner averages its 4 real neighbours, not 9 with zeros


def test_pooled_head_maps_differ_and_fast_head_keeps_the_pool() -> None:
    from kdad.blocks.maps import AnomalyMapHead, FastAnomalyMapHead, pool_features

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 16, 8, 8, generator=g)]
    s = [torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 16, 8, 8, generator=g)]
    plain = AnomalyMapHead("l2norm", "mul", 0.0, False, 0)
    pooled = AnomalyMapHead("l2norm", "mul", 0.0, False, 0, pool=3)
    a = pooled(t, s, (32, 32))
    assert torch.allclose(a.anomaly_map, plain(pool_features(t, 3), pool_features(s, 3), (32, 32)).anomaly_map)
    assert not torch.allclose(a.anomaly_map, plain(t, s, (32, 32)).anomaly_map)
    fast = FastAnomalyMapHead.from_head(pooled)
    assert fast.pool == 3
    assert torch.allclose(fast(t, s, (32, 32)).anomaly_map, a.anomaly_map, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        AnomalyMapHead(pool=2)


def test_stfpm_pool_reaches_the_loss() -> None:
    from kdad.blocks.losses import normalized_l2_loss
    from kdad.blocks.maps import pool_features
    from kdad.methods import stfpm

    cfg = stfpm.Config(backbone="resnet18", weights="random", pool=3)
    torch.manual_seed(0)
    model = stfpm.Model(cfg)
    x = torch.rand(2, 3, 64, 64)
    opt = {"student": torch.optim.SGD(model.student.parameters(), lr=0.0)}
    logs = stfpm.train_step(model, {"image": x}, opt, cfg, torch.Generator())
    t, s = model.pairs(x)
    want = normalized_l2_loss(pool_features(t, 3), pool_features(s, 3))
    assert float(logs["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(logs["loss"]) != pytest.approx(float(normalized_l2_loss(t, s)), rel=1e-3)

def test_head_default_blur_is_rd4ad_sigma_4() -> None:
    """The head's default sigma is RD4AD's 4 (scipy gaussian_filter, truncate 4), and RD's map is exactly
    the sum of upsampled layer maps blurred that way."""
    import inspect

    from kdad.config import from_dict
    from kdad.methods import rd

    assert inspect.signature(AnomalyMapHead).parameters["sigma"].default == 4.0
    head = AnomalyMapHead()
    assert head.blur.sigma == 4.0 and head.blur.radius == 16
    g = torch.Generator().manual_seed(0)
    t, s = [torch.rand(1, 4, 8, 8, generator=g)], [torch.rand(1, 4, 8, 8, generator=g)]
    raw = F.interpolate(1 - F.cosine_similarity(t[0], s[0]).unsqueeze(1), size=(48, 48), mode="bilinear",
                        align_corners=True)
    expected = gaussian_filter(raw[0, 0].double().numpy(), sigma=4)
    np.testing.assert_allclose(head(t, s, (48, 48)).anomaly_map[0, 0].numpy(), expected, atol=2e-6)

    torch.manual_seed(0)
    model = rd.Model(from_dict(rd.Config, {"backbone": "resnet18", "weights": "random"})).eval()
    x = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        teacher, student = model.pairs(x)
        layers = [F.interpolate(1 - F.cosine_similarity(a, b).unsqueeze(1), size=(32, 32), mode="bilinear",
                                align_corners=True) for a, b in zip(teacher, student)]
        out = model(x)
    expected = gaussian_filter(sum(layers)[0, 0].double().numpy(), sigma=4)
    np.testing.assert_allclose(out.anomaly_map[0, 0].numpy(), expected, atol=2e-5)
    assert float(out.score[0]) == pytest.approx(float(expected.max()), abs=2e-5)
