"""Tiling (kdad.tiling): grids, stitching, tiled sizes, config checks, and why tiling finds small defects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kdad.blocks.maps import AnomalyOutput
from kdad.config import load_config
from kdad.data.transforms import load_image
from kdad.errors import ConfigError
from kdad.tiling import (
    TiledRunner,
    TileSpec,
    image_score,
    metric_hw,
    metric_view,
    model_forward,
    stitch,
    stitched_map,
    tile_grid,
    tiled_hw,
    to_tiles,
)


@pytest.mark.parametrize(("h", "w", "tile", "overlap"),
                         [(768, 768, 256, 0.25), (1000, 700, 256, 0.5), (256, 256, 256, 0.25), (300, 257, 256, 0.0),
                          (513, 640, 128, 0.1)])
def test_grid_covers_the_image_with_the_last_tile_flush(h: int, w: int, tile: int, overlap: float) -> None:
    grid = tile_grid(h, w, tile, overlap)
    ys, xs = sorted({y for y, _ in grid}), sorted({x for _, x in grid})
    assert len(grid) == len(ys) * len(xs)
    assert ys[0] == xs[0] == 0 and ys[-1] == h - tile and xs[-1] == w - tile  # flush to both borders
    stride = TileSpec(tile, overlap).stride
    assert all(b - a <= stride for a, b in zip(ys, ys[1:])) and all(b - a <= stride for a, b in zip(xs, xs[1:]))
    count = np.zeros((h, w))
    for y, x in grid:
        count[y : y + tile, x : x + tile] += 1
    assert count.min() >= 1


def test_grid_refuses_an_image_smaller_than_the_tile() -> None:
    with pytest.raises(ValueError, match="shorter than the tile"):
        tile_grid(200, 300, 256)


def test_stitch_of_agreeing_tiles_is_the_global_map() -> None:
    full = np.random.default_rng(0).random((300, 420)).astype(np.float32)
    grid = tile_grid(300, 420, 128, 0.3)
    tiles = np.stack([full[y : y + 128, x : x + 128] for y, x in grid])
    np.testing.assert_allclose(stitch(tiles, grid, (300, 420)), full, atol=1e-6)


def test_stitch_averages_where_tiles_overlap() -> None:
    grid = [(0, 0), (0, 64)]
    out = stitch(np.stack([np.zeros((128, 128)), np.ones((128, 128))]), grid, (128, 192))
    assert (out[:, :64] == 0).all() and (out[:, 64:128] == 0.5).all() and (out[:, 128:] == 1).all()


def test_to_tiles_and_stitch_round_trip_an_image() -> None:
    image = torch.rand(3, 200, 330, generator=torch.Generator().manual_seed(1))
    grid = tile_grid(200, 330, 96, 0.25)
    tiles = to_tiles(image, grid, 96)
    assert tiles.shape == (len(grid), 3, 96, 96)
    for c in range(3):
        np.testing.assert_allclose(stitch(tiles[:, c].numpy(), grid, (200, 330)), image[c].numpy(), atol=1e-6)


def test_tiled_sizes() -> None:
    assert tiled_hw(1024, 768, TileSpec(256)) == (1024, 768)  # native
    assert tiled_hw(1944, 2592, TileSpec(256, resolution=1296)) == (972, 1296)  # long side, aspect kept
    assert tiled_hw(100, 300, TileSpec(256)) == (256, 768)  # too small: scaled up until a tile fits


def test_metric_size_pools_large_maps_and_keeps_tiny_defects_in_the_mask() -> None:
    spec = TileSpec(256, metric_size=1024)
    assert metric_hw((1024, 1024), spec) == (1024, 1024)
    assert metric_hw((1944, 2592), spec) == (648, 864)
    assert metric_hw((4000, 4000), TileSpec(256, metric_size=0)) == (4000, 4000)
    mask = np.zeros((2048, 2048), bool)
    mask[1001:1003, 1501:1503] = True  # 2x2 px defect
    amap = np.ones((2048, 2048), np.float32)
    view, gt = metric_view(amap, mask, (1024, 1024))
    assert gt.sum() >= 1 and np.allclose(view, 1.0)


@pytest.mark.parametrize(("key", "value"), [("tile_overlap", 1.0), ("tile_overlap", -0.1), ("tile_resolution", -5),
                                            ("tile_metric_size", -1), ("tile_score_top", 1.0),
                                            ("tile_score_top", -0.01)])
def test_bad_tiling_values_name_their_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"data.{key}"):
        load_config(None, None, ["data.tiling=true", f"data.{key}={value}"])


def test_image_score_is_the_max_or_the_mean_of_the_top_share() -> None:
    amap = np.arange(100, dtype=np.float32).reshape(10, 10)[::-1]
    assert image_score(amap, TileSpec(64)) == 99.0
    assert image_score(amap, TileSpec(64, score_top=0.05)) == pytest.approx(97.0)  # mean of 95..99
    assert image_score(amap, TileSpec(64, score_top=0.001)) == 99.0  # at least one pixel
    spec = TileSpec(64, score_top=0.01)
    assert TileSpec.from_dict(spec.to_dict()) == spec and "top 0.01" in spec.to_dict()["score"]
    old = {k: v for k, v in TileSpec(64).to_dict().items() if k != "score_top"}  # an export from before the key
    assert TileSpec.from_dict(old).score_top == 0.0


def test_top_share_score_does_not_rise_with_the_map_size() -> None:
    # Normal images: the same noise on a 4x larger stitched map. Its max rises (more positions, a higher
    # extreme), so a tiled run's good images score higher than a resized run's; a share of pixels does not.
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=(20, 128, 128)), rng.normal(size=(20, 256, 256))  # 20 good images each

    def mean_score(maps: np.ndarray, spec: TileSpec) -> float:
        return float(np.mean([image_score(m, spec) for m in maps]))

    top = TileSpec(64, score_top=0.01)
    assert mean_score(large, TileSpec(64)) - mean_score(small, TileSpec(64)) > 0.2  # expected about 0.35
    assert abs(mean_score(large, top) - mean_score(small, top)) < 0.02


def test_tiling_refuses_loco() -> None:
    with pytest.raises(ConfigError, match="data.tiling.*loco"):
        load_config(None, None, ["data.tiling=true", "data.format=loco"])


# ------------------------------------------------------------------- a defect that a 256-px resize erases
class StrideFourContrast(nn.Module):
    """A stand-in detector with a CNN's coarseness: |pixel - its 9x9 mean| averaged over 4x4 cells (a
    stride-4 feature), upsampled back to the input. Deterministic, so the test says what resizing does to
    the evidence and not how well a few training steps went."""

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        gray = images.mean(1, keepdim=True)
        local = F.avg_pool2d(F.pad(gray, (4, 4, 4, 4), mode="reflect"), 9, stride=1)
        cells = F.avg_pool2d((gray - local).abs(), 4)
        amap = F.interpolate(cells, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return AnomalyOutput(amap, amap.flatten(1).amax(1))


WEAVE = 0.25


def _texture(seed: int, defect: tuple[int, int] | None, side: int = 768) -> np.ndarray:
    """A woven grey texture (period 24 px: 8 px after a 256-px resize, where it dominates local contrast),
    shading and fine sensor noise; optionally a 3x3 px dark dot."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((side // 64, side // 64)).astype(np.float32)
    base = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[:side, :side] * (2 * np.pi / 24)
    weave = WEAVE * np.sin(yy + rng.random() * 6) * np.sin(xx + rng.random() * 6)
    image = 0.45 + 0.2 * (base - base.mean()) + weave + rng.normal(0, 0.03, (side, side))
    if defect is not None:
        y, x = defect
        image[y : y + 3, x : x + 3] -= 0.35
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    return (rgb * 255).round().astype(np.uint8)


