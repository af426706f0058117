"""Hard generated categories for the quality study, in MVTec layout. Nothing here is tuned to bottle or
magnetic_tile, so a recipe chosen on this data and MTD's selection half is checked on the rest.

- ``--kind brushed`` (the default): brushed-metal surfaces with small, thin, low-contrast defects (scratches
  1-2 px wide, pin-holes of 2-4 px, faint stains). A texture; used to choose the CPU presets.
- ``--kind screws``: an object category that no preset was chosen on (session 18): one thin threaded screw per
  image at a random angle and place on a grainy backdrop, with small defects on the thin structure (a stretch
  of flattened thread, a shortened tip, a fine scratch on the head, a small stain on the shaft). Like MVTec's
  screw, a good part can lie at any angle, so a per-position normal map cannot say where the part should be.

Run: python benchmarks/make_hard_category.py --out /tmp/kdad_hard/brushed [--seed 0] [--size 256]
     python benchmarks/make_hard_category.py --kind screws --out /tmp/kdad_hard/screws
     [--part-scale 0.5 --vignette 0.15 --specks 8]   (a smaller screw under uneven light, with dust)
     python benchmarks/make_hard_category.py --kind caps --out /tmp/kdad_hard/caps
     [--seed 1 --contrast 0.4]   (the same caps with fainter defects)
--size makes a larger camera image of the same surface: texture and defects keep their sizes in pixels, so at
--size 512 a 256-px resize halves every defect (the tiling study of issue 18, point 3).
The images are written outside the repository (never commit them); the same seed gives the same files.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SIZE = 256
DEFECTS = ("scratch", "pinhole", "stain")


def surface(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Grey brushed metal: streaks along a jittered direction, slow illumination, fine grain; (H, W) in [0, 1]."""
    streaks = gaussian_filter(rng.normal(0, 1, (size, size)), sigma=(0.6, 18.0))
    streaks = streaks / (streaks.std() + 1e-8)
    if rng.random() < 0.5:
        streaks = streaks.T
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(-0.15, 0.15, 2)
    light = 0.5 + a * (xx - 0.5) + b * (yy - 0.5) + 0.05 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 1.5)))
    grain = gaussian_filter(rng.normal(0, 1, (size, size)), 0.7)
    return np.clip(light + 0.05 * streaks + 0.02 * grain, 0, 1)


def line_profile(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float, half: float,
                 width: float) -> np.ndarray:
    """A straight line through (cy, cx) at `angle`, `half` px each way, with a Gaussian cross-section of `width` px."""
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx
    across = -(yy - cy) * dx + (xx - cx) * dy
    return np.exp(-0.5 * (across / width) ** 2) * (np.abs(along) <= half)


def dot_profile(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """A round Gaussian dot of radius about `r` px at (cy, cx)."""
    return np.exp(-0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) / (r / 1.5) ** 2))


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image with one defect and its mask (bool); defect sizes are in pixels whatever the image size."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(24, size - 24, 2)
    sign = rng.choice([-1.0, 1.0])
    if kind == "scratch":  # a thin straight line, 1-2 px wide, 20-60 px long, contrast 0.04-0.08
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(10, 30)
        width = rng.uniform(0.6, 1.1)
        profile = line_profile(yy, xx, cy, cx, angle, half, width)
        contrast = rng.uniform(0.04, 0.08)
    elif kind == "pinhole":  # a small dark or bright dot, radius 2-4 px, contrast 0.06-0.12
        profile = dot_profile(yy, xx, cy, cx, rng.uniform(2, 4))
        contrast = rng.uniform(0.06, 0.12)
    else:  # a faint stain, radius 10-20 px, contrast 0.03-0.05
        r = rng.uniform(10, 20)
        profile = np.exp(-0.5 * (((yy - cy) ** 2 + ((xx - cx) * rng.uniform(0.6, 1.4)) ** 2) / (r / 1.5) ** 2))
        contrast = rng.uniform(0.03, 0.05)
    out = np.clip(img + sign * contrast * profile, 0, 1)
    return out, profile > 0.25


