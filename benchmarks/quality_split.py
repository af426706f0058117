"""The quality study's data: categories, and the seeded selection/report halves of each test split.

Presets are chosen on the selection half (and on generated data) and reported on the other half, so no number
in docs/benchmarks.md comes from the images it was tuned on. Halves are stratified by defect type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDAD_SHARED", str(ROOT.parent / "shared")))
CATEGORIES = {
    "bottle": SHARED / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": SHARED / "data" / "mtd" / "magnetic_tile",
}
TEXTURES = SHARED / "data" / "dtd" / "images"
SPLIT_SEED = 20261202


def halves(ds: Any, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(selection indices, report indices): each defect type split in two at random, seeded."""
    types = [s.defect_type for s in ds.samples]
    rng = np.random.default_rng(seed)
    sel: list[int] = []
    rep: list[int] = []
    for t in sorted(set(types)):
        idx = [i for i, tt in enumerate(types) if tt == t]
        rng.shuffle(idx)
        k = len(idx) // 2
        sel += idx[:k]
        rep += idx[k:]
    return sorted(sel), sorted(rep)
