import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from kdad.blocks.maps import (
    AnomalyMapHead,
    AnomalyOutput,
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
    assert pool_features([x], 5)[0][0, 0, 2, 2] == x.mean() and pool_features([x], 5)[0].shape == x.shape
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


# --- Both heads against an independent float64 reference (edge cases found by benchmarks/mutation.py) ---

def _ref_distance(t: torch.Tensor, s: torch.Tensor, distance: str) -> torch.Tensor:
    t, s = t.double(), s.double()
    if distance == "cosine":
        return 1.0 - (t * s).sum(1, keepdim=True) / (t.norm(dim=1, keepdim=True).clamp_min(1e-8)
                                                     * s.norm(dim=1, keepdim=True).clamp_min(1e-8))
    d = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12) - s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (d * d).sum(1, keepdim=True)


def _ref_map(teacher: list[torch.Tensor], student: list[torch.Tensor], distance: str, fuse: str, sigma: float,
             align: bool, level: int | None, size: tuple[int, int]) -> np.ndarray:
    maps = [_ref_distance(t, s, distance) for t, s in zip(teacher, student)]
    inter = tuple(maps[level].shape[-2:]) if level is not None else size
    resized = [m if tuple(m.shape[-2:]) == inter else
               F.interpolate(m, size=inter, mode="bilinear", align_corners=align) for m in maps]
    fused = resized[0]
    for m in resized[1:]:
        fused = fused + m if fuse == "sum" else fused * m
    if inter != size:
        fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=align)
    out = fused.numpy()
    if sigma > 0:
        out = np.stack([gaussian_filter(out[i, 0], sigma=sigma, mode="reflect", truncate=4.0)[None]
                        for i in range(len(out))])
    return out