def test_a_dot_that_a_256px_resize_erases_is_found_by_tiling(tmp_path) -> None:  # noqa: ANN001
    dot = (100, 700)
    paths = {}
    normals = ("normal_a", "normal_b", "normal_c")
    for name, seed, defect in (("normal_a", 1, None), ("normal_b", 2, None), ("normal_c", 4, None), ("defect", 3, dot)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(_texture(seed, defect)).save(paths[name])
    model = StrideFourContrast().eval()
    forward = model_forward(model, torch.device("cpu"))
    spec = TileSpec(256, 0.25)

    def resized(name: str) -> np.ndarray:  # today's path: the whole image resized to 256 px
        return forward(load_image(paths[name], 256)[None])[0][0]

    def tiled(name: str) -> np.ndarray:  # tiles at native resolution, stitched
        return stitched_map(forward, load_image(paths[name], 768), spec, batch_size=4)

    normal_resized = max(resized(n).max() for n in normals)
    normal_tiled = max(tiled(n).max() for n in normals)
    at_256, at_native = resized("defect"), tiled("defect")
    assert at_native.shape == (768, 768)
    assert at_256.max() < normal_resized  # resized: scored below a normal image, no threshold separates it
    assert at_native.max() > 1.4 * normal_tiled  # tiled: far above every normal image
    peak = np.unravel_index(int(at_native.argmax()), at_native.shape)
    assert abs(peak[0] - dot[0] - 1) <= 6 and abs(peak[1] - dot[1] - 1) <= 6


def test_tiled_runner_stitches_any_runner() -> None:
    from tests.fakes import FakeRunner

    fake = FakeRunner(StrideFourContrast(), 128)  # the runner interface over the stand-in detector

    tiled = TiledRunner(fake, TileSpec(128, 0.25), batch_size=3)
    images = torch.rand(2, 3, 300, 200, generator=torch.Generator().manual_seed(0))
    maps, scores = tiled(images)
    assert maps.shape == (2, 300, 200) and np.allclose(scores, maps.reshape(2, -1).max(1))
    assert tiled.info()["tiling"]["tile"] == 128 and tiled.image_threshold == 0.5
    top = TiledRunner(fake, TileSpec(128, 0.25, score_top=0.02), batch_size=3)
    maps, scores = top(images)
    assert np.allclose(scores, [np.sort(m.ravel())[-round(m.size * 0.02):].mean() for m in maps], atol=1e-6)
    assert (scores < maps.reshape(2, -1).max(1)).all()
    with pytest.raises(ConfigError, match="model input"):
        TiledRunner(fake, TileSpec(256))