SCREW_DEFECTS = ("thread", "tip", "head_scratch", "stain")


@dataclass(frozen=True)
class Scene:
    """How a screws image is taken: the screw's size (1 = the study's screws), the light's fall-off towards the
    corners (the grey level lost there; 0 = even light) and dark dust specks on the backdrop per image. The
    defaults give the study's screws, byte for byte (benchmarks/align_lighting.py varies them)."""

    part_scale: float = 1.0
    vignette: float = 0.0
    specks: int = 0


def backdrop(rng: np.random.Generator, size: int, scene: Scene = Scene()) -> np.ndarray:
    """A light, slightly uneven backdrop with fine grain; (H, W) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(-0.06, 0.06, 2)
    grain = gaussian_filter(rng.normal(0, 1, (size, size)), 0.8)
    img = 0.78 + a * (xx - 0.5) + b * (yy - 0.5) + 0.015 * grain
    img = img - scene.vignette * 2 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)  # radial: the corners lose `vignette`
    for _ in range(scene.specks):  # dust: small dark dots, 1-2 px
        y, x = rng.uniform(0, 1, 2)
        r = rng.uniform(0.8, 2.0) / size
        img = img - rng.uniform(0.15, 0.3) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
    return img


def screw(rng: np.random.Generator, size: int = SIZE, defect: str | None = None,
          scene: Scene = Scene()) -> tuple[np.ndarray, np.ndarray]:
    """One screw on the backdrop, optionally with a defect; (image, defect mask). The screw is drawn in its own
    frame (u along the axis from the head, v across), so its angle and place are random but its parts are not.
    The mask: the worn stretch (thread), where the image changed by more than 0.02 (tip, scratch), where the
    stain's profile exceeds 0.25 (stain)."""
    scale = size / SIZE * scene.part_scale
    cy, cx = size / 2 + rng.uniform(-18, 18, 2) * scale
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(140, 156) * scale  # shaft, head to tip
    half_w = rng.uniform(8.5, 10.0) * scale  # shaft half-width at the thread's root
    period = 6.0 * scale  # thread pitch in px
    phase = rng.uniform(0, period)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    du, dv = np.cos(angle), np.sin(angle)
    u = (xx - cx) * du + (yy - cy) * dv + length / 2  # 0 at the head, length at the tip
    v = -(xx - cx) * dv + (yy - cy) * du
    tri = np.abs(((u + phase) / period) % 1.0 - 0.5) * 2  # 0..1 saw profile of the thread
    taper = np.clip((length - u) / (22 * scale), 0, 1)  # the last 22 px narrow to a point

    def draw(tip_cut: float = 0.0, flat: tuple[float, float, float] | None = None) -> np.ndarray:
        ridge = 1.8 * scale * tri
        shade = 0.06 * np.sin(2 * np.pi * (u + phase) / period)
        if flat is not None:  # a stretch of thread on one side worn flat: no ridges, no thread shading
            u0, u1, side = flat
            on = (u >= u0) & (u <= u1) & (np.sign(v) == side)
            ridge = np.where(on, 0.0, ridge)
            shade = np.where(on, 0.0, shade)
        width = (half_w + ridge) * taper
        inside_u = (u >= 0) & (u <= length - tip_cut)
        shaft = np.clip(width - np.abs(v) + 0.5, 0, 1) * inside_u
        across = np.clip(np.abs(v) / np.maximum(width, 1e-3), 0, 1)
        metal = 0.30 + 0.22 * np.sqrt(1 - across**2) + shade  # a cylinder lit from above, thread shading
        head_len, head_w = 16 * scale, 19 * scale
        head = np.clip(head_w - np.abs(v) + 0.5, 0, 1) * np.clip(np.minimum(-u, u + head_len) + 0.5, 0, 1)
        head_metal = 0.34 + 0.18 * np.sqrt(np.clip(1 - (v / head_w) ** 2, 0, 1))
        img = background * (1 - np.maximum(shaft, head))
        img = img + shaft * (1 - head) * metal + head * head_metal
        return img

    background = backdrop(rng, size, scene)
    clean = draw()
    if defect is None:
        return np.clip(clean, 0, 1), np.zeros((size, size), bool)
    if defect == "thread":  # 8-18 px of thread on one side, somewhere along the shaft
        span = rng.uniform(8, 18) * scale
        u0 = rng.uniform(12 * scale, length - 40 * scale)
        side = rng.choice([-1.0, 1.0])
        img = draw(flat=(u0, u0 + span, side))
        worn = (u >= u0) & (u <= u0 + span) & (np.sign(v) == side) & (np.abs(v) <= (half_w + 1.8 * scale) * taper)
        return np.clip(img, 0, 1), worn  # the whole worn stretch: its ridges and the shading between them
    elif defect == "tip":  # the tip broken off, 6-12 px
        img = draw(tip_cut=rng.uniform(6, 12) * scale)
    elif defect == "head_scratch":  # a fine bright or dark line across the head
        t = rng.uniform(-10, -4) * scale
        profile = np.exp(-0.5 * ((u - t) / (0.7 * scale)) ** 2) * (np.abs(v) < rng.uniform(8, 15) * scale)
        img = clean + rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.14) * profile
    elif defect == "stain":  # a small dark or bright stain on the shaft, radius 3-5 px
        r = rng.uniform(3, 5) * scale
        uc = rng.uniform(15 * scale, length - 30 * scale)
        vc = rng.uniform(-0.5, 0.5) * half_w
        profile = np.exp(-0.5 * (((u - uc) ** 2 + (v - vc) ** 2) / (r / 1.5) ** 2))
        img = clean + rng.choice([-1.0, 1.0]) * rng.uniform(0.10, 0.16) * profile
        return np.clip(img, 0, 1), profile > 0.25
    else:
        raise ValueError(f"unknown screw defect {defect!r}; known: {', '.join(SCREW_DEFECTS)}")
    return np.clip(img, 0, 1), np.abs(img - clean) > 0.02


