"""Does `data.align` find the part under the light a real line has? (docs/align.md, "Uneven light")

Two parts, no training:
1. `data.align: auto`'s measurements and pick (kdad.align.pose_spread) on 32 evenly spaced training images of each
   set the project has: the generated screws (the one set that should get `axis`), bottle, magnetic_tile, the
   generated brushed surface and the DTD textures (none should).
2. Generated screws taken under other scenes (benchmarks/make_hard_category.py `Scene`: a smaller screw, light
   falling off towards the corners, dust specks): the pick on 32 good images, and how far each image's pose
   (kdad.align.poses) turns from the pose of the same screw under the study's scene (even light, no dust, the same
   screw size), where the pose is right (docs/align.md). Reported: the median axis error, the share of images
   whose axis is off by more than 20 degrees, and the share whose head lands on the other side.

Run: python benchmarks/align_lighting.py --out benchmarks/results/align_lighting.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
from make_hard_category import Scene, screw

from kdad.align import AlignSpec, evenly_spaced, pose_spread, pose_spread_of_files, poses

N_IMAGES = 32
SCENES = {  # name -> Scene; "study" is the generated screws as the quality study has them
    "study": Scene(),
    "vignette 0.1": Scene(vignette=0.1),
    "vignette 0.2": Scene(vignette=0.2),
    "vignette 0.3": Scene(vignette=0.3),
    "half size": Scene(part_scale=0.5),
    "third size": Scene(part_scale=0.35),
    "dust 20": Scene(specks=20),
    "half size, vignette 0.15, dust 8": Scene(part_scale=0.5, vignette=0.15, specks=8),
    "0.4 size, vignette 0.25, dust 15": Scene(part_scale=0.4, vignette=0.25, specks=15),
}


def images_of(scene: Scene, seeds: range) -> torch.Tensor:
    """(N, 3, 256, 256) good screws, one per seed (the seed fixes the screw's pose; the scene only its look)."""
    arr = np.stack([screw(np.random.default_rng(s), 256, None, scene)[0] for s in seeds])
    return torch.from_numpy(arr).float()[:, None].expand(-1, 3, -1, -1).contiguous()


def direction(theta: torch.Tensor) -> np.ndarray:
    """The aligned frame's x axis in the input image, as an angle (radians), from poses()' matrices."""
    return torch.atan2(theta[:, 1, 0], theta[:, 0, 0]).double().numpy()


def scene_row(name: str, scene: Scene) -> dict[str, Any]:
    seeds = range(N_IMAGES)
    ref = direction(poses(images_of(Scene(part_scale=scene.part_scale), seeds), AlignSpec()))
    imgs = images_of(scene, seeds)
    t0 = time.perf_counter()
    got = direction(poses(imgs, AlignSpec()))
    seconds = time.perf_counter() - t0
    turn = np.degrees(np.abs(np.angle(np.exp(1j * (got - ref)))))  # 0..180
    axis_err = np.minimum(turn, 180 - turn)  # the long axis, whichever way round
    spread = pose_spread(imgs)
    return {"scene": name, **vars(scene), "images": N_IMAGES, "picks_axis": spread.suggests_align(),
            "spread": vars(spread), "axis_error_median_deg": float(np.median(axis_err)),
            "axis_off_20deg": float(np.mean(axis_err > 20)), "head_flipped": float(np.mean(turn > 90)),
            "pose_seconds": seconds}


def real_row(name: str, folder: Path) -> dict[str, Any]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if not paths:
        return {"set": name, "missing": str(folder)}
    picked = [paths[i] for i in evenly_spaced(len(paths), N_IMAGES)]
    spread = pose_spread_of_files(picked)
    return {"set": name, "images": spread.images, "picks_axis": spread.suggests_align(), "spread": vars(spread)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets = {"screws (generated)": _common.CATEGORIES["screws"] / "train" / "good",
            "bottle": _common.CATEGORIES["bottle"] / "train" / "good",
            "magnetic_tile": _common.CATEGORIES["magnetic_tile"] / "train" / "good",
            "brushed (generated)": _common.CATEGORIES["brushed"] / "train" / "good",
            "DTD textures": _common.TEXTURES}
    real = [real_row(k, v) for k, v in sets.items()]
    scenes = [scene_row(k, v) for k, v in SCENES.items()]
    for r in real:
        print(r["set"], r.get("picks_axis"), r.get("spread"))
    for r in scenes:
        print(f"{r['scene']:34s} axis={r['picks_axis']!s:5s} err {r['axis_error_median_deg']:5.1f} deg, "
              f">20 deg {r['axis_off_20deg']:.2f}, flipped {r['head_flipped']:.2f}, elong "
              f"{r['spread']['elongation']:.1f}, border {r['spread']['border_share']:.2f}")
    _common.write_json(args.out, {"question": "does data.align find the part under uneven light, small, with dust; "
                                              "does auto still pick none on textures and round parts",
                                  "meta": _common.metadata(), "sets": real, "scenes": scenes})


if __name__ == "__main__":
    main()
