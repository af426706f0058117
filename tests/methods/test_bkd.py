"""BKD: deformable alignment (eqs. 1-5), memory shrinkage (eqs. 6-10), loss (eqs. 11-12), support set, export."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from kdad.blocks.deform_align import PyramidAlign, deform_conv2d_grid
from kdad.blocks.memory import MemoryModule, hard_shrink
from kdad.config import from_dict, load_config
from kdad.errors import ConfigError, KdadError
from kdad.methods import bkd

TINY = {"backbone": "resnet18", "weights": "random"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small CPU kernels run far faster single-threaded on a shared machine (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def px(*values: float) -> torch.Tensor:
    """A one-pixel feature map (1, C, 1, 1)."""
    return torch.tensor(values).view(1, -1, 1, 1)


def tiny_model(**kw: object) -> bkd.Model:
    torch.manual_seed(0)
    return bkd.Model(from_dict(bkd.Config, {**TINY, **kw}))


# --- deformable alignment -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(7, 9), (1, 3), (12, 12)])
def test_grid_deform_conv_matches_torchvision(size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    h, w = size
    x = torch.randn(2, 8, h, w, generator=g)
    offset = 3 * torch.randn(2, 2 * 2 * 9, h, w, generator=g)  # 2 offset groups, large offsets (out of bounds)
    mask = torch.rand(2, 2 * 9, h, w, generator=g)
    weight, bias = torch.randn(5, 8, 3, 3, generator=g), torch.randn(5, generator=g)
    ref = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert torch.allclose(deform_conv2d_grid(x, offset, weight, bias, mask, padding=1), ref, atol=1e-4)


def test_alignment_starts_as_identity() -> None:
    torch.manual_seed(0)
    align = PyramidAlign([4, 4, 4], [4, 8, 16], 8, 2, modulated=True, slope=0.1)
    s = [torch.randn(2, 4, 16 // 2**i, 16 // 2**i) for i in range(3)]
    q = [torch.randn_like(t) for t in s]
    for a, t in zip(align(q, s), s):
        assert torch.allclose(a, t, atol=1e-5)


@pytest.mark.parametrize("impl", ["torchvision", "grid"])
def test_dcn_aligns_a_known_shift(impl: str) -> None:
    """Support = query shifted by (3, -3) px: 60 Adam steps of the alignment module alone recover the shift."""
    torch.manual_seed(0)
    dy, dx, c = 3, -3, 4
    base = F.interpolate(torch.randn(1, c, 8, 8), size=(48, 48), mode="bicubic", align_corners=False)  # smooth
    q0, s0 = base[:, :, 8:40, 8:40], base[:, :, 8 - dy:40 - dy, 8 - dx:40 - dx]  # q0[y, x] = s0[y + dy, x + dx]
    query = [q0, F.avg_pool2d(q0, 2), F.avg_pool2d(q0, 4)]
    support = [s0, F.avg_pool2d(s0, 2), F.avg_pool2d(s0, 4)]
    align = PyramidAlign([c] * 3, [4, 8, 16], 16, 4, modulated=True, slope=0.1, impl=impl)
    opt = torch.optim.Adam(align.parameters(), lr=3e-3)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # away from content shifted in from outside

    def error(a: torch.Tensor) -> float:
        return float(((a.detach() - q0)[inner] ** 2).mean())

    before = error(s0)
    for _ in range(60):
        aligned, offsets = align.align_with_offsets(query, support)
        loss = sum(((a - q) ** 2).mean() for a, q in zip(aligned, query))
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    aligned, offsets = align.align_with_offsets(query, support)
    assert error(aligned[0]) < 0.02 * before
    centre = offsets[0].detach()[:, :, 4:-4, 4:-4].reshape(1, 4, 9, 2, -1)[0, :, 4].mean(dim=(0, 2))
    assert centre.tolist() == pytest.approx([dy, dx], abs=0.3)  # the centre tap moved by the shift


# --- memory -----------------------------------------------------------------------------------------------------


def test_hard_shrinkage_hand_values() -> None:
    w = torch.tensor([0.5, 0.3, 0.001, 0.002, 0.197], dtype=torch.float64)
    out = hard_shrink(w, threshold=0.002, eps=1e-12)
    # eq. 8: w if w > xi else 0; eq. 9 equals it up to delta: 0.5 * 0.498 / 0.498 = 0.5, 0.001 -> ReLU(-0.001) = 0
    assert out.tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0, 0.197], abs=1e-9)
    g = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.004
    assert torch.allclose(hard_shrink(g, 0.002, 1e-12), torch.where(g > 0.002, g, torch.zeros_like(g)), atol=1e-6)


def test_memory_addressing_hand_values() -> None:
    mem = MemoryModule(items=3, dim=2, threshold=0.2, eps=1e-12)
    with torch.no_grad():
        mem.memory.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    z = torch.tensor([[3.0, 0.0]])  # cosines 1, 0, -1
    e = math.e
    soft = [e / (e + 1 + 1 / e), 1 / (e + 1 + 1 / e), (1 / e) / (e + 1 + 1 / e)]  # 0.665, 0.245, 0.090
    assert soft[2] < 0.2 < soft[1]
    weights = mem.address(z)
    assert weights[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1), 0.0], abs=1e-6)  # shrunk, L1-renormalised
    out, w_map = mem(z.view(1, 2, 1, 1))
    assert out.flatten().tolist() == pytest.approx([2 * e / (e + 1), 1 / (e + 1)], abs=1e-6)  # eq. 10: w' M
    assert w_map.shape == (1, 3, 1, 1)
    plain = MemoryModule(3, 2, 0.2, 1e-12, renormalize=False)
    with torch.no_grad():
        plain.memory.copy_(mem.memory)
    assert plain.address(z)[0].tolist() == pytest.approx([soft[0], soft[1], 0.0], abs=1e-6)


# --- loss -------------------------------------------------------------------------------------------------------


def test_feature_loss_hand_values() -> None:
    cfg = bkd.Config()
    q, x = px(3.0, 4.0), px(0.0, 5.0)
    # value: |(3, -1)|^2 / |(3, 4)|^2 = 10 / 25; direction: 1 - (0*3 + 4*5) / (5 * 5) = 0.2
    assert bkd.feature_loss(q, x, cfg).item() == pytest.approx(0.4 + 0.2, abs=1e-6)
    assert bkd.feature_loss(q, 2 * q, cfg).item() == pytest.approx(1.0, abs=1e-6)  # value only: |Q|^2 / |Q|^2
    weighted = bkd.Config(value_weight=0.5, direction_weight=2.0)
    assert bkd.feature_loss(q, x, weighted).item() == pytest.approx(0.2 + 0.4, abs=1e-6)


def test_bkd_loss_sums_layers_and_averages_shots() -> None:
    q, x = px(3.0, 4.0), px(0.0, 5.0)
    aligned = torch.stack([x, q], dim=1)  # (B=1, k=2, C, 1, 1): one shot off by 0.6, one exact
    p = bkd.Pairs(query=[q, q], decoded=[x, q], aligned=[aligned, aligned])
    total, reverse, forward = bkd.bkd_loss(p, bkd.Config(align_weight=0.5))
    assert reverse.item() == pytest.approx(0.6, abs=1e-6)  # layer 1: 0.6, layer 2: 0
    assert forward.item() == pytest.approx(2 * 0.3, abs=1e-6)  # per layer: mean over shots of (0.6, 0)
    assert total.item() == pytest.approx(0.6 + 0.5 * 0.6, abs=1e-6)


def test_map_is_product_of_layer_maps() -> None:
    head = bkd.BidirectionalHead("min", "mul", sigma=0.0, align_corners=True)
    q = px(1.0, 0.0)
    d = px(1.0, 1.0)  # 1 - cos = 1 - 1/sqrt(2)
    shots = torch.stack([px(0.0, 1.0), px(1.0, 0.0)], dim=1)  # distances 1 and 0 -> min 0
    student = torch.cat([d.unsqueeze(1), shots], dim=1)
    out = head([q, q], [student, student], (2, 2))
    assert out.anomaly_map.shape == (1, 1, 2, 2)
    assert out.score.item() == pytest.approx((1 - 1 / math.sqrt(2)) ** 2, abs=1e-6)


# --- sampling and augmentation ----------------------------------------------------------------------------------


def test_support_indices_exclude_the_query_and_allow_k_above_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    idx = bkd.support_indices(3, 8, gen)
    assert idx.shape == (3, 8)
    assert all(i not in idx[i].tolist() for i in range(3))
    assert bkd.support_indices(2, 4, gen).tolist() == [[1] * 4, [0] * 4]
    assert bkd.support_indices(1, 2, gen).tolist() == [[0, 0]]


def test_random_affine_identity_and_seeded() -> None:
    x = torch.rand(2, 3, 16, 16)
    still = bkd.Config(aug_rotate=0.0, aug_scale=(1.0, 1.0), aug_translate=0.0, aug_shear=0.0)
    assert torch.allclose(bkd.random_affine(x, still, torch.Generator().manual_seed(0)), x, atol=1e-5)
    cfg = bkd.Config(aug_translate=0.1, aug_shear=10.0)
    a = bkd.random_affine(x, cfg, torch.Generator().manual_seed(1))
    b = bkd.random_affine(x, cfg, torch.Generator().manual_seed(1))
    c = bkd.random_affine(x, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- model, support set, switches -------------------------------------------------------------------------------


def test_forward_needs_a_support_set() -> None:
    model = tiny_model().eval()
    with pytest.raises(KdadError, match="no support set"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("switches", [{"augment": False}, {"memory": False}, {"dcn": False},
                                      {"augment": False, "memory": False, "dcn": False}, {"shots": 4}])
def test_table4_switches_train_and_infer(switches: dict[str, object]) -> None:
    model = tiny_model(**switches)
    cfg = model.cfg
    assert (model.align is None) == (not cfg.dcn) and (model.memories is None) == (not cfg.memory)
    opts = bkd.optimizers(model, cfg)
    logs = bkd.train_step(model.train(), {"image": torch.rand(2, 3, 64, 64)}, opts, cfg, torch.Generator())
    assert all(math.isfinite(v) for v in logs.values())
    assert model.support.level0.shape[0] == cfg.shots  # provisional support from the first batch
    with torch.inference_mode():
        out = model.eval()(torch.rand(3, 3, 64, 64))
    assert out.anomaly_map.shape == (3, 1, 64, 64)


def test_calibrate_stores_a_seeded_support_set_that_survives_a_checkpoint() -> None:
    model = tiny_model(shots=3).eval()
    data = [{"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))} for i in range(5)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # type: ignore[arg-type]
    bkd.calibrate(model, loader, torch.device("cpu"))
    first = model.support.level0.clone()
    bkd.calibrate(model, loader, torch.device("cpu"))
    assert torch.equal(first, model.support.level0) and first.shape[0] == 3
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x).anomaly_map
    fresh = tiny_model(shots=3)
    fresh.load_state_dict(model.state_dict(), strict=True)  # buffers resized from (0, C, 0, 0)
    with torch.inference_mode():
        assert torch.equal(fresh.eval()(x).anomaly_map, expected)
        with pytest.raises(KdadError, match="image size"):
            fresh(torch.rand(1, 3, 96, 96))


def test_map_norm_divides_by_the_normals_mean_map_against_the_stored_support() -> None:
    with pytest.raises(ConfigError, match=r"bkd model.map_norm='edge'"):
        bkd.Config(map_norm="edge")
    assert bkd.Config().map_norm == "none"  # the paper's map unless asked
    assert load_config("bkd_cpu").model["map_norm"] == "position"  # chosen in the quality study (session 17)
    assert load_config("bkd_paper").model.get("map_norm", "none") == "none"
    model = tiny_model(shots=2, map_norm="position").eval()
    data = [{"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # type: ignore[arg-type]
    bkd.calibrate(model, loader, torch.device("cpu"))
    x = torch.stack([d["image"] for d in data])
    with torch.inference_mode():
        divided = model(x).anomaly_map
        raw_model = tiny_model(shots=2, map_norm="none").eval()
        raw_model.support.set(model.support.features())
        raw = raw_model(x).anomaly_map
    # the support set is stored before the mean map is taken, so the mean is of maps against that support
    torch.testing.assert_close(divided, raw / raw.mean(0, keepdim=True), rtol=1e-4, atol=1e-6)
    fresh = tiny_model(shots=2, map_norm="position")
    fresh.load_state_dict(model.state_dict(), strict=True)  # the mean map travels with the support set
    with torch.inference_mode():
        torch.testing.assert_close(fresh.eval()(x).anomaly_map, divided)


def test_config_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match="support_reduce"):
        tiny_model(support_reduce="max")
    with pytest.raises(ConfigError, match="shots"):
        tiny_model(shots=0)


@pytest.mark.parametrize("map_norm", ["none", "position"])  # bkd_cpu ships with "position"
def test_onnx_export_matches_torch(map_norm: str) -> None:
    pytest.importorskip("onnxruntime")
    from kdad.export import check_parity, export_model_bytes

    model = tiny_model(map_norm=map_norm)
    opts = bkd.optimizers(model, model.cfg)
    bkd.train_step(model.train(), {"image": torch.rand(2, 3, 64, 64)}, opts, model.cfg, torch.Generator())
    if map_norm == "position":
        data = [{"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))} for i in range(4)]
        bkd.calibrate(model, torch.utils.data.DataLoader(data, batch_size=2),  # type: ignore[arg-type]
                      torch.device("cpu"))
        assert float(model.head.norm.mean.std()) > 0  # a real per-position mean map is in the graph
    graph, _ = export_model_bytes(model.eval(), 64)
    assert check_parity(model, graph, 64)["max_abs_map_diff"] <= 1e-4


def test_bkd_loss_forward_is_the_mean_over_shots_on_full_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 2, 3, generator=g)  # B=2, C=4, H=2, W=3 with k=3 shots: no two sizes alike
    aligned = torch.randn(2, 3, 4, 2, 3, generator=g)
    cfg = bkd.Config()
    _, _, forward = bkd.bkd_loss(bkd.Pairs(query=[q], decoded=[q], aligned=[aligned]), cfg)
    want = sum(bkd.feature_loss(q, aligned[:, j], cfg) for j in range(3)) / 3
    assert forward.item() == pytest.approx(float(want), rel=1e-5)