CAP_DEFECTS = ("dent", "scratch", "notch", "stain")


def cap(rng: np.random.Generator, size: int = SIZE, defect: str | None = None,
        contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One round cap, centred to within 3 px, on a dark backdrop, optionally with a defect; (image, defect mask).
    The cap: a knurled rim (its phase random: the cap turns freely), a lit face with a groove ring. `contrast`
    scales each defect's contrast (and a notch's depth). The mask: where the image changed by more than 0.02 times
    `contrast`, or where a stain's profile exceeds 0.25."""
    scale = size / SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-3, 3, 2) * scale
    radius = rng.uniform(88, 92) * scale
    r = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)
    back = 0.08 + 0.004 * gaussian_filter(rng.normal(0, 1, (size, size)), 1.0)
    tilt = rng.uniform(0, 2 * np.pi)  # where the light comes from, a little different on each image
    face = 0.55 + 0.05 * np.cos(theta - tilt) * r / radius - 0.12 * np.exp(-0.5 * ((r - 0.6 * radius) / scale) ** 2)
    rim = 0.45 + 0.06 * np.sin(60 * theta + rng.uniform(0, 2 * np.pi))
    metal = np.where(r > radius - 10 * scale, rim, face) + 0.006 * gaussian_filter(rng.normal(0, 1, (size, size)), 0.8)

    def compose(edge: np.ndarray) -> np.ndarray:
        inside = np.clip(edge - r + 0.5, 0, 1)  # anti-aliased disc
        return back * (1 - inside) + metal * inside

    clean = compose(np.full_like(r, radius))
    if defect is None:
        return np.clip(clean, 0, 1), np.zeros((size, size), bool)
    sign = rng.choice([-1.0, 1.0])
    at_r, at_t = rng.uniform(10, 0.8 * radius / scale) * scale, rng.uniform(0, 2 * np.pi)
    py, px = cy + at_r * np.sin(at_t), cx + at_r * np.cos(at_t)
    if defect == "dent":  # a small dot on the face, radius 2-4 px, contrast 0.08-0.14
        profile = dot_profile(yy, xx, py, px, rng.uniform(2, 4) * scale)
        img = clean + sign * contrast * rng.uniform(0.08, 0.14) * profile
    elif defect == "scratch":  # a fine line on the face, 12-36 px long, contrast 0.06-0.10
        angle, half = rng.uniform(0, np.pi), rng.uniform(6, 18) * scale
        profile = line_profile(yy, xx, py, px, angle, half, 0.7 * scale)
        img = clean + sign * contrast * rng.uniform(0.06, 0.10) * profile
    elif defect == "notch":  # 4-8 px of the rim bitten off, 3-6 px deep
        width, depth = rng.uniform(4, 8) * scale / radius, max(1.5, contrast * rng.uniform(3, 6)) * scale
        gap = np.abs(np.angle(np.exp(1j * (theta - at_t))))
        img = compose(radius - depth * np.clip(1.5 - gap / width, 0, 1))
    elif defect == "stain":  # a faint blob on the face, radius 6-10 px, contrast 0.04-0.06
        profile = dot_profile(yy, xx, py, px, rng.uniform(6, 10) * scale)
        img = clean + sign * contrast * rng.uniform(0.04, 0.06) * profile
        return np.clip(img, 0, 1), profile > 0.25
    else:
        raise ValueError(f"unknown cap defect {defect!r}; known: {', '.join(CAP_DEFECTS)}")
    return np.clip(img, 0, 1), np.abs(img - clean) > 0.02 * contrast


