"""Anomaly-map head shared by every method: per-layer distance, resize, fuse, Gaussian blur, score.

RD4AD (Deng & Li 2022) uses 1 - cos per layer, bilinear upsampling with align_corners=True, a sum over
layers and scipy's gaussian_filter(sigma=4) (truncate 4, 'reflect' = half-sample symmetric padding).
The blur here is separable with the same symmetric padding, so it matches scipy to float precision at
1/16 of the cost of a dense 33x33 kernel; its kernel is built at construction, so ONNX export is static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Fuse = Literal["sum", "mul"]


class AnomalyOutput(NamedTuple):
    """What every model's forward returns: map (B, 1, H, W) at input size and image score (B,)."""

    anomaly_map: Tensor
    score: Tensor


def cosine_similarity(a: Tensor, b: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """F.cosine_similarity(a, b, dim, eps), computed as <a, b> / (max(|a|, eps) max(|b|, eps)).

    The same value (torch also clamps each norm at eps), without F.cosine_similarity's two normalised
    full-size copies: forward + backward of RD's loss took a third of the time on CPU (docs/benchmarks.md).
    """
    norms = torch.linalg.vector_norm(a, dim=dim).clamp_min(eps) * torch.linalg.vector_norm(b, dim=dim).clamp_min(eps)
    return (a * b).sum(dim) / norms


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cosine similarity along channels: (B, C, h, w) x2 -> (B, 1, h, w), in [0, 2]."""
    return 1.0 - cosine_similarity(a, b).unsqueeze(1)


def normalized_sq_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 of channel-normalised features (STFPM): (B, C, h, w) x2 -> (B, 1, h, w), in [0, 4]."""
    diff = F.normalize(a, dim=1) - F.normalize(b, dim=1)
    return (diff * diff).sum(dim=1, keepdim=True)


def _channel_dots(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a.b, a.a, b.b) summed over channels, (B, 1, h, w) each; one fused pass per product, no temporaries kept."""
    return (a * b).sum(1, keepdim=True), (a * a).sum(1, keepdim=True), (b * b).sum(1, keepdim=True)


def normalized_sq_distance_fast(a: Tensor, b: Tensor) -> Tensor:
    """normalized_sq_distance as |a^|^2 + |b^|^2 - 2 a^.b^ from channel sums (F.normalize's eps 1e-12)."""
    dot, na, nb = _channel_dots(a, b)
    ia, ib = 1.0 / na.sqrt().clamp_min(1e-12), 1.0 / nb.sqrt().clamp_min(1e-12)
    return (na * ia * ia + nb * ib * ib - 2.0 * dot * ia * ib).clamp_min(0.0)


def symmetric_indices(n: int, radius: int) -> Tensor:
    """Indices that pad a length-n axis by `radius` on each side with scipy 'reflect' (d c b a | a b c d)."""
    idx = torch.arange(-radius, n + radius)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian with scipy's radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps with scipy-compatible symmetric padding."""

    kernel_h: Tensor
    kernel_v: Tensor

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        k = gaussian_kernel1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.radius = (k.numel() - 1) // 2
        self.register_buffer("kernel_h", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", k.view(1, 1, -1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.sigma <= 0:
            return x
        h, w = int(x.shape[-2]), int(x.shape[-1])
        r = self.radius
        # Static gather indices (shapes are fixed per model), so the graph exports to ONNX.
        x = x.index_select(-1, symmetric_indices(w, r).to(x.device))
        x = F.conv2d(x, self.kernel_h.to(x.dtype))
        x = x.index_select(-2, symmetric_indices(h, r).to(x.device))
        return F.conv2d(x, self.kernel_v.to(x.dtype))


def pool_features(feats: Sequence[Tensor], k: int) -> list[Tensor]:
    """k x k mean over each position's neighbourhood (stride 1, zero padding not counted), per layer: the local
    aggregation of PatchCore, which drops the texture noise a student cannot predict. k = 1 is the identity."""
    if k <= 1:
        return list(feats)
    return [F.avg_pool2d(f, k, 1, k // 2, count_include_pad=False) for f in feats]


MapNorm = Literal["none", "position"]
MAP_NORMS = ("none", "position")


def check_map_norm(method: str, map_norm: str) -> None:
    """A ConfigError naming `method`'s option unless ``model.map_norm`` is one of MAP_NORMS."""
    from kdad.errors import ConfigError

    if map_norm not in MAP_NORMS:
        raise ConfigError(f"{method} model.map_norm={map_norm!r} is not valid; choose one of {MAP_NORMS}")


def divide_by_mean(amap: Tensor, mean: Tensor) -> Tensor:
    """`amap` (B, C, H, W) over a per-position mean map (1, C, h, w) of normal images, the mean resized bilinearly
    when it was calibrated at another size (PatchST's error grid and PositionNorm share this)."""
    if mean.shape[-2:] != amap.shape[-2:]:
        mean = F.interpolate(mean, size=amap.shape[-2:], mode="bilinear", align_corners=False)
    return amap / mean.to(amap.dtype)


class PositionNorm(nn.Module):
    """Divides a finished map (B, 1, H, W) by the held-out normals' mean map at each pixel (``map_norm:
    position``): normal textures err most along the frame's edges, where a plain max then lands on good images
    (docs/methods/rd.md, "Map normalisation"). The identity until :func:`calibrate_position_norm` fills ``mean``;
    the buffer travels with checkpoints and the ONNX graph, and a checkpoint saved without it loads as identity."""

    mean: Tensor

    def __init__(self, floor: float = 1e-6) -> None:
        super().__init__()
        self.floor = floor
        self.register_buffer("mean", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "mean" not in state_dict:  # saved before map_norm existed: stay the identity, nothing missing
            return
        self.mean = torch.empty_like(state_dict[prefix + "mean"], device=self.mean.device)  # the calibrated size
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, amap: Tensor) -> Tensor:
        return amap if self.mean.numel() == 0 else divide_by_mean(amap, self.mean)


@torch.no_grad()
def calibrate_position_norm(model: nn.Module, normal_loader: Any, device: torch.device) -> None:
    """A method's ``calibrate`` hook for ``model.map_norm: position``: every PositionNorm of `model` gets the
    mean of the raw maps of `normal_loader`'s images (its earlier statistics are dropped first, so a second
    call, as in the engine's cross-fitting, sees raw maps), shrunk towards its global mean by the config's
    ``map_norm_shrink`` and held above ``map_norm_floor`` times that global mean where it has them. With
    ``map_norm_shrink: auto`` the shrink is chosen on synthetic anomalies pasted onto these images
    (kdad.blocks.map_choice) and the choice is left in ``model.map_norm_choice`` for train_info.json; a later call
    keeps it (fit chooses on every held-out normal first, :func:`chooses_on_normals`, so that its cross-fitted
    halves score with the reading the model ships with). A no-op for other settings."""
    if getattr(getattr(model, "cfg", None), "map_norm", "none") != "position":
        return
    norms = [m for m in model.modules() if isinstance(m, PositionNorm)]
    for norm in norms:
        norm.mean = torch.zeros(0, device=norm.mean.device)
    model.eval()
    shrink = getattr(model.cfg, "map_norm_shrink", 0.0)
    floor = float(getattr(model.cfg, "map_norm_floor", 0.0))
    total: Tensor | None = None
    count = 0
    images: list[Tensor] = []
    maps: list[Tensor] = []
    for batch in normal_loader:
        amap = model(batch["image"].to(device)).anomaly_map.double()
        total = amap.sum(0, keepdim=True) if total is None else total + amap.sum(0, keepdim=True)
        count += int(amap.shape[0])
        if shrink == "auto" and getattr(model, "map_norm_choice", None) is None:  # kept for the choice
            images.append(batch["image"].cpu())
            maps.append(amap[:, 0].float().cpu())
    if total is None:
        raise ValueError("map_norm: position needs at least one normal image to calibrate on")
    # imported here: the synthesis package (map_choice's) loads only for a calibration
    from kdad.blocks.map_choice import choose_shrink, shrunk_divisor

    made = getattr(model, "map_norm_choice", None)
    if shrink == "auto" and made is not None:  # made on every held-out normal before fit's cross-fitted halves
        shrink = made["shrink"]
    elif shrink == "auto":
        choice = choose_shrink(model, torch.cat(images), torch.cat(maps), device, floor,
                               batch=int(getattr(normal_loader, "batch_size", None) or 16))
        object.__setattr__(model, "map_norm_choice", choice.to_dict())  # fit puts it in train_info.json
        shrink = choice.shrink
    mean = shrunk_divisor(total / count, float(shrink), floor)
    for norm in norms:
        norm.mean = mean.float().clamp_min(norm.floor).to(norm.mean.device)


def chooses_on_normals(model: nn.Module) -> bool:
    """Whether `model`'s calibration makes a choice on the held-out normals (``map_norm_shrink: auto``) that fit
    should make on all of them before its cross-fitted halves; it is then kept by every later calibration."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "map_norm", "none") == "position" and getattr(cfg, "map_norm_shrink", 0.0) == "auto"


class AnomalyMapHead(nn.Module):
    """Per-layer distances -> resize to the input size -> fuse -> blur -> (map, max score).

    distance: "cosine" (RD family) or "l2norm" (STFPM). fuse: "sum" or "mul". `fuse_level`: fuse the
    layers at the resolution of that layer (STFPM fuses at layer 1, then resizes), None = at input size.
    map_norm: "position" divides the blurred map by the held-out normals' mean map (PositionNorm).
    """

    def __init__(
        self,
        distance: Literal["cosine", "l2norm"] = "cosine",
        fuse: Fuse = "sum",
        sigma: float = 4.0,
        align_corners: bool = True,
        fuse_level: int | None = None,
        pool: int = 1,
        map_norm: MapNorm = "none",
    ) -> None:
        super().__init__()
        if map_norm not in MAP_NORMS:
            raise ValueError(f"map_norm must be one of {MAP_NORMS}, got {map_norm!r}")
        self.map_norm = map_norm
        if map_norm == "position":
            self.norm = PositionNorm()
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pool must be an odd kernel size >= 1, got {pool}")
        self.pool = pool
        if distance not in ("cosine", "l2norm"):
            raise ValueError(f"distance must be 'cosine' or 'l2norm', got {distance!r}")
        if fuse not in ("sum", "mul"):
            raise ValueError(f"fuse must be 'sum' or 'mul', got {fuse!r}")
        self.distance = distance
        self.fuse = fuse
        self.align_corners = align_corners
        self.fuse_level = fuse_level
        self.blur = GaussianBlur(sigma)

    def layer_maps(self, teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
        """Unresized per-layer distance maps, each (B, 1, h_l, w_l)."""
        fn = cosine_distance if self.distance == "cosine" else normalized_sq_distance
        teacher, student = pool_features(teacher, self.pool), pool_features(student, self.pool)
        return [fn(t.float(), s.float()) for t, s in zip(teacher, student)]

    def forward(self, teacher: Sequence[Tensor], student: Sequence[Tensor], size: tuple[int, int]) -> AnomalyOutput:
        amap = self.normalize(self.fuse_maps(self.layer_maps(teacher, student), size))
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))

    def fuse_maps(self, maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Per-layer maps (B, 1, h_l, w_l) -> resized, fused ("sum" or "mul" at `fuse_level`) and blurred (B, 1, *size),
        before map_norm."""
        inter = tuple(maps[self.fuse_level].shape[-2:]) if self.fuse_level is not None else tuple(size)
        fused: Tensor | None = None
        for m in maps:
            if tuple(m.shape[-2:]) != tuple(inter):
                m = F.interpolate(m, size=inter, mode="bilinear", align_corners=self.align_corners)
            if fused is None:
                fused = m
            else:
                fused = fused + m if self.fuse == "sum" else fused * m
        assert fused is not None, "at least one layer is required"
        if tuple(inter) != tuple(size):
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=self.align_corners)
        return self.blur(fused)

    def normalize(self, amap: Tensor) -> Tensor:
        """The finished map, divided by the held-out normals' mean map with map_norm "position"."""
        return self.norm(amap) if self.map_norm == "position" else amap


def resize_matrix(n_in: int, n_out: int, align_corners: bool) -> Tensor:
    """(n_out, n_in) float64 matrix R with R @ v == F.interpolate(v, n_out, mode="linear", align_corners)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in signals of length n_in
    if n_in == n_out:
        return eye[:, 0]
    cols = F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)
    return cols[:, 0].T.contiguous()


def blur_matrix(n: int, sigma: float, truncate: float = 4.0) -> Tensor:
    """(n, n) float64 matrix G with G @ v == GaussianBlur(sigma) of v along one axis (scipy 'reflect')."""
    if sigma <= 0:
        return torch.eye(n, dtype=torch.float64)
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    idx = symmetric_indices(n, radius)  # padded position p reads source idx[p]
    g = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n).repeat_interleave(2 * radius + 1)
    cols = torch.stack([idx[i : i + 2 * radius + 1] for i in range(n)]).flatten()
    g.index_put_((rows, cols), k.repeat(n), accumulate=True)
    return g


class FastAnomalyMapHead(AnomalyMapHead):
    """AnomalyMapHead with resize + fuse + blur as small matrix products (inference speed path).

    Bilinear resizing and the Gaussian blur are linear and separable, so for each layer
    blur(resize(m)) = (G R_h) m (G R_w)^T; with fuse="sum" the layers are summed inside one product:
    out = [B_h1 m_1, ..., B_hL m_L] @ [B_w1; ...; B_wL]^T. Mathematically identical to AnomalyMapHead
    (fp32 rounding differs by ~1e-7); it always runs in fp32, also under autocast. Matrices are cached
    per (layer shapes, size, device).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._mats: dict[tuple[object, ...], object] = {}

    def layer_maps(self, teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
        """As AnomalyMapHead.layer_maps, from channel sums (contiguous with channels_last features)."""
        fn = cosine_distance if self.distance == "cosine" else normalized_sq_distance_fast
        teacher, student = pool_features(teacher, self.pool), pool_features(student, self.pool)
        return [fn(t.float(), s.float()).contiguous() for t, s in zip(teacher, student)]

    @classmethod
    def from_head(cls, head: AnomalyMapHead) -> FastAnomalyMapHead:
        """A fast head with the same options (and so the same maps) as `head`."""
        fast = cls(head.distance, head.fuse, head.blur.sigma, head.align_corners, head.fuse_level, head.pool,  # type: ignore[arg-type]
                   head.map_norm)
        if head.map_norm == "position":
            fast.norm = head.norm  # the same calibrated statistics
        return fast.to(next(head.blur.buffers()).device)

    def _matrices(
        self, shapes: list[tuple[int, int]], size: tuple[int, int], device: torch.device
    ) -> tuple[list[tuple[Tensor, Tensor] | None], tuple[Tensor, Tensor] | None]:
        """Per-layer (left, right) matrices (None = identity) and the final ones after fusing (None = none)."""
        key = (tuple(shapes), tuple(size), str(device))
        if key not in self._mats:
            ac, sigma = self.align_corners, self.blur.sigma
            inter = shapes[self.fuse_level] if self.fuse_level is not None else size
            folded = self.fuse_level is None and self.fuse == "sum"  # blur commutes with the sum: fold it in
            gh, gw = (blur_matrix(size[0], sigma), blur_matrix(size[1], sigma)) if folded else (None, None)
            layers: list[tuple[Tensor, Tensor] | None] = []
            for h, w in shapes:
                if (h, w) == tuple(inter) and gh is None:
                    layers.append(None)
                    continue
                rh, rw = resize_matrix(h, inter[0], ac), resize_matrix(w, inter[1], ac)
                layers.append((rh, rw) if gh is None or gw is None else (gh @ rh, gw @ rw))
            final = None
            if not folded and (tuple(inter) != tuple(size) or sigma > 0):
                final = (blur_matrix(size[0], sigma) @ resize_matrix(inter[0], size[0], ac),
                         blur_matrix(size[1], sigma) @ resize_matrix(inter[1], size[1], ac))
            self._mats[key] = (
                [None if p is None else (p[0].float().to(device), p[1].float().to(device)) for p in layers],
                None if final is None else (final[0].float().to(device), final[1].float().to(device)),
            )
        return self._mats[key]  # type: ignore[return-value]

    def forward(self, teacher: Sequence[Tensor], student: Sequence[Tensor], size: tuple[int, int]) -> AnomalyOutput:
        with torch.autocast(teacher[0].device.type, enabled=False):
            maps = self.layer_maps(teacher, student)
            layers, final = self._matrices([(int(m.shape[-2]), int(m.shape[-1])) for m in maps], size, maps[0].device)
            if self.fuse_level is None and self.fuse == "sum" and all(p is not None for p in layers):
                left = torch.cat([p[0] @ m for p, m in zip(layers, maps) if p is not None], dim=-1)
                amap = left @ torch.cat([p[1] for p in layers if p is not None], dim=1).T
            else:
                fused: Tensor | None = None
                for p, m in zip(layers, maps):
                    m = m if p is None else p[0] @ m @ p[1].T
                    fused = m if fused is None else (fused + m if self.fuse == "sum" else fused * m)
                assert fused is not None, "at least one layer is required"
                amap = fused if final is None else final[0] @ fused @ final[1].T
            amap = self.normalize(amap.contiguous())
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))


def blur_radius(sigma: float, truncate: float = 4.0) -> int:
    """Radius of the blur kernel (scipy convention)."""
    return int(truncate * sigma + 0.5) if sigma > 0 else 0


__all__ = [
    "AnomalyMapHead",
    "AnomalyOutput",
    "FastAnomalyMapHead",
    "GaussianBlur",
    "MAP_NORMS",
    "MapNorm",
    "PositionNorm",
    "blur_matrix",
    "blur_radius",
    "calibrate_position_norm",
    "check_map_norm",
    "chooses_on_normals",
    "cosine_distance",
    "cosine_similarity",
    "divide_by_mean",
    "gaussian_kernel1d",
    "normalized_sq_distance",
    "normalized_sq_distance_fast",
    "resize_matrix",
    "symmetric_indices",
]