def _features(seed: int, shapes: list[tuple[int, int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(2, c, h, w, generator=g) for c, h, w in shapes]
    student = [t + 0.7 * torch.randn(t.shape, generator=g) for t in teacher]
    teacher[0][0, :, 1, 1] = 0.0  # a zero vector: both norms are clamped at eps
    return teacher, student


@pytest.mark.parametrize("distance", ["cosine", "l2norm"])
@pytest.mark.parametrize("fuse", ["sum", "mul"])
@pytest.mark.parametrize("level", [None, 0, 1])
def test_both_heads_match_a_float64_reference(distance: str, fuse: str, level: int | None) -> None:
    from kdad.blocks.maps import FastAnomalyMapHead

    # non-square everywhere so that height and width cannot be swapped; layer 0 is already at the input size
    teacher, student = _features(0, [(4, 12, 10), (6, 6, 5), (8, 3, 4)])
    for align in (True, False):
        for sigma in (0.0, 0.8):  # 0.8: a blur below 1 still runs (radius 3)
            head = AnomalyMapHead(distance, fuse, sigma, align, level)  # type: ignore[arg-type]
            fast = FastAnomalyMapHead.from_head(head)
            for size in ((12, 10), (20, 14)):  # one fast head for both sizes: its matrix cache is keyed by size
                want = _ref_map(teacher, student, distance, fuse, sigma, align, level, size)
                for h in (head, fast):
                    out = h(teacher, student, size)
                    assert out.anomaly_map.shape == (2, 1, *size) and out.anomaly_map.dtype == torch.float32
                    np.testing.assert_allclose(out.anomaly_map.numpy(), want, atol=2e-5, rtol=1e-5)
                    np.testing.assert_allclose(out.score.numpy(), want.reshape(2, -1).max(1), atol=2e-5)


@pytest.mark.parametrize("distance", ["cosine", "l2norm"])
def test_heads_compute_in_float32_from_bfloat16_features_and_under_autocast(distance: str) -> None:
    from kdad.blocks.maps import FastAnomalyMapHead

    teacher, student = _features(1, [(16, 8, 8), (32, 4, 4)])
    teacher = [t.bfloat16() for t in teacher]
    student = [s.bfloat16() for s in student]
    want = _ref_map(teacher, student, distance, "sum", 1.0, True, None, (16, 16))
    head = AnomalyMapHead(distance, "sum", 1.0)  # type: ignore[arg-type]
    fast = FastAnomalyMapHead.from_head(head)
    for h in (head, fast):
        assert h.layer_maps(teacher, student)[0].dtype == torch.float32
        np.testing.assert_allclose(h(teacher, student, (16, 16)).anomaly_map.numpy(), want, atol=2e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fast head's matrix products stay in fp32
        amap = fast([t.float() for t in teacher], [s.float() for s in student], (16, 16)).anomaly_map
    assert amap.dtype == torch.float32
    np.testing.assert_allclose(amap.numpy(), want, atol=2e-5)


def test_distances_against_their_formulas_with_zero_vectors() -> None:
    from kdad.blocks.maps import normalized_sq_distance, normalized_sq_distance_fast

    teacher, student = _features(2, [(5, 4, 3)])
    t, s = teacher[0], student[0]
    s[1, :, 0, 2] = 0.0
    for fn, kind in ((cosine_distance, "cosine"), (normalized_sq_distance, "l2norm"),
                     (normalized_sq_distance_fast, "l2norm")):
        got = fn(t, s)
        assert got.shape == (2, 1, 4, 3)
        torch.testing.assert_close(got.double(), _ref_distance(t, s, kind), atol=1e-6, rtol=1e-6)
    same = torch.full((1, 3, 2, 2), 1e-3) + torch.arange(3.0).view(1, 3, 1, 1)
    fast_same = normalized_sq_distance_fast(same, same)
    assert float(fast_same.min()) >= 0.0 and float(fast_same.max()) < 1e-6  # rounding never goes negative
    assert torch.equal(normalized_sq_distance_fast(same, -same), torch.full((1, 1, 2, 2), 4.0))
    assert cosine_similarity(t, s, dim=2).shape == (2, 5, 3)
    big = torch.full((1, 2, 1, 1), 1e-6)
    assert float(cosine_similarity(big, big, eps=1e-3)) == pytest.approx(2e-12 / 1e-6)  # norms clamped at eps


@pytest.mark.parametrize("n,radius", [(4, 3), (5, 0), (3, 5), (1, 2)])
def test_symmetric_indices_pad_like_numpy_symmetric(n: int, radius: int) -> None:
    want = np.pad(np.arange(n), radius, mode="symmetric")
    assert symmetric_indices(n, radius).tolist() == want.tolist()


@pytest.mark.parametrize("sigma,truncate", [(1.0, 4.0), (2.5, 4.0), (1.3, 2.0), (0.4, 4.0)])
def test_gaussian_kernel_blur_radius_and_blur_matrix_follow_scipy(sigma: float, truncate: float) -> None:
    from scipy.ndimage import correlate1d

    from kdad.blocks.maps import blur_matrix, blur_radius, gaussian_kernel1d

    radius = int(truncate * sigma + 0.5)
    assert blur_radius(sigma, truncate) == radius
    k = gaussian_kernel1d(sigma, truncate)
    assert k.dtype == torch.float32 and k.numel() == 2 * radius + 1
    impulse = np.zeros(4 * radius + 3)
    impulse[2 * radius + 1] = 1.0
    want = gaussian_filter(impulse, sigma, truncate=truncate)[radius + 1: 3 * radius + 2]
    np.testing.assert_allclose(k.numpy(), want, atol=1e-7)
    v = np.random.default_rng(0).random(7)
    g = blur_matrix(7, sigma, truncate)
    assert g.dtype == torch.float64 and g.shape == (7, 7)
    np.testing.assert_allclose(g.numpy() @ v, correlate1d(v, want, mode="reflect"), atol=1e-12)
    np.testing.assert_allclose(g.numpy() @ v, gaussian_filter(v, sigma, truncate=truncate), atol=1e-12)
    assert blur_radius(0.0) == 0 and blur_radius(-1.0) == 0
    assert blur_radius(1.0) == 4 and gaussian_kernel1d(1.0).numel() == 9  # scipy's default truncate 4
    assert torch.equal(blur_matrix(5, 0.0), torch.eye(5, dtype=torch.float64))


def test_gaussian_blur_with_sigma_zero_is_the_identity() -> None:
    blur = GaussianBlur(0.0)
    assert blur.radius == 0 and blur.sigma == 0.0
    x = torch.rand(1, 1, 5, 4)
    assert blur(x) is x
    b = GaussianBlur(1.0, truncate=2.0)
    assert b.radius == 2 and b.kernel_h.shape == (1, 1, 1, 5) and b.kernel_v.shape == (1, 1, 5, 1)
    assert not {"kernel_h", "kernel_v"} & set(b.state_dict())  # built at construction, not stored in checkpoints
    y = torch.rand(1, 1, 9, 6, dtype=torch.float64)
    want = gaussian_filter(y[0, 0].numpy(), 1.0, truncate=2.0)
    out = b(y)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out[0, 0].numpy(), want, atol=1e-7)


@pytest.mark.parametrize("n_in,n_out", [(4, 9), (9, 4), (5, 5)])
@pytest.mark.parametrize("align", [True, False])
def test_resize_matrix_is_linear_interpolation(n_in: int, n_out: int, align: bool) -> None:
    from kdad.blocks.maps import resize_matrix

    v = torch.rand(2, 1, n_in, dtype=torch.float64)
    r = resize_matrix(n_in, n_out, align)
    assert r.shape == (n_out, n_in) and r.dtype == torch.float64
    torch.testing.assert_close(v @ r.T, F.interpolate(v, size=n_out, mode="linear", align_corners=align))


def test_head_errors_name_the_option_and_value() -> None:
    with pytest.raises(ValueError, match=r"^distance must be 'cosine' or 'l2norm', got 'l1'$"):
        AnomalyMapHead("l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^fuse must be 'sum' or 'mul', got 'max'$"):
        AnomalyMapHead("cosine", "max")  # type: ignore[arg-type]
    for pool in (0, 2, -1):
        with pytest.raises(ValueError, match=rf"^pool must be an odd kernel size >= 1, got {pool}$"):
            AnomalyMapHead(pool=pool)
    head = AnomalyMapHead()
    assert (head.distance, head.fuse, head.align_corners, head.fuse_level, head.pool) == ("cosine", "sum", True,
                                                                                          None, 1)


def test_from_head_copies_every_option() -> None:
    from kdad.blocks.maps import FastAnomalyMapHead

    head = AnomalyMapHead("l2norm", "mul", 2.0, False, 1, pool=3)
    fast = FastAnomalyMapHead.from_head(head)
    assert (fast.distance, fast.fuse, fast.blur.sigma, fast.align_corners, fast.fuse_level, fast.pool) == \
        ("l2norm", "mul", 2.0, False, 1, 3)


class _MapModel(torch.nn.Module):
    """A model whose raw map is a fixed per-pixel ramp times the image's mean, through a map_norm head."""

    def __init__(self, map_norm: str = "position") -> None:
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(map_norm=map_norm)
        self.head = AnomalyMapHead("cosine", "sum", 0.0, map_norm=map_norm)  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor):  # type: ignore[no-untyped-def]
        h, w = images.shape[-2:]
        ramp = torch.linspace(1.0, 5.0, w).expand(h, w)  # "the frame's edge" errs 5x more on every image
        raw = ramp * images.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        amap = self.head.normalize(raw)
        return AnomalyOutput(amap, amap.flatten(1).amax(1))


def test_position_norm_divides_by_the_mean_raw_map_of_the_normals() -> None:
    from kdad.blocks.maps import calibrate_position_norm

    model = _MapModel()
    x = torch.full((4, 3, 8, 8), 0.5)
    raw = model(x).anomaly_map
    assert raw[..., -1].max() == pytest.approx(2.5)  # the identity until calibrated: the edge wins the max
    calibrate_position_norm(model, [{"image": x[:2]}, {"image": x[2:]}], torch.device("cpu"))
    torch.testing.assert_close(model.head.norm.mean, raw[:1].double().float())
    # normals now score 1 everywhere; a defect in the centre of a normal image stands out, the edge does not
    torch.testing.assert_close(model(x).anomaly_map, torch.ones(4, 1, 8, 8))
    # a second calibration sees the raw maps again, not the ones already divided (as the engine's cross-fit needs)
    calibrate_position_norm(model, [{"image": x * 2}], torch.device("cpu"))
    torch.testing.assert_close(model.head.norm.mean, (raw[:1] * 2).float())
    # another input size than calibrated: the statistics are resized, not refused
    assert model(torch.full((1, 3, 16, 16), 1.0)).anomaly_map.shape == (1, 1, 16, 16)


def test_position_norm_is_a_no_op_when_the_method_config_says_none() -> None:
    from kdad.blocks.maps import calibrate_position_norm

    model = _MapModel("none")
    calibrate_position_norm(model, [{"image": torch.rand(2, 3, 8, 8)}], torch.device("cpu"))
    assert not hasattr(model.head, "norm")
    with pytest.raises(ValueError, match="map_norm must be one of"):
        AnomalyMapHead(map_norm="z")  # type: ignore[arg-type]


def test_position_norm_travels_in_the_state_dict_and_old_states_load_as_identity() -> None:
    from kdad.blocks.maps import FastAnomalyMapHead, calibrate_position_norm

    model = _MapModel()
    calibrate_position_norm(model, [{"image": torch.rand(3, 3, 8, 8)}], torch.device("cpu"))
    state = model.state_dict()
    fresh = _MapModel()
    fresh.load_state_dict(state)  # strict: the calibrated size is taken from the state
    torch.testing.assert_close(fresh.head.norm.mean, model.head.norm.mean)
    old = {k: v for k, v in state.items() if not k.endswith("norm.mean")}  # saved before map_norm existed
    fresh2 = _MapModel()
    fresh2.load_state_dict(old)
    assert fresh2.head.norm.mean.numel() == 0
    # the fast inference head shares the calibrated statistics and gives the same map
    teacher = [torch.rand(2, 4, 8, 8)]
    student = [torch.rand(2, 4, 8, 8)]
    head = AnomalyMapHead("cosine", "sum", 1.0, map_norm="position")
    head.norm.mean = torch.rand(1, 1, 16, 16) + 0.5
    fast = FastAnomalyMapHead.from_head(head)
    assert fast.map_norm == "position" and fast.norm is head.norm
    torch.testing.assert_close(fast(teacher, student, (16, 16)).anomaly_map,
                               head(teacher, student, (16, 16)).anomaly_map, rtol=1e-5, atol=1e-6)
    raw = AnomalyMapHead("cosine", "sum", 1.0)(teacher, student, (16, 16)).anomaly_map
    torch.testing.assert_close(head(teacher, student, (16, 16)).anomaly_map, raw / head.norm.mean)
