"""High-resolution inspection by tiling: the one home of tile grids, stitching and tiled loading.

With ``data.tiling: true`` an image is not resized to ``data.image_size``. It is read at its native size (or
with its long side resized to ``data.tile_resolution``) and cut into overlapping ``image_size`` tiles; the
model sees one tile at a time (the ONNX graph stays per tile). The tiles' maps are stitched back by
averaging where they overlap, and the image score comes from the stitched map (:func:`image_score`: its max,
or the mean of its top ``data.tile_score_top`` share of pixels). See docs/tiling.md.

Fit trains on every grid tile of the training images; test, thresholds, predict, serve and the ONNX
backend all stitch through :func:`stitched_map`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset

from kdad.data.mvtec import SampleDataset
from kdad.data.transforms import PathLike, image_file_size, load_image
from kdad.errors import ConfigError

if TYPE_CHECKING:
    from kdad.config import DataConfig

Grid = list[tuple[int, int]]
# images01 (B, 3, t, t) -> (maps (B, t, t), scores (B,)): a runner, or a model wrapped by `model_forward`
TileForward = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TileSpec:
    """How images are tiled: tile side (the model input), overlap fraction, full-image long side (0 = native),
    the long side above which stitched maps are area-pooled before pixel metrics (0 = never), and the share of
    the stitched map's pixels whose mean is the image score (0 = its max)."""

    tile: int
    overlap: float = 0.25
    resolution: int = 0
    metric_size: int = 1024
    score_top: float = 0.0

    @classmethod
    def from_data(cls, data: DataConfig) -> TileSpec | None:
        """The spec of a DataConfig (None when data.tiling is off); bad values raise ConfigError naming the key
        (checked also when tiling is off, so a typo surfaces before someone turns it on)."""
        spec = cls(int(data.image_size), float(data.tile_overlap), int(data.tile_resolution),
                   int(data.tile_metric_size), float(data.tile_score_top))
        spec.check(data.format, data.tiling)
        return spec if data.tiling else None

    def check(self, data_format: str = "", tiling: bool = True) -> None:
        """Raise ConfigError naming the data.* key of any value out of range (the tile side and the format
        only matter when tiling is on)."""
        if tiling and self.tile <= 0:
            raise ConfigError(f"data.image_size={self.tile}: with data.tiling it is the tile side and must be > 0")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"data.tile_overlap={self.overlap}: must be in [0, 1) (a fraction of the tile side)")
        if self.resolution < 0:
            raise ConfigError(f"data.tile_resolution={self.resolution}: must be 0 (native) or a long side in pixels")
        if self.metric_size < 0:
            raise ConfigError(f"data.tile_metric_size={self.metric_size}: must be 0 (never pool) or a long side")
        if not 0.0 <= self.score_top < 1.0:
            raise ConfigError(f"data.tile_score_top={self.score_top}: must be in [0, 1) (0 = the map's max; else "
                              "the share of its pixels whose mean is the image score, e.g. 0.01)")
        if tiling and data_format == "loco":
            raise ConfigError("data.tiling is not supported for data.format=loco (its AU-sPRO channels are read "
                              "at image_size); use tiling with mvtec, folder, visa, btad, mvtec_ad2, 3cad or realiad")

    @property
    def stride(self) -> int:
        """Step between tile origins: the tile side less the overlap (at least 1 pixel)."""
        return max(1, int(round(self.tile * (1.0 - self.overlap))))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ONNX metadata and metrics.json (with how maps are stitched and scored)."""
        return {**asdict(self), "stride": self.stride, "stitch": "mean of overlapping tile maps",
                "score": score_rule(self.score_top), "full_image": "native size" if not self.resolution
                else f"long side resized to {self.resolution} (aspect kept)"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileSpec:
        """Inverse of to_dict (extra descriptive keys are ignored)."""
        return cls(int(d["tile"]), float(d["overlap"]), int(d["resolution"]), int(d.get("metric_size", 1024)),
                   float(d.get("score_top", 0.0)))  # exports from before score_top scored by the max


def score_rule(top: float) -> str:
    """The image-score rule of a tiling, in words (metrics.json, ONNX metadata)."""
    return "max of the stitched map" if not top else f"mean of the top {top:g} of the stitched map's pixels"


def image_score(amap: np.ndarray, spec: TileSpec) -> float:
    """The image score of a stitched map: its max, or the mean of its ``spec.score_top`` share of highest pixels.

    The max of a larger map rises on normal images too (more positions, so a higher extreme); a share of the
    pixels keeps the same meaning at every map size (docs/tiling.md, "Image score")."""
    flat = np.asarray(amap, np.float32).ravel()
    if not spec.score_top:
        return float(flat.max())
    k = max(1, int(round(flat.size * spec.score_top)))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


def axis_starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile origins along an axis of length n >= tile: every `stride`, the last one flush to the end."""
    if n < tile:
        raise ValueError(f"axis of {n} px is shorter than the tile ({tile} px)")
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


