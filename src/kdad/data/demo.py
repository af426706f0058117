"""A small synthetic inspection dataset in MVTec AD layout, for demos, tutorials and smoke tests.

Two kinds:

- ``"texture"``: a woven fabric (over/under threads with fibre noise), slight per-image jitter of
  thread phase, angle, period, colour and brightness, a lighting gradient and sensor noise.
- ``"object"``: a turned steel washer centred on a dark conveyor belt, with a soft shadow, bevel
  highlights, turning marks, and jitter of position, size, rotation, tint and lighting.

Defect types (each with a mask in ``ground_truth/<type>/<stem>_mask.png``): ``scratch`` (thin curved
line), ``spot`` (dark or bright blob), ``missing`` (a hole in the fabric / a chunk bitten out of the
washer) and ``crack`` (thin dark jagged line with a branch). Defects are kept small and low-contrast
enough that they are not trivial. Everything comes from ``numpy.random.Generator`` seeded from
``seed``, so the files are identical for the same arguments.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import gaussian_filter, uniform_filter1d

from kdad.data.transforms import PathLike
from kdad.errors import ConfigError, DatasetError

Kind = Literal["texture", "object"]
KINDS: tuple[str, ...] = ("texture", "object")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "missing", "crack")
MARKER = ".kdad_demo.json"
_FORMAT_VERSION = 1
_SUPERSAMPLE = 4  # defects are drawn at 4x and box-downsampled, which antialiases their edges

Array = np.ndarray


# ----------------------------------------------------------------------------------------- helpers
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Smooth random field (size, size), zero mean, unit std, with about ``cells`` blobs per side."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _draw_alpha(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None], blur: float = 0.0) -> Array:
    """Coverage (size, size) in [0, 1] of shapes drawn by ``draw(canvas, scale)`` at supersampled scale."""
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw(ImageDraw.Draw(big), float(_SUPERSAMPLE))
    if blur > 0:
        big = big.filter(ImageFilter.GaussianBlur(blur * _SUPERSAMPLE))
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, rough: float) -> list[tuple]:
    """Irregular closed outline: a circle whose radius wobbles with a few random harmonics."""
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += rough / k * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.35, None)
    return list(zip(cx + r * np.cos(theta), cy + r * np.sin(theta), strict=True))


def _scaled(points: list[tuple], scale: float) -> list[tuple[float, float]]:
    return [(x * scale, y * scale) for x, y in points]


def _pick_point(rng: np.random.Generator, allowed: Array) -> tuple[float, float]:
    """A random (x, y) pixel centre where ``allowed`` (bool H×W) is True."""
    ys, xs = np.nonzero(allowed)
    i = int(rng.integers(len(xs)))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def _gradient(rng: np.random.Generator, size: int, strength: float) -> Array:
    """Linear lighting ramp (size, size) around 1 in a random direction."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    a = rng.uniform(0, 2 * np.pi)
    return 1.0 + strength * (np.cos(a) * xx + np.sin(a) * yy)


# ----------------------------------------------------------------------------------------- scenes
class _Scene:
    """A rendered good image plus what defects need: the background seen through a hole/chunk,
    where the part is (coverage in [0, 1]) and where a defect may be centred."""

    def __init__(self, image: Array, behind: Array, part: Array, centres: Array, is_object: bool) -> None:
        self.image, self.behind, self.part, self.centres = image, behind, part, centres
        self.is_object = is_object


def _texture_scene(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 16 * rng.uniform(0.97, 1.03)
    angle = math.radians(rng.uniform(-2.0, 2.0))
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 2)
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period + rng.uniform(0, 2)
    fu, fv = u % 1.0, v % 1.0
    weft_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    weft = np.sin(np.pi * fv) ** 0.7 * (0.72 + 0.28 * np.sin(np.pi * fu))
    warp = np.sin(np.pi * fu) ** 0.7 * (0.72 + 0.28 * np.sin(np.pi * fv))
    height = np.where(weft_on_top, weft, warp)
    fibre_len = max(3, int(round(size / 28)))
    noise = rng.standard_normal((size, size)).astype(np.float32)
    fibres = np.where(weft_on_top, uniform_filter1d(noise, fibre_len, axis=1),
                      uniform_filter1d(noise, fibre_len, axis=0)) * math.sqrt(fibre_len)
    shade = (0.30 + 0.62 * height + 0.045 * fibres) * (1 + 0.04 * _smooth_noise(rng, size, 5))
    shade *= _gradient(rng, size, rng.uniform(0.10, 0.18)) * rng.uniform(0.94, 1.06)
    colour = np.array([0.78, 0.70, 0.56], np.float32) * rng.uniform(0.985, 1.015, 3).astype(np.float32)
    image = shade[..., None] * colour + rng.normal(0, 0.008, (size, size, 3)).astype(np.float32)
    backing = 0.07 + 0.02 * _smooth_noise(rng, size, 8)  # dark table seen through a hole
    behind = np.repeat(backing[..., None], 3, axis=2) * np.array([1.0, 0.97, 0.92], np.float32)
    margin = int(size * 0.12)
    centres = np.zeros((size, size), bool)
    centres[margin:-margin, margin:-margin] = True
    part = np.ones((size, size), np.float32)
    return _Scene(np.clip(image, 0, 1), behind.astype(np.float32), part, centres, False)


