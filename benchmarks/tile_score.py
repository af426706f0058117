"""Does the tiled image score suffer from the map's size? (issue 18, point 3; docs/tiling.md, "Image score").

With tiling, the image score is the max of a full-size stitched map, which has more positions than a resized
run's map: the good images' maxima rise with the count (an extreme-value effect) and may swallow the gain in
resolution. This fits a tiled recipe once per seed and scores the same stitched test maps several ways:

- `max`: today's rule;
- `pool{k}_max`: the max after k x k area averaging (k = 2 brings a 512-px map to a 256-px resize's count);
- `top{q}_mean`: the mean of the top q % of the map's pixels.

Choices are made on the selection half only (benchmarks/_common.py); the report half and all images are read
to report. Run: python benchmarks/tile_score.py --seeds 0 1 2 --threads 1 [--cell NAME=PRESET:k=v,...]
Table (mean ± sample std over seeds, per cell and rule): python benchmarks/tile_score.py --summary
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as quality_split
import numpy as np
import torch
from quality import parse_cell
from sklearn.metrics import roc_auc_score

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.data.factory import build_dataset
from kdad.evaluate import predict
from kdad.tiling import TileSpec, image_score, tiled_dataset
from kdad.train import fit


def _pool_max(k: int) -> Callable[[np.ndarray], float]:
    def score(amap: np.ndarray) -> float:
        t = torch.from_numpy(amap)[None, None]
        return float(torch.nn.functional.avg_pool2d(t, k, stride=k, ceil_mode=True).max())
    return score


def _top_mean(q: float) -> Callable[[np.ndarray], float]:
    spec = TileSpec(1, score_top=q / 100)  # the library's own rule (data.tile_score_top), q in percent
    return lambda amap: image_score(amap, spec)


RULES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda m: float(m.max()), "pool2_max": _pool_max(2), "pool4_max": _pool_max(4),
    "top0.1_mean": _top_mean(0.1), "top1_mean": _top_mean(1.0),
}


def run(cell: str, category: str, seed: int, work: Path) -> dict[str, Any]:
    name, preset, overrides = parse_cell(cell)
    cfg = load_config(preset, [], [f"data.root={quality_split.CATEGORIES[category]}", f"train.seed={seed}",
                                   "train.progress=false", f"data.texture_dir={quality_split.TEXTURES}", *overrides])
    bundle = load_bundle(fit(cfg, work / f"{name}_{seed}") / "model.ckpt")
    model, cfg = model_from_bundle(bundle)
    test = tiled_dataset(build_dataset(cfg.data, "test"), cfg.data)
    pred = predict(model, test, torch.device("cpu"), cfg.train.eval_batch_size, tiles=TileSpec.from_data(cfg.data))
    assert pred.maps is not None
    sel, rep = quality_split.halves(test)
    parts = {"selection": sel, "report": rep, "all": list(range(len(test)))}
    out: dict[str, Any] = {"cell": name, "preset": preset, "overrides": overrides, "category": category,
                           "seed": seed, "map_size": list(pred.maps.shape[1:]),
                           "train_minutes": bundle.get("train_info", {}).get("train_seconds", float("nan")) / 60,
                           "load_avg_1min": os.getloadavg()[0], "image_auroc": {}}
    for rule, fn in RULES.items():
        scores = np.array([fn(m) for m in pred.maps])
        out["image_auroc"][rule] = {half: float(roc_auc_score(pred.labels[idx], scores[idx]))
                                    for half, idx in parts.items()}
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (cell, rule), image AUROC mean ± sample std over seeds on each half."""
    lines = ["| cell | rule | seeds | selection | report | all |", "|---|---|---|---|---|---|"]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        mine = [r for r in rows if r["cell"] == cell]
        for rule in RULES:
            cols = []
            for half in ("selection", "report", "all"):
                v = np.array([r["image_auroc"][rule][half] for r in mine])
                cols.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
            lines.append(f"| {cell} | {rule} | {len(mine)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    quality_split.seed_study(run, summary, "student_tiled=patchst_cpu:model.memory=0,data.tiling=true,train.epochs=3", "brushed512", quality_split.RESULTS / "tile_score.json")


if __name__ == "__main__":
    main()