def tile_grid(h: int, w: int, tile: int, overlap: float = 0.25) -> Grid:
    """(y, x) origins of tiles covering an (h, w) image, rows first; the last row/column is flush to the border."""
    stride = TileSpec(tile, overlap).stride
    return [(y, x) for y in axis_starts(h, tile, stride) for x in axis_starts(w, tile, stride)]


def tiled_hw(h: int, w: int, spec: TileSpec) -> tuple[int, int]:
    """Size an (h, w) image is read at: native, or long side = spec.resolution; never with a side below the
    tile (a smaller image is scaled up, aspect kept, so at least one tile fits)."""
    scale = spec.resolution / max(h, w) if spec.resolution else 1.0
    scale = max(scale, spec.tile / min(h, w))
    if scale == 1.0:
        return h, w
    return max(spec.tile, round(h * scale)), max(spec.tile, round(w * scale))


def to_tiles(image: torch.Tensor, grid: Grid, tile: int) -> torch.Tensor:
    """(C, H, W) -> (N, C, tile, tile), one per grid origin (views copied into one batch)."""
    return torch.stack([image[:, y : y + tile, x : x + tile] for y, x in grid])


def stitch(tile_maps: np.ndarray, grid: Grid, hw: tuple[int, int]) -> np.ndarray:
    """(N, t, t) tile maps -> (H, W) map, the mean of every tile covering a pixel.

    Mean, not max: a tile's border pixels see less context (and the blur's padding), and averaging them with
    the neighbour's interior view keeps seams smooth; where tiles agree the result equals either map.
    """
    t = int(tile_maps.shape[-1])
    acc = np.zeros(hw, np.float64)
    count = np.zeros(hw, np.float64)
    for m, (y, x) in zip(tile_maps, grid, strict=True):
        acc[y : y + t, x : x + t] += m
        count[y : y + t, x : x + t] += 1.0
    if (count == 0).any():
        raise ValueError(f"grid of {len(grid)} tiles of {t} px does not cover an image of {hw}")
    return (acc / count).astype(np.float32)