def _object_scene(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # conveyor belt: dark green-grey rubber with fine grain and a top-to-bottom light falloff
    belt = 0.20 + 0.015 * _smooth_noise(rng, size, 12) + rng.normal(0, 0.012, (size, size))
    belt = belt * (1.08 - 0.16 * yy / size)
    bg = belt[..., None] * np.array([0.92, 1.0, 0.95], np.float32)

    cx, cy = (size / 2 + rng.uniform(-0.02, 0.02, 2) * size).tolist()
    r_out = 0.34 * size * rng.uniform(0.98, 1.02)
    r_in = 0.14 * size * rng.uniform(0.97, 1.03)
    d = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx)
    part = np.clip(r_out - d + 0.5, 0, 1) * np.clip(d - r_in + 0.5, 0, 1)

    # soft shadow of the washer, offset away from the light
    light = rng.uniform(-2.6, -2.0)  # light comes from the upper left, with jitter
    sx, sy = -math.cos(light) * 0.025 * size, -math.sin(light) * 0.025 * size
    ds = np.hypot(xx - cx - sx, yy - cy - sy)
    shadow = gaussian_filter(((ds < r_out) & (ds > r_in)).astype(np.float32), size * 0.02)
    bg = bg * (1 - 0.45 * shadow[..., None])

    rot = rng.uniform(0, 2 * np.pi)
    bevel_w = 0.05 * size
    outer_bevel = np.clip(1 - (r_out - d) / bevel_w, 0, 1)
    inner_bevel = np.clip(1 - (d - r_in) / bevel_w, 0, 1)
    facing = np.cos(theta - light)
    metal = 0.58 + 0.26 * outer_bevel * facing - 0.22 * inner_bevel * facing
    metal += 0.07 * np.cos(2 * (theta - rot))  # anisotropic reflection of the turning
    rings = np.interp(d, np.linspace(0, size, 4 * size), rng.standard_normal(4 * size))
    metal += 0.02 * rings + 0.015 * np.sin(2 * np.pi * d / (size / 70) + rng.uniform(0, 6.3))
    metal *= rng.uniform(0.95, 1.05)
    tint = np.array([0.93, 0.95, 1.0], np.float32) * rng.uniform(0.98, 1.02, 3).astype(np.float32)
    steel = metal[..., None] * tint + rng.normal(0, 0.008, (size, size, 3))
    image = bg * (1 - part[..., None]) + steel * part[..., None]
    margin = 0.035 * size
    centres = (d > r_in + margin) & (d < r_out - margin)
    return _Scene(np.clip(image, 0, 1).astype(np.float32), bg.astype(np.float32), part, centres, True)


# ----------------------------------------------------------------------------------------- defects
def _curve(rng: np.random.Generator, x0: float, y0: float, length: float, bend: float) -> list[tuple]:
    """Points of a quadratic Bezier of about ``length`` starting at (x0, y0), bent sideways by ``bend``."""
    a = rng.uniform(0, 2 * np.pi)
    x2, y2 = x0 + length * math.cos(a), y0 + length * math.sin(a)
    off = rng.uniform(-bend, bend) * length
    x1, y1 = (x0 + x2) / 2 - off * math.sin(a), (y0 + y2) / 2 + off * math.cos(a)
    t = np.linspace(0, 1, 40)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * x1 + t**2 * x2
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * y1 + t**2 * y2
    return list(zip(xs, ys, strict=True))