def save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kind", choices=("brushed", "screws", "caps"), default="brushed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test-good", type=int, default=60)
    ap.add_argument("--per-defect", type=int, default=40)
    ap.add_argument("--size", type=int, default=SIZE, help="image side in px (texture and defects keep their px sizes)")
    ap.add_argument("--part-scale", type=float, default=1.0, help="screws: the screw's size (1 = the study's)")
    ap.add_argument("--vignette", type=float, default=0.0, help="screws: grey level the light loses in the corners")
    ap.add_argument("--specks", type=int, default=0, help="screws: dark dust specks on the backdrop per image")
    ap.add_argument("--contrast", type=float, default=1.0, help="caps: scales the defects' contrast (1 = the first set)")
    args = ap.parse_args()
    if args.size < 64:
        ap.error(f"--size must be at least 64, got {args.size}")
    if not (0.2 <= args.part_scale <= 1.5 and 0.0 <= args.vignette <= 0.5 and args.specks >= 0
            and 0.1 <= args.contrast <= 1.0):
        ap.error("--part-scale must be in [0.2, 1.5], --vignette in [0, 0.5], --specks >= 0, --contrast in [0.1, 1]")
    scene = Scene(args.part_scale, args.vignette, args.specks)
    root = Path(args.out)
    rng = np.random.default_rng(args.seed)
    if args.kind == "screws":
        def good() -> np.ndarray:
            return screw(rng, args.size, scene=scene)[0]

        def bad(kind: str) -> tuple[np.ndarray, np.ndarray]:
            return screw(rng, args.size, kind, scene)
        defects = SCREW_DEFECTS
    elif args.kind == "caps":
        def good() -> np.ndarray:
            return cap(rng, args.size)[0]

        def bad(kind: str) -> tuple[np.ndarray, np.ndarray]:
            return cap(rng, args.size, kind, args.contrast)
        defects = CAP_DEFECTS
    else:
        def good() -> np.ndarray:
            return surface(rng, args.size)

        def bad(kind: str) -> tuple[np.ndarray, np.ndarray]:
            return add_defect(surface(rng, args.size), kind, rng)
        defects = DEFECTS
    for i in range(args.train):
        save(good(), root / "train" / "good" / f"{i:03d}.png")
    for i in range(args.test_good):
        save(good(), root / "test" / "good" / f"{i:03d}.png")
    for kind in defects:
        for i in range(args.per_defect):
            img, mask = bad(kind)
            save(img, root / "test" / kind / f"{i:03d}.png")
            gt = root / "ground_truth" / kind / f"{i:03d}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt)
    print(f"wrote {root}: {args.train} train, {args.test_good} good + {args.per_defect} x {len(defects)} defective test")


if __name__ == "__main__":
    main()
