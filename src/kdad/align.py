"""Pose normalisation of a single part on a plain backdrop: the one home of ``data.align``.

A student-teacher model compares features position by position, so a part that reaches the camera at any angle
and place makes every pose rare in training, and the student's error on normal parts drowns the defects (on the
generated screws the paper methods score at chance; docs/quality.md, "Session 22"). With ``data.align: axis``
each image is turned and shifted before the model sees it so that the part's long axis is horizontal, its
heavier end on the same side, its centre at the image centre, and the part ``data.align_zoom`` times larger.
With ``data.align: auto`` fit decides from the training images (:func:`resolve_auto`, the rules of
:class:`PoseSpread`) and stores "axis" or "none". The model trains and scores in that aligned frame; the
anomaly map is warped back onto the input image, so maps, masks, overlays and pixel metrics stay in the image's
own frame. The image score is the aligned map's.

The pose comes from the image alone (no learned part): foreground = pixels whose blurred grey level differs from
the backdrop (the median of the image border) by more than an Otsu threshold; centre and axis from the
foreground's first and second moments; the side from the sign of its third moment along the axis. It assumes
one part, darker or lighter than an even backdrop, whose two ends differ (a screw's head and tip); a part
whose ends look alike may come out either way round. See docs/align.md.

Fit trains and calibrates on aligned images (:class:`AlignedImages`, the model unchanged); evaluation,
``kdad calibrate``, predict, serve and the ONNX backend run the model through :class:`AlignedModel` or
:class:`AlignedRunner`. The ONNX graph stays the aligned-image model; the pose is host code, as tiling is.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdad.blocks.maps import AnomalyOutput
from kdad.data.transforms import load_image
from kdad.errors import ConfigError, DatasetError
from kdad.tiling import RunnerView, tiled_runner

if TYPE_CHECKING:
    from kdad.config import DataConfig

ALIGN_MODES = ("none", "axis", "auto")
ALIGN_REGIONS = ("frame", "part")
# data.align_region=part keeps the map on the part's envelope: the aligned-frame pixels where at least this share of
# the training images fit measures (up to ENVELOPE_SAMPLE) have their part, not grown. One fixed region, so a missing
# piece (a broken tip) still lies inside it. Chosen on screws_dusty for cfrg_cpu and dskd_cpu (image AUROC 0.805 and
# 0.899) against each image's own part (0.751, 0.857), a share of 0.1 (0.801, 0.880) and margins of -4 to 16 px
# (benchmarks/part_roi.py; docs/quality.md, "Session 30")
ENVELOPE_SHARE = 0.5
ENVELOPE_SAMPLE = 128
_BINS = 64  # Otsu histogram bins: enough for a part against a backdrop, cheap per image


@dataclass(frozen=True)
class AlignSpec:
    """How images are pose-normalised: the zoom of the part about its centre (1 = its size in the image), and the
    region of the aligned map kept ("frame": all of it; "part": the part's envelope, :func:`encode_mask`'s text,
    measured by fit; :func:`restrict_to_part`)."""

    zoom: float = 1.0
    region: str = "frame"
    envelope: str = ""

    def envelope_mask(self) -> Tensor | None:
        """The part's envelope (H, W) bool in the aligned frame with region "part", else None."""
        return decode_mask(self.envelope) if self.region == "part" else None

    @classmethod
    def from_data(cls, data: DataConfig, allow_auto: bool = False) -> AlignSpec | None:
        """The spec of a DataConfig (None when data.align is "none"); bad values raise ConfigError naming the key
        (the zoom is checked also when alignment is off, so a typo surfaces before someone turns it on).

        "auto" is resolved by fit (:func:`resolve_auto`) and never reaches a trained model's config: with
        `allow_auto` (config validation) it gives None, otherwise a ConfigError."""
        if data.align not in ALIGN_MODES:
            raise ConfigError(f"data.align={data.align!r}: must be one of {list(ALIGN_MODES)}")
        if data.align_region not in ALIGN_REGIONS:
            raise ConfigError(f"data.align_region={data.align_region!r}: must be one of {list(ALIGN_REGIONS)}")
        spec = cls(float(data.align_zoom), data.align_region, data.align_envelope)
        if not 0.25 <= spec.zoom <= 4.0:
            raise ConfigError(f"data.align_zoom={data.align_zoom}: must be in [0.25, 4] (1 = the part's own size)")
        if not (data.align_fill == 0 or 0.2 <= data.align_fill <= 1.2):
            raise ConfigError(f"data.align_fill={data.align_fill}: must be 0 (keep data.align_zoom) or in [0.2, 1.2] "
                              "(the share of the image side the longest part spans)")
        if data.align_fill and data.align_zoom != 1.0:  # fit would overwrite the zoom someone asked for
            raise ConfigError(f"data.align_zoom={data.align_zoom} and data.align_fill={data.align_fill} both set the "
                              "zoom: add --set data.align_fill=0 to keep that zoom, or drop data.align_zoom")
        if data.align == "auto" or (data.align == "axis" and (data.align_fill or _envelope_due(data))):
            if allow_auto:
                return None
            raise ConfigError(f"data.align={data.align} with data.align_fill={data.align_fill} and data.align_region="
                              f"{data.align_region} is resolved by kdad fit from the training images (to a mode, a "
                              "zoom and the part's envelope); this config has not been through fit")
        if data.align == "none":
            return None
        if data.tiling:
            raise ConfigError("data.align and data.tiling exclude each other (a tile is not a whole part)")
        if data.format == "loco":
            raise ConfigError("data.align is not supported for data.format=loco (its AU-sPRO channels are read "
                              "in the image's own frame)")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ONNX metadata and metrics.json."""
        return {"mode": "axis", "zoom": self.zoom, "region": self.region, "envelope": self.envelope,
                "rule": "part's long axis horizontal, heavier end fixed, centre at the image centre; map warped back"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignSpec:
        """Inverse of to_dict (descriptive keys ignored; files written before data.align_region keep the frame)."""
        return cls(float(d["zoom"]), str(d.get("region", "frame")), str(d.get("envelope", "")))


def _envelope_due(data: DataConfig) -> bool:
    return data.align_region == "part" and not data.align_envelope


def encode_mask(mask: Tensor) -> str:
    """A bool mask (H, W) as short text for config.yaml and ONNX metadata: "HxW:" and the base64 of its zlib'd
    packed bits (a part's envelope at 256 px: a few hundred characters)."""
    h, w = mask.shape
    bits = np.packbits(mask.cpu().numpy().astype(bool).ravel())
    return f"{h}x{w}:" + base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode("ascii")


@functools.lru_cache(maxsize=8)  # every batch asks for it; the tensor is read, never written
def decode_mask(text: str) -> Tensor:
    """Inverse of :func:`encode_mask`; a ConfigError naming data.align_envelope when the text is not one."""
    try:
        size, _, body = text.partition(":")
        h, w = (int(v) for v in size.split("x"))
        bits = np.frombuffer(zlib.decompress(base64.b64decode(body, validate=True)), np.uint8)
        return torch.from_numpy(np.unpackbits(bits)[: h * w].reshape(h, w).astype(bool))
    except (ValueError, binascii.Error, zlib.error) as e:
        raise ConfigError(f"data.align_envelope={text[:40]!r}...: not a mask kdad fit wrote ({e}); set "
                          "data.align_envelope='' and fit again") from e


def _otsu(d: Tensor) -> Tensor:
    """Per-image Otsu threshold (B,) of values d (B, N): the cut that maximises the between-class variance."""
    lo, hi = d.amin(1, keepdim=True), d.amax(1, keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    idx = ((d - lo) / span * (_BINS - 1)).round().long().clamp(0, _BINS - 1)
    hist = torch.zeros(d.shape[0], _BINS, dtype=d.dtype, device=d.device).scatter_add_(1, idx, torch.ones_like(d))
    p = hist / d.shape[1]
    omega = p.cumsum(1)
    mu = (p * torch.arange(_BINS, dtype=d.dtype, device=d.device)).cumsum(1)
    between = (mu[:, -1:] * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    k = between[:, :-1].argmax(1).to(d.dtype)  # the last cut leaves one class empty
    return lo[:, 0] + (k + 0.5) / (_BINS - 1) * span[:, 0]


def _border(x: Tensor) -> Tensor:
    """The values on the frame of each image of x (B, H, W), flattened to (B, 2H + 2W)."""
    return torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)


def backdrop(grey: Tensor) -> Tensor:
    """(B, H, W) grey levels -> (B, H, W) the backdrop's grey level under the light: a quadratic surface in x and y
    fitted to a band along the image border, robustly (pixels more than 3 MADs off the fit, such as dust or a
    part near the edge, are dropped and the fit redone, twice).

    A constant (the border's median) is not enough: light that falls off towards the corners leaves the middle
    of the backdrop brighter than its border, and the Otsu cut then splits lit from unlit backdrop instead of
    part from backdrop (benchmarks/align_lighting.py: with the corners 0.2 darker, half the poses were wrong). A
    quadratic takes a tilt and a radial fall-off; extrapolated inwards from the border it stays smooth."""
    b, h, w = grey.shape
    band = max(2, min(h, w) // 32)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64, device=grey.device),
                            torch.linspace(-1, 1, w, dtype=torch.float64, device=grey.device), indexing="ij")
    terms = torch.stack([torch.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], -1)  # (H, W, 6)
    edge = torch.zeros(h, w, dtype=torch.bool, device=grey.device)
    edge[:band], edge[-band:], edge[:, :band], edge[:, -band:] = True, True, True, True
    a = terms[edge]  # (M, 6)
    y = grey.double()[:, edge]  # (B, M)
    keep = torch.ones_like(y)
    ridge = 1e-9 * torch.eye(6, dtype=torch.float64, device=grey.device)
    for step in range(3):
        at = a.T[None] * keep[:, None, :]  # (B, 6, M)
        coef = torch.linalg.solve(at @ a + ridge, (at @ y[..., None]))[..., 0]  # (B, 6)
        if step == 2:
            break
        res = (y - coef @ a.T).abs()
        mad = res.median(1, keepdim=True).values * 1.4826 + 1e-6
        keep = (res <= 3 * mad).to(y.dtype)
    return (terms @ coef.T).permute(2, 0, 1).to(grey.dtype)  # (B, H, W)


def foreground(images01: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) bool: pixels whose 5x5-blurred grey level differs from the backdrop
    (:func:`backdrop`, fitted to the image's border) by more than an Otsu threshold."""
    g = images01.float().mean(1)
    d = (g - backdrop(g)).abs()
    d = F.avg_pool2d(d[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]  # camera grain out
    flat = d.flatten(1)
    return _drop_specks(d > _otsu(flat)[:, None, None])


SPECK_SHARE = 0.1  # a foreground blob under this share of the image's largest blob is dust, not the part


def _drop_specks(fg: Tensor) -> Tensor:
    """Each image's foreground without its blobs (8-connected) smaller than SPECK_SHARE of its largest: dust on
    the backdrop lies far from the part and would pull its centre, axis and heavier end (align_lighting.py)."""
    from scipy import ndimage

    out = fg.cpu().numpy().copy()
    for i, m in enumerate(out):
        labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            out[i] = np.isin(labels, 1 + np.flatnonzero(sizes >= SPECK_SHARE * sizes.max()))
    return torch.from_numpy(out).to(fg.device)


@dataclass(frozen=True)
class _Moments:
    """A foreground's mass, centroid, offsets from it and central second moments, per image."""

    mass: Tensor
    cx: Tensor
    cy: Tensor
    dx: Tensor
    dy: Tensor
    a: Tensor  # E[dx²]
    c: Tensor  # E[dy²]
    bxy: Tensor  # E[dx dy]


def _moments(fg: Tensor) -> _Moments:
    """Moments of float64 foreground masks (B, H, W)."""
    _, h, w = fg.shape
    ys = torch.arange(h, dtype=torch.float64, device=fg.device)[None, :, None]
    xs = torch.arange(w, dtype=torch.float64, device=fg.device)[None, None, :]
    mass = fg.sum((1, 2))
    m = mass.clamp_min(1)
    cx, cy = (fg * xs).sum((1, 2)) / m, (fg * ys).sum((1, 2)) / m
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    return _Moments(mass, cx, cy, dx, dy, (fg * dx * dx).sum((1, 2)) / m, (fg * dy * dy).sum((1, 2)) / m,
                    (fg * dx * dy).sum((1, 2)) / m)


def _major_axis(mo: _Moments) -> tuple[Tensor, Tensor]:
    """Each foreground's major axis of second moments, as an angle (B,), and every pixel's position along it
    (B, H, W), measured from the centroid."""
    ang = 0.5 * torch.atan2(2 * mo.bxy, mo.a - mo.c)
    return ang, mo.dx * ang.cos()[:, None, None] + mo.dy * ang.sin()[:, None, None]


def poses(images01: Tensor, spec: AlignSpec) -> Tensor:
    """(B, 3, H, W) -> affine matrices (B, 2, 3) for ``F.affine_grid`` (align_corners=False): each maps the aligned
    frame's normalised coordinates to the input image's. An image with no foreground keeps its own frame."""
    b, _, h, w = images01.shape
    fg = foreground(images01).to(torch.float64)
    mo = _moments(fg)
    empty, cx, cy = mo.mass < 1, mo.cx, mo.cy
    ang, t = _major_axis(mo)
    ang = torch.where((fg * t ** 3).sum((1, 2)) > 0, ang + torch.pi, ang)  # a skewed part: one side always
    cx = torch.where(empty, torch.full_like(cx, (w - 1) / 2), cx)
    cy = torch.where(empty, torch.full_like(cy, (h - 1) / 2), cy)
    ang = torch.where(empty, torch.zeros_like(ang), ang)
    cos, sin, z = ang.cos(), ang.sin(), spec.zoom
    theta = torch.stack([torch.stack([cos / z, -sin * (h / w) / z, (2 * cx + 1) / w - 1], 1),
                         torch.stack([sin * (w / h) / z, cos / z, (2 * cy + 1) / h - 1], 1)], 1)
    return theta.to(torch.float32)


# When `kdad data check` suggests data.align and data.align=auto picks axis (a heuristic set on the training images
# of the project's five sets; docs/align.md, "Does my product need it?"): one part
# clear of the image border, elongated enough for its axis to be stable, lying at clearly varying angles.
HINT_MAX_BORDER_SHARE = 0.02  # textures and parts that fill the frame put foreground on the border
HINT_MIN_ELONGATION = 2.0  # a bottle seen from above is 1.0, the generated screws 6.3
HINT_MIN_AXIS_SPREAD_DEG = 10.0  # 10 degrees move a point 100 px from the centre by over a stride-8 cell


@dataclass(frozen=True)
class PoseSpread:
    """How the parts in a set of images lie (medians and spreads over the images)."""

    images: int
    border_share: float  # median share of the image border that is foreground (0: one part on a plain backdrop)
    elongation: float  # median sqrt(major / minor second moment) of the foreground
    axis_spread_deg: float  # circular standard deviation of the long axis's direction (an axis: modulo 180°)
    centre_spread_px: float  # standard deviation of the centroid's distance from the mean centroid, in pixels
    length_share: float = 0.0  # the longest foreground's extent along its own axis, as a share of the image side

    def suggests_align(self) -> bool:
        """Whether the images look like one elongated part on a plain backdrop at varying angles."""
        return (self.images >= 2 and self.border_share <= HINT_MAX_BORDER_SHARE
                and self.elongation >= HINT_MIN_ELONGATION and self.axis_spread_deg >= HINT_MIN_AXIS_SPREAD_DEG)

    def text(self) -> str:
        """One line for a person."""
        return (f"{self.images} images: border foreground {self.border_share:.2f}, elongation "
                f"{self.elongation:.1f}, long axis spread {self.axis_spread_deg:.0f} deg, centre spread "
                f"{self.centre_spread_px:.0f} px, longest part {self.length_share:.2f} of the side")

    def zoom_for(self, fill: float) -> float:
        """The data.align_zoom at which the longest measured part spans `fill` of the image side (two decimals,
        within [0.25, 4]); 1.0 when no part was measured."""
        if self.length_share <= 0:
            return 1.0
        return round(min(4.0, max(0.25, fill / self.length_share)), 2)


def pose_spread(images01: Tensor) -> PoseSpread:
    """The :class:`PoseSpread` of a batch (B, 3, H, W) in [0, 1], measured with the same foreground as
    :func:`poses`."""
    if len(images01) == 0:
        return PoseSpread(0, 0.0, 0.0, 0.0, 0.0)
    fg = foreground(images01).to(torch.float64)
    mo = _moments(fg)
    border = _border(fg).mean(1)
    half_tr, det = (mo.a + mo.c) / 2, mo.a * mo.c - mo.bxy ** 2
    disc = (half_tr ** 2 - det).clamp_min(0).sqrt()
    elongation = ((half_tr + disc) / (half_tr - disc).clamp_min(1e-9)).sqrt()
    doubled = torch.atan2(2 * mo.bxy, mo.a - mo.c)  # an axis's angle doubled: directions mod 180° on a circle
    r = float(torch.hypot(doubled.cos().mean(), doubled.sin().mean()).clamp(1e-12, 1.0))
    centre = torch.stack([mo.cx, mo.cy], 1)
    spread = float((centre - centre.mean(0)).norm(dim=1).pow(2).mean().sqrt())
    _, t = _major_axis(mo)
    on = fg > 0
    extent = (t.masked_fill(~on, -math.inf).amax((1, 2)) - t.masked_fill(~on, math.inf).amin((1, 2)))
    extent = extent[on.any(2).any(1)]  # images with a foreground
    length = float(extent.max()) / min(images01.shape[-2:]) if len(extent) else 0.0
    return PoseSpread(len(images01), float(border.median()), float(elongation.median()),
                      math.degrees(math.sqrt(-2 * math.log(r)) / 2), spread, length)


def pose_spread_of_files(paths: list[Path], size: int = 256, max_megapixels: float | None = None) -> PoseSpread:
    """:func:`pose_spread` of image files, each resized to `size`; files that cannot be read are skipped
    (`kdad data check` reports them on its own)."""
    images = []
    for p in paths:
        try:
            images.append(load_image(p, size, max_megapixels))
        except DatasetError:
            continue
    return pose_spread(torch.stack(images) if images else torch.empty(0, 3, size, size))


# training images measured by data.align=auto and the data check hint: 0.12-0.22 s for 32 256-px images (one core
# of the 2-core Xeon, magnetic_tile and screws, 3 runs each)
AUTO_SAMPLE = 32


def evenly_spaced(n: int, k: int = AUTO_SAMPLE) -> list[int]:
    """min(k, n) indices spread over range(n), first and last included."""
    k = min(k, n)
    return [(i * (n - 1)) // max(k - 1, 1) for i in range(k)]


def resolve_auto(data: DataConfig, parts: list[Dataset]) -> tuple[DataConfig, PoseSpread | None]:
    """`data` with data.align=auto replaced by what the training images call for: "axis" when
    :meth:`PoseSpread.suggests_align` holds for up to 32 of them (spread over the sets in `parts`), else "none";
    tiled or loco data always get "none" (alignment excludes them). With "axis" (picked or set) and
    data.align_fill > 0, data.align_zoom becomes :meth:`PoseSpread.zoom_for` of the same images and align_fill 0;
    with "axis" and data.align_region=part, data.align_envelope becomes :func:`part_envelope` of up to
    ENVELOPE_SAMPLE of them, evenly spaced.
    A config with nothing to resolve comes back unchanged, with None.
    (`parts` comes from the caller: kdad.data.factory builds them and kdad.config, below it, imports this module.)"""
    if data.align != "auto" and not (data.align == "axis" and (data.align_fill or _envelope_due(data))):
        return data, None
    unmeasured = dataclasses.replace(data, align="none" if data.align == "auto" else data.align, align_fill=0.0)
    items = [(ds, i) for ds in parts for i in range(len(ds))]  # type: ignore[arg-type]
    if data.tiling or data.format == "loco" or not items:  # an explicit axis then fails AlignSpec's own checks
        return unmeasured, None
    def images(idx: list[int]) -> Tensor:
        return torch.stack([items[j][0][items[j][1]]["image"].float() for j in idx])

    spread = pose_spread(images(evenly_spaced(len(items))))
    mode = data.align if data.align != "auto" else ("axis" if spread.suggests_align() else "none")
    zoom = spread.zoom_for(data.align_fill) if mode == "axis" and data.align_fill else data.align_zoom
    out = dataclasses.replace(data, align=mode, align_zoom=zoom, align_fill=0.0)
    if mode == "axis" and _envelope_due(data):
        env = part_envelope(images(evenly_spaced(len(items), ENVELOPE_SAMPLE)), AlignSpec(zoom))
        out = dataclasses.replace(out, align_envelope=encode_mask(env))
    return out, spread


def inverse(theta: Tensor) -> Tensor:
    """The affine matrices (B, 2, 3) that undo ``theta``: image coordinates -> aligned-frame coordinates."""
    full = torch.cat([theta.double(), theta.new_tensor([0.0, 0.0, 1.0]).double().expand(len(theta), 1, 3)], 1)
    return torch.linalg.inv(full)[:, :2].to(theta.dtype)


def warp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    """``x`` (B, C, H, W) resampled through ``theta``; outside the input: its nearest border value."""
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False).to(x.dtype)


def unwarp_maps(maps: Tensor, theta: Tensor) -> Tensor:
    """Aligned-frame maps (B, 1, H, W) back onto the input images; positions the aligned view did not cover
    (a zoom > 1 crops) get the map's minimum: nothing was seen there."""
    inv = inverse(theta)
    grid = F.affine_grid(inv.to(maps.device, torch.float32), list(maps.shape), align_corners=False)
    back = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    seen = (grid.abs() <= 1).all(-1)[:, None]
    low = maps.float().amin((1, 2, 3), keepdim=True).expand_as(back)
    return torch.where(seen, back, low)


def align_images(images01: Tensor, spec: AlignSpec) -> tuple[Tensor, Tensor]:
    """(aligned images (B, 3, H, W), their affine matrices (B, 2, 3))."""
    theta = poses(images01, spec)
    return warp(images01, theta), theta


def part_envelope(images01: Tensor, spec: AlignSpec, batch: int = 32) -> Tensor:
    """(H, W) bool: the aligned-frame pixels where at least ENVELOPE_SHARE of `images01` (B, 3, H, W), aligned with
    `spec`, have their part (:func:`foreground`); the whole frame when none is found."""
    share = torch.zeros(images01.shape[-2:])
    for i in range(0, len(images01), batch):
        share += foreground(align_images(images01[i:i + batch], spec)[0]).float().sum(0)
    env = share >= ENVELOPE_SHARE * len(images01)
    return env if env.any() else torch.ones_like(env)


def restrict_to_part(maps: Tensor, envelope: Tensor) -> Tensor:
    """Aligned-frame maps (B, 1, H, W) with the positions off the part's envelope (H, W) set to each map's minimum,
    so the image score, the map's max, comes from the part: on a small part under uneven light the backdrop's dust
    and fall-off otherwise outscore small defects (docs/align.md, "Dust")."""
    env = envelope.to(maps.device)[None, None]
    if env.shape[-2:] != maps.shape[-2:]:
        env = F.interpolate(env.float(), size=maps.shape[-2:], mode="nearest") > 0.5
    return torch.where(env, maps, maps.amin((1, 2, 3), keepdim=True).expand_as(maps))


class PartRegionModel(nn.Module):
    """A model on aligned images whose map is kept on the part's envelope (data.align_region=part), with the
    model's forward contract. What fit calibrates the thresholds with, so they are the deployed score's."""

    def __init__(self, model: nn.Module, envelope: Tensor) -> None:
        super().__init__()
        self.model, self.envelope = model, envelope

    def forward(self, aligned01: Tensor) -> AnomalyOutput:
        out = self.model(aligned01)
        amap = restrict_to_part(out.anomaly_map, self.envelope)
        return AnomalyOutput(amap, amap.flatten(1).amax(1).to(out.score.dtype))


def region_view(model: nn.Module, spec: AlignSpec | None) -> nn.Module:
    """`model` (on aligned images) as it scores under `spec`'s region: itself, or a :class:`PartRegionModel`."""
    env = None if spec is None else spec.envelope_mask()
    return model if env is None else PartRegionModel(model, env)


class AlignedImages(Dataset[dict[str, Any]]):
    """A dataset whose items' images (and masks, nearest-neighbour) are pose-normalised; what fit trains and
    calibrates on with data.align (the held-out normals too, so map statistics and thresholds are the aligned
    model's own)."""

    def __init__(self, ds: Dataset, spec: AlignSpec) -> None:
        self.ds, self.spec = ds, spec
        self.thetas: dict[int, Tensor] = {}  # an image's pose, found once: every epoch reads it again


    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.ds[i]
        image = item["image"][None]
        theta = self.thetas.get(i)
        if theta is None:
            theta = self.thetas[i] = poses(image, self.spec)
        mask = warp(item["mask"][None].float(), theta, mode="nearest")[0]
        return {**item, "image": warp(image, theta)[0], "mask": mask}

    def __getattr__(self, name: str) -> Any:  # labels, defect_types, samples of the wrapped dataset
        # never a dunder: DataLoader fetches batches through the wrapped dataset's __getitems__ when it has one
        # (a Subset does), which would hand out the raw images
        if name in ("ds", "spec", "thetas") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.ds, name)


def aligned_training(ds: Dataset, spec: AlignSpec | None) -> Dataset:
    """What a model trains (or calibrates) on: `ds`, or its aligned view with data.align."""
    if spec is None or isinstance(ds, AlignedImages):
        return ds
    return AlignedImages(ds, spec)


def unaligned(ds: Dataset) -> Dataset:
    """The raw images behind an :class:`AlignedImages` (what the service would receive), else `ds`."""
    return ds.ds if isinstance(ds, AlignedImages) else ds


class AlignedModel(nn.Module):
    """A trained model behind pose normalisation, with the model's forward contract: images01 (B, 3, H, W) ->
    AnomalyOutput(map (B, 1, H, W) in the input's frame, score (B,) of the aligned map)."""

    def __init__(self, model: nn.Module, spec: AlignSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, images01: Tensor) -> AnomalyOutput:
        aligned, theta = align_images(images01, self.spec)
        out = region_view(self.model, self.spec)(aligned)
        return AnomalyOutput(unwarp_maps(out.anomaly_map, theta).to(out.anomaly_map.dtype), out.score)


class AlignedRunner(RunnerView):
    """A runner (TorchRunner, OnnxRunner) behind pose normalisation, with the runner interface: images01 (B, 3,
    S, S) -> (maps (B, S, S) in the input's frame, scores (B,))."""

    def __init__(self, runner: Any, spec: AlignSpec) -> None:
        super().__init__(runner)
        self.spec = spec
        spec.envelope_mask()  # a bad envelope fails here, not on the first image

    @torch.inference_mode()
    def __call__(self, images01: Tensor) -> tuple[np.ndarray, np.ndarray]:
        aligned, theta = align_images(images01.float(), self.spec)
        maps, scores = self.runner(aligned)
        amap = torch.from_numpy(np.ascontiguousarray(maps))[:, None]
        env = self.spec.envelope_mask()
        if env is not None:
            amap = restrict_to_part(amap, env)
            scores = amap.flatten(1).amax(1).numpy().astype(scores.dtype)
        back = unwarp_maps(amap, theta)[:, 0]
        return back.numpy().astype(np.float32), scores

    def gate_scores(self, images01: Tensor) -> np.ndarray | None:
        """No gate with data.align (fit stores none): None."""
        return None

    def info(self) -> dict[str, Any]:
        """The runner's facts plus the alignment (the input contract stays the model's)."""
        return {**self.runner.info(), "align": self.spec.to_dict()}


def runner_align(runner: Any) -> AlignSpec | None:
    """The alignment a TorchRunner's checkpoint config or an OnnxRunner's metadata records (None = none)."""
    cfg = getattr(runner, "cfg", None)
    if cfg is not None:
        return AlignSpec.from_data(cfg.data)
    d = (getattr(runner, "meta", None) or {}).get("align")
    return AlignSpec.from_dict(d) if d else None


def aligned_runner(runner: Any) -> Any:
    """`runner` wrapped in an AlignedRunner when its model was trained with data.align, else `runner` itself."""
    spec = runner_align(runner)
    return runner if spec is None else AlignedRunner(runner, spec)


def runner_views(runner: Any) -> Any:
    """`runner` behind the view its model was trained with: tiles (kdad.tiling) or the aligned part (this module);
    the two exclude each other, and a runner already wrapped comes back as is. make_runner and the service use it."""
    return aligned_runner(tiled_runner(runner))


def aligned_forward(model: Any, spec: AlignSpec | None) -> Any:
    """What evaluation calls: `model` (an nn.Module or a runner) behind the alignment, or itself without one."""
    if spec is None or isinstance(model, (AlignedModel, AlignedRunner)):
        return model
    return AlignedModel(model, spec) if isinstance(model, nn.Module) else AlignedRunner(model, spec)