def _walk(rng: np.random.Generator, x: float, y: float, steps: int, step: float, a: float) -> list[tuple[float, float]]:
    """A jagged random-walk polyline (a crack path)."""
    pts = [(x, y)]
    for _ in range(steps):
        a += rng.normal(0, 0.45)
        x, y = x + step * math.cos(a), y + step * math.sin(a)
        pts.append((x, y))
    return pts


def _on_part(rng: np.random.Generator, scene: _Scene, size: int,
             shape: Callable[[], Callable[[ImageDraw.ImageDraw, float], None]]) -> Array:
    """Coverage of a line-like defect drawn by ``shape()``, redrawn (up to 5 times) while less than
    70 % of it lies on the part, so that object defects do not mostly fall on the background."""
    for _ in range(5):
        full = _draw_alpha(size, shape())
        alpha = full * scene.part
        if alpha.sum() >= 0.7 * full.sum():
            break
    return alpha


def _scratch(rng: np.random.Generator, scene: _Scene, size: int) -> tuple[Array, Array]:
    width = max(1.0, size / 256 * rng.uniform(1.5, 2.8))

    def shape() -> Callable[[ImageDraw.ImageDraw, float], None]:
        pts = _curve(rng, *_pick_point(rng, scene.centres), size * rng.uniform(0.12, 0.25), 0.3)
        return lambda c, k: c.line(_scaled(pts, k), fill=255, width=round(width * k), joint="curve")

    alpha = _on_part(rng, scene, size, shape)
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.18, 0.30)
    image = scene.image + delta * alpha[..., None]
    return image, alpha > 0.25


def _spot(rng: np.random.Generator, scene: _Scene, size: int) -> tuple[Array, Array]:
    x, y = _pick_point(rng, scene.centres)
    poly = _blob_polygon(rng, x, y, size * rng.uniform(0.022, 0.045), rough=0.35)
    alpha = _draw_alpha(size, lambda c, k: c.polygon(_scaled(poly, k), fill=255), blur=size / 256 * 1.2)
    alpha *= scene.part
    if rng.random() < 0.65:  # dark stain with a brownish tint
        stain = np.array([0.55, 0.45, 0.35], np.float32) * rng.uniform(0.4, 0.7)
        image = scene.image * (1 - 0.55 * alpha[..., None]) + 0.55 * alpha[..., None] * stain * scene.image
    else:  # bright residue
        image = scene.image + rng.uniform(0.18, 0.3) * alpha[..., None]
    return image, alpha > 0.5


def _missing(rng: np.random.Generator, scene: _Scene, size: int) -> tuple[Array, Array]:
    if scene.is_object:  # object: a chunk bitten out of the outer or inner rim
        ys, xs = np.nonzero((scene.part > 0.3) & (scene.part < 0.7))
        i = int(rng.integers(len(xs)))
        x, y = float(xs[i]), float(ys[i])
        radius = size * rng.uniform(0.035, 0.06)
    else:  # texture: a torn hole
        x, y = _pick_point(rng, scene.centres)
        radius = size * rng.uniform(0.025, 0.05)
    poly = _blob_polygon(rng, x, y, radius, rough=0.6)
    hole = _draw_alpha(size, lambda c, k: c.polygon(_scaled(poly, k), fill=255)) * scene.part
    # a darker fringe around the hole: frayed fibres / a burr casting a shadow
    fringe = gaussian_filter(hole, size / 256 * 2.0)
    fringe = np.clip(fringe - hole, 0, 1) * scene.part
    image = scene.image * (1 - 0.5 * fringe[..., None])
    image = image * (1 - hole[..., None]) + scene.behind * hole[..., None]
    return image, hole > 0.5


def _crack(rng: np.random.Generator, scene: _Scene, size: int) -> tuple[Array, Array]:
    step = size * 0.012
    width = max(1.0, size / 256 * 1.6)

    def shape() -> Callable[[ImageDraw.ImageDraw, float], None]:
        a = rng.uniform(0, 2 * np.pi)
        main = _walk(rng, *_pick_point(rng, scene.centres), int(rng.integers(12, 22)), step, a)
        j = int(rng.integers(3, len(main) - 2))
        branch = _walk(rng, *main[j], int(rng.integers(4, 9)), step, a + rng.choice([-1.0, 1.0]) * 0.9)

        def draw(c: ImageDraw.ImageDraw, k: float) -> None:
            c.line(_scaled(main, k), fill=255, width=round(width * k), joint="curve")
            c.line(_scaled(branch, k), fill=255, width=round(width * 0.7 * k), joint="curve")

        return draw

    alpha = _on_part(rng, scene, size, shape)
    image = scene.image * (1 - rng.uniform(0.5, 0.7) * alpha[..., None])
    return image, alpha > 0.25


