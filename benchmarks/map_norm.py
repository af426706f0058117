"""Does dividing a trained recipe's map by the held-out normals' per-position mean lift its image AUROC?

PatchST's largest single gain was that division (docs/methods/patchst.md, "map_norm"): normal magnetic_tile
images err most along the frame's edges, so a plain max picks an edge. RD, RD++ and STFPM score the raw map.
This fits a cell once per seed and scores the same test maps several ways, with statistics from the run's own
held-out normals (the training images fit left out; no test image is used to set them):

- `max`: today's rule; `top1_mean`: the mean of the top 1 % of the map's pixels;
- `div_max`: the max of the map divided by the held-out normals' mean map (per pixel);
- `sub_max`: the max of the map minus that mean map; `z_max`: minus the mean, over the per-pixel std.

Choices are made on the selection half only (benchmarks/_common.py); the report half is read to report.
Run: python benchmarks/map_norm.py --cell rd_cpu --category magnetic_tile --seeds 0 1 2 --threads 1 --out F
Table: python benchmarks/map_norm.py --summary --out F
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
from kdad.deploy.dataset import predict
from kdad.train import fit, train_val_datasets

RULES = ("max", "top1_mean", "div_max", "sub_max", "z_max")


def scores_by_rule(maps: np.ndarray, normal_maps: np.ndarray) -> dict[str, np.ndarray]:
    """Image scores (N,) of `maps` (N, H, W) under each rule, statistics from `normal_maps` (M, H, W)."""
    mean = normal_maps.mean(0)
    std = normal_maps.std(0)
    eps = 1e-6 * float(mean.mean())
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(0.01 * flat.shape[1])))
    return {
        "max": flat.max(1),
        "top1_mean": np.sort(flat, axis=1)[:, -k:].mean(1),
        "div_max": (maps / (mean + eps)).reshape(len(maps), -1).max(1),
        "sub_max": (maps - mean).reshape(len(maps), -1).max(1),
        "z_max": ((maps - mean) / (std + eps)).reshape(len(maps), -1).max(1),
    }


def run(cell: str, category: str, seed: int, work: Path) -> dict[str, Any]:
    name, preset, overrides = parse_cell(cell)
    cfg = load_config(preset, [], [f"data.root={quality_split.CATEGORIES[category]}", f"train.seed={seed}",
                                   "train.progress=false", f"data.texture_dir={quality_split.TEXTURES}", *overrides])
    bundle = load_bundle(fit(cfg, work / f"{name}_{seed}") / "model.ckpt")
    model, cfg = model_from_bundle(bundle)
    dev, bs = torch.device("cpu"), cfg.train.eval_batch_size
    _, val, _ = train_val_datasets(cfg)
    assert val is not None, "the cell holds out no normals (train.val_fraction=0)"
    normal = predict(model, val, dev, bs)
    test = build_dataset(cfg.data, "test")
    pred = predict(model, test, dev, bs)
    assert pred.maps is not None and normal.maps is not None
    sel, rep = quality_split.halves(test)
    out: dict[str, Any] = {"cell": name, "preset": preset, "overrides": overrides, "category": category,
                           "seed": seed, "held_out_normals": len(val),
                           "train_minutes": bundle.get("train_info", {}).get("train_seconds", float("nan")) / 60,
                           "load_avg_1min": os.getloadavg()[0], "image_auroc": {}}
    for rule, s in scores_by_rule(pred.maps, normal.maps).items():
        out["image_auroc"][rule] = {half: float(roc_auc_score(pred.labels[idx], s[idx]))
                                    for half, idx in (("selection", sel), ("report", rep))}
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (cell, category, rule), image AUROC mean ± sample std over seeds per half."""
    lines = ["| cell | category | rule | seeds | selection | report |", "|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["cell"], r["category"]) for r in rows):
        mine = [r for r in rows if (r["cell"], r["category"]) == key]
        for rule in RULES:
            cols = []
            for half in ("selection", "report"):
                v = np.array([r["image_auroc"][rule][half] for r in mine])
                cols.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
            lines.append(f"| {key[0]} | {key[1]} | {rule} | {len(mine)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--cell", default="rd_cpu")
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(quality_split.RESULTS / "map_norm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = json.loads(out.read_text())["runs"] if out.exists() else []
    if args.summary:
        print(summary(rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            row = run(args.cell, args.category, seed, Path(tmp))
            key = (row["cell"], row["category"], seed)
            rows = [r for r in rows if (r["cell"], r["category"], r["seed"]) != key] + [row]
            out.write_text(json.dumps({"command": "python benchmarks/map_norm.py " + " ".join(sys.argv[1:]),
                                       "split_seed": quality_split.SPLIT_SEED, "runs": rows}, indent=1))
            print(json.dumps(row["image_auroc"]), flush=True)


if __name__ == "__main__":
    main()