def stitched_map(forward: TileForward, image: torch.Tensor, spec: TileSpec, batch_size: int = 16) -> np.ndarray:
    """Tile (3, H, W) in [0, 1], run `forward` on chunks of `batch_size` tiles, stitch: (H, W) float32.

    No blur is applied to the stitched map: each tile's map already went through the method's own blur.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    grid = tile_grid(h, w, spec.tile, spec.overlap)
    maps = []
    for i in range(0, len(grid), max(1, batch_size)):
        chunk = grid[i : i + batch_size]
        maps.append(np.asarray(forward(to_tiles(image, chunk, spec.tile))[0], np.float32))
    return stitch(np.concatenate(maps), grid, (h, w))


def model_forward(model: torch.nn.Module, device: torch.device) -> TileForward:
    """A model's forward as a TileForward (maps and scores on the CPU as numpy)."""

    def forward(tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = model(tiles.to(device))
        return out.anomaly_map[:, 0].float().cpu().numpy(), out.score.float().cpu().numpy()

    return forward


def metric_hw(hw: tuple[int, int], spec: TileSpec) -> tuple[int, int]:
    """Size maps and masks are kept at for pixel metrics: hw, or divided by the smallest integer factor that
    brings the long side to spec.metric_size or below (bounded memory for AU-PRO over many large maps)."""
    if not spec.metric_size or max(hw) <= spec.metric_size:
        return hw
    k = math.ceil(max(hw) / spec.metric_size)
    return max(1, hw[0] // k), max(1, hw[1] // k)


def metric_view(amap: np.ndarray, mask: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) map and bool mask brought to `hw` for metrics: the map area-averaged (a smooth map keeps its
    values), the mask max-pooled (a defect of a few pixels stays in the ground truth); scaled up bilinearly /
    nearest when an image is smaller than `hw`."""
    if amap.shape == tuple(hw):
        return amap, mask
    m = torch.from_numpy(np.ascontiguousarray(amap, np.float32))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None, None]
    if amap.shape[0] >= hw[0] and amap.shape[1] >= hw[1]:
        m, g = F.adaptive_avg_pool2d(m, hw), F.adaptive_max_pool2d(g, hw)
    else:
        m, g = F.interpolate(m, size=hw, mode="bilinear", align_corners=False), F.interpolate(g, size=hw)
    return m[0, 0].numpy(), g[0, 0].numpy() > 0.5


def load_tiled_image(source: PathLike | Any, spec: TileSpec, max_megapixels: float | None = None) -> torch.Tensor:
    """An image file (or file object) as (3, H, W) in [0, 1] at its tiled size (:func:`tiled_hw`); its header
    is checked against the pixel cap (`max_megapixels`, default the shared one) before decoding."""
    return load_image(source, lambda h, w: tiled_hw(h, w, spec), max_megapixels)


class TiledImages(SampleDataset):
    """The items of a SampleDataset (any dataset format but LOCO), each read at its tiled size instead of
    image_size: image (3, H, W), mask (1, H, W) at that size, and the usual label/path/defect_type/has_mask."""

    def __init__(self, ds: Any, spec: TileSpec) -> None:
        if not hasattr(ds, "samples"):
            raise ConfigError(f"data.tiling: {type(ds).__name__} does not list its image files, so it cannot be tiled")
        super().__init__(ds.samples, functools.partial(tiled_hw, spec=spec))  # a size rule of the native size
        self.spec = spec
        self._hw: dict[int, tuple[int, int]] = {}

    def hw(self, index: int) -> tuple[int, int]:
        """Tiled (H, W) of item `index`, from the file header (no decoding)."""
        if index not in self._hw:
            w, h = image_file_size(self.samples[index].image_path)
            self._hw[index] = tiled_hw(h, w, self.spec)
        return self._hw[index]


def tiled_dataset(ds: Dataset, data: DataConfig) -> Dataset:
    """`ds` itself, or its images at the tiled size when data.tiling is on (the hook of data/factory.py)."""
    spec = TileSpec.from_data(data)
    return ds if spec is None else TiledImages(ds, spec)


def _item_hw(ds: Dataset, index: int) -> tuple[int, int]:
    """(H, W) of item `index` through Subset/ConcatDataset/tagging wrappers, from headers where possible."""
    if isinstance(ds, TiledImages):
        return ds.hw(index)
    if isinstance(ds, Subset):
        return _item_hw(ds.dataset, int(ds.indices[index]))
    if isinstance(ds, ConcatDataset):
        part = int(np.searchsorted(ds.cumulative_sizes, index, side="right"))
        start = ds.cumulative_sizes[part - 1] if part else 0
        return _item_hw(ds.datasets[part], index - start)
    inner = getattr(ds, "ds", None)  # kdad.data.factory's category tag
    if isinstance(inner, Dataset):
        return _item_hw(inner, index)
    image = ds[index]["image"]  # an unknown wrapper: load the item once
    return int(image.shape[-2]), int(image.shape[-1])


class GridTiles(Dataset[dict[str, Any]]):
    """Every grid tile of every image of `ds` as one training item (image (3, t, t), mask (1, t, t)).

    Each item decodes its whole image and crops it: data.num_workers hides that cost on large images.
    """

    def __init__(self, ds: Dataset, spec: TileSpec) -> None:
        self.ds, self.spec = ds, spec
        self.index: list[tuple[int, int, int]] = []
        for i in range(len(ds)):  # type: ignore[arg-type]
            h, w = _item_hw(ds, i)
            self.index += [(i, y, x) for y, x in tile_grid(h, w, spec.tile, spec.overlap)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, y, x = self.index[k]
        item, t = self.ds[i], self.spec.tile
        return {**item, "image": item["image"][:, y : y + t, x : x + t].contiguous(),
                "mask": item["mask"][:, y : y + t, x : x + t].contiguous()}


def training_tiles(ds: Dataset, spec: TileSpec | None) -> Dataset:
    """What a model trains (or calibrates) on: `ds`, or every grid tile of its images when tiling."""
    if spec is None or isinstance(ds, GridTiles):
        return ds
    return GridTiles(ds, spec)


class RunnerView:
    """A runner (TorchRunner, OnnxRunner) behind another view of its input (tiles here, the part's pose in
    kdad.align): the wrapped runner's input size, thresholds, display range and post-processing, passed through."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.image_size = int(runner.image_size)
        self.image_threshold: float | None = runner.image_threshold
        self.pixel_threshold: float | None = runner.pixel_threshold
        self.vmin, self.vmax = runner.vmin, runner.vmax
        self.post = getattr(runner, "post", None)  # the wrapped runner's kdad.deploy.postprocess.PostProcess

    @property
    def pixel_min_area(self) -> int:
        """The wrapped runner's region-rate minimum defect area (pixels), so masks of the view's maps use it."""
        return int(getattr(self.runner, "pixel_min_area", 1))


class TiledRunner(RunnerView):
    """A runner behind tiling, with the runner interface: images01 (B, 3, H, W) of any size >= the tile ->
    (stitched maps (B, H, W), scores (B,) = image_score of each map)."""

    def __init__(self, runner: Any, spec: TileSpec, batch_size: int = 16) -> None:
        super().__init__(runner)
        self.spec, self.batch_size = spec, batch_size
        if self.image_size != spec.tile:
            raise ConfigError(f"tiling: tiles of {spec.tile} px but the model input is {self.image_size} px")

    @torch.inference_mode()
    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = np.stack([stitched_map(self.runner, img, self.spec, self.batch_size) for img in images01])
        return maps, np.array([image_score(m, self.spec) for m in maps], np.float32)

    def info(self) -> dict[str, Any]:
        """The runner's facts plus the tiling (the input contract stays the per-tile one)."""
        return {**self.runner.info(), "tiling": self.spec.to_dict()}


def runner_spec(runner: Any) -> TileSpec | None:
    """The tiling a TorchRunner's checkpoint config or an OnnxRunner's metadata records (None = untiled)."""
    cfg = getattr(runner, "cfg", None)
    if cfg is not None:
        return TileSpec.from_data(cfg.data)
    tiling = (getattr(runner, "meta", None) or {}).get("tiling")
    return TileSpec.from_dict(tiling) if tiling else None


def tiled_runner(runner: Any, batch_size: int = 16) -> Any:
    """`runner` wrapped in a TiledRunner when its model was trained with tiling, else `runner` itself."""
    spec = runner_spec(runner)
    return runner if spec is None else TiledRunner(runner, spec, batch_size)


def image_loader(runner: Any, size: int, max_megapixels: float | None = None) -> Callable[[Any], torch.Tensor]:
    """How inputs are read for `runner` (picklable, for loader workers): at the tiled size for a TiledRunner,
    else resized to `size`; either way under the pixel cap `max_megapixels` (None = the shared default)."""
    if isinstance(runner, TiledRunner):
        return functools.partial(load_tiled_image, spec=runner.spec, max_megapixels=max_megapixels)
    return functools.partial(load_image, size=size, max_megapixels=max_megapixels)


def images_per_call(runner: Any, batch_size: int) -> int:
    """Images per runner call: one for a TiledRunner (images differ in size; its tiles are batched inside)."""
    return 1 if isinstance(runner, TiledRunner) else batch_size