_DEFECTS = {"scratch": _scratch, "spot": _spot, "missing": _missing, "crack": _crack}
_SCENES = {"texture": _texture_scene, "object": _object_scene}


def render_demo_image(
    rng: np.random.Generator, size: int = 256, kind: Kind = "texture", defect: str | None = None
) -> tuple[Array, Array]:
    """Render one image as uint8 (size, size, 3) and its mask as bool (size, size).

    ``defect`` is None for a good image (all-False mask) or one of :data:`DEFECT_TYPES`.
    """
    scene = _SCENES[kind](rng, size)
    if defect is None:
        image, mask = scene.image, np.zeros((size, size), bool)
    else:
        image, mask = _DEFECTS[defect](rng, scene, size)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------- writing
def _check_args(n_train: int, n_test_good: int, n_test_bad: int, size: int, kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"demo kind must be one of {list(KINDS)}, got {kind!r}")
    if n_train < 1 or n_test_good < 0 or n_test_bad < 0 or n_test_good + n_test_bad < 1:
        raise ConfigError(
            f"demo needs n_train >= 1 and at least one test image, got n_train={n_train}, "
            f"n_test_good={n_test_good}, n_test_bad={n_test_bad}"
        )
    if size < 32:
        raise ConfigError(f"demo image size must be >= 32, got {size}")


def _write(path: Path, array: Array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _generate(out: Path, params: dict, kind_index: int) -> None:
    size, kind, seed = params["size"], params["kind"], params["seed"]

    def rng(group: int, index: int) -> np.random.Generator:  # one stream per image: order-independent
        return np.random.default_rng([seed, kind_index, group, index])

    for i in range(params["n_train"]):
        _write(out / "train" / "good" / f"{i:03d}.png", render_demo_image(rng(0, i), size, kind)[0])
    for i in range(params["n_test_good"]):
        _write(out / "test" / "good" / f"{i:03d}.png", render_demo_image(rng(1, i), size, kind)[0])
    counters = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(params["n_test_bad"]):
        defect = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        stem = f"{counters[defect]:03d}"
        counters[defect] += 1
        image, mask = render_demo_image(rng(2, i), size, kind, defect)
        _write(out / "test" / defect / f"{stem}.png", image)
        _write(out / "ground_truth" / defect / f"{stem}_mask.png", mask.astype(np.uint8) * 255)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def make_demo_dataset(
    root: PathLike,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_bad: int = 30,
    size: int = 256,
    seed: int = 0,
    kind: Kind = "texture",
) -> Path:
    """Write a synthetic dataset in MVTec layout to ``root`` and return ``root``.

    Images are RGB PNGs of ``size``×``size``; ``n_test_bad`` defective images are spread round-robin
    over :data:`DEFECT_TYPES`, each with ``ground_truth/<type>/<stem>_mask.png`` ({0, 255}). The data
    is built in a temporary sibling folder and renamed to ``root``, with a marker file written last;
    if ``root`` already holds a complete demo made with the same arguments it is reused as is. A
    non-empty ``root`` without the marker, or made with other arguments, raises :class:`DatasetError`.
    """
    _check_args(n_train, n_test_good, n_test_bad, size, kind)
    root = Path(root)
    params = {"kdad_demo": _FORMAT_VERSION, "kind": kind, "n_train": n_train, "n_test_good": n_test_good,
              "n_test_bad": n_test_bad, "size": size, "seed": seed}
    if root.exists():
        stored = _read_marker(root)
        if stored == params:
            return root
        if stored is not None:
            raise DatasetError(f"{root} holds a demo dataset made with {stored}, not {params}; "
                               "delete it or choose another folder")
        if not root.is_dir() or any(root.iterdir()):
            raise DatasetError(f"{root} exists and is not a complete kdad demo dataset (no {MARKER}); "
                               "delete it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        _generate(tmp, params, KINDS.index(kind))
        (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n")
        try:
            os.replace(tmp, root)  # atomic; also replaces an empty root folder
        except OSError:
            if _read_marker(root) != params:  # someone else wrote something else meanwhile
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same demo first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
