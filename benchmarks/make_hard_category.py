"""A hard generated category for the quality study, in MVTec layout: brushed-metal surfaces with small, thin,
low-contrast defects (scratches 1-2 px wide, pin-holes of 2-4 px, faint stains). Nothing here is tuned to
bottle or magnetic_tile, so a recipe chosen on this data and MTD's selection half is checked on the rest.

Run: python benchmarks/make_hard_category.py --out /tmp/kdad_hard/brushed [--seed 0] [--size 256]
--size makes a larger camera image of the same surface: texture and defects keep their sizes in pixels, so at
--size 512 a 256-px resize halves every defect (the tiling study of issue 18, point 3).
The images are written outside the repository (never commit them); the same seed gives the same files.
"""

from __future__ import annotations

import argparse
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
        dy, dx = np.sin(angle), np.cos(angle)
        along = (yy - cy) * dy + (xx - cx) * dx
        across = -(yy - cy) * dx + (xx - cx) * dy
        profile = np.exp(-0.5 * (across / width) ** 2) * (np.abs(along) <= half)
        contrast = rng.uniform(0.04, 0.08)
    elif kind == "pinhole":  # a small dark or bright dot, radius 2-4 px, contrast 0.06-0.12
        r = rng.uniform(2, 4)
        profile = np.exp(-0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) / (r / 1.5) ** 2))
        contrast = rng.uniform(0.06, 0.12)
    else:  # a faint stain, radius 10-20 px, contrast 0.03-0.05
        r = rng.uniform(10, 20)
        profile = np.exp(-0.5 * (((yy - cy) ** 2 + ((xx - cx) * rng.uniform(0.6, 1.4)) ** 2) / (r / 1.5) ** 2))
        contrast = rng.uniform(0.03, 0.05)
    out = np.clip(img + sign * contrast * profile, 0, 1)
    return out, profile > 0.25


def save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test-good", type=int, default=60)
    ap.add_argument("--per-defect", type=int, default=40)
    ap.add_argument("--size", type=int, default=SIZE, help="image side in px (texture and defects keep their px sizes)")
    args = ap.parse_args()
    if args.size < 64:
        ap.error(f"--size must be at least 64, got {args.size}")
    root = Path(args.out)
    rng = np.random.default_rng(args.seed)
    for i in range(args.train):
        save(surface(rng, args.size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(args.test_good):
        save(surface(rng, args.size), root / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(args.per_defect):
            img, mask = add_defect(surface(rng, args.size), kind, rng)
            save(img, root / "test" / kind / f"{i:03d}.png")
            gt = root / "ground_truth" / kind / f"{i:03d}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt)
    print(f"wrote {root}: {args.train} train, {args.test_good} good + {args.per_defect} x {len(DEFECTS)} defective test")


if __name__ == "__main__":
    main()
