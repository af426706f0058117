"""Does dividing a trained recipe's map by the held-out normals' per-position mean lift its image AUROC?

PatchST's largest single gain was that division (docs/methods/patchst.md, "map_norm"): normal magnetic_tile
images err most along the frame's edges, so a plain max picks an edge. RD++, STFPM, URD, CFRG and DSKD score the raw map.
This fits a cell once per seed and scores the same test maps several ways, with statistics from the run's own
held-out normals (the training images fit left out; no test image is used to set them):

- `max`: today's rule; `top1_mean`: the mean of the top 1 % of the map's pixels;
- `div_max`: the max of the map divided by the held-out normals' mean map (per pixel);
- `sub_max`: the max of the map minus that mean map; `z_max`: minus the mean, over the per-pixel std;
- `divsmooth_max`: divided by that mean map blurred again (Gaussian, sigma 16 px), so 40 images' noise averages out;
- `divshrink_max`: divided by the mean map shrunk halfway to its global mean (a weaker correction);
- `divrel_max` (session 15): `div_max`'s map divided by its own mean over the image, so that a good image whose
  map is high everywhere (an unusual shade of the part) does not outscore a local defect.

AU-PRO (limit 0.3) is also computed from the maps of the rules that change the map (`max`: the raw map).

Choices are made on the selection half only (benchmarks/_common.py); the report half is read to report.
The fit always runs with `model.map_norm=none` (the raw map); the rows before rd_cpu took the option ran so too.
Run: python benchmarks/map_norm.py --cell rd_cpu --category magnetic_tile --seeds 0 1 2 --threads 1 --out F
Table: python benchmarks/map_norm.py --summary --out F
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import _common as quality_split
import numpy as np
import torch
from quality import parse_cell
from sklearn.metrics import roc_auc_score

from kdad.blocks.maps import GaussianBlur
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.data.factory import build_dataset
from kdad.deploy.dataset import predict
from kdad.methods import get_method
from kdad.metrics.pro import au_pro
from kdad.train import fit, train_val_datasets

RULES = ("max", "top1_mean", "div_max", "sub_max", "z_max", "divsmooth_max", "divshrink_max", "divrel_max")
# the map each rule takes its max of, for AU-PRO: raw, and divided by the normals' mean map in four forms
MAP_RULES = ("max", "div_max", "divsmooth_max", "divshrink_max", "divrel_max")


def normalised_maps(maps: np.ndarray, normal_maps: np.ndarray) -> dict[str, np.ndarray]:
    """`maps` (N, H, W) raw and divided by the normals' mean map: as is, blurred (sigma 16), shrunk halfway, and
    divided again by the image's own mean of that ratio (so an image that errs everywhere is not an anomaly)."""
    mean = normal_maps.mean(0)
    eps = 1e-6 * float(mean.mean())
    smooth = GaussianBlur(16.0)(torch.from_numpy(mean)[None, None].float())[0, 0].numpy()
    shrunk = 0.5 * (mean + mean.mean())
    div = maps / (mean + eps)
    return {"max": maps, "div_max": div, "divsmooth_max": maps / (smooth + eps),
            "divshrink_max": maps / (shrunk + eps), "divrel_max": div / div.mean((1, 2), keepdims=True)}


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
        **{k: v.reshape(len(maps), -1).max(1) for k, v in normalised_maps(maps, normal_maps).items()
           if k in ("divsmooth_max", "divshrink_max", "divrel_max")},
    }


def run(cell: str, category: str, seed: int, work: Path) -> dict[str, Any]:
    name, preset, overrides = parse_cell(cell)
    sets = [f"data.root={quality_split.CATEGORIES[category]}", f"train.seed={seed}", "train.progress=false",
            f"data.texture_dir={quality_split.TEXTURES}", *overrides]
    cfg = load_config(preset, [], sets)
    # the rules divide the raw map themselves: a preset that divides already (rd_cpu, bkd_cpu) is run without it;
    # the methods without the option (CFRG, DSKD) always give their raw map
    if any(f.name == "map_norm" for f in dataclasses.fields(get_method(cfg.method).Config)):
        cfg = load_config(preset, [], [*sets, "model.map_norm=none"])
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
    assert pred.masks is not None
    out["au_pro"] = {rule: {half: float(au_pro(m[idx], pred.masks[idx])) for half, idx in (("selection", sel),
                                                                                         ("report", rep))}
                     for rule, m in normalised_maps(pred.maps, normal.maps).items()}
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (cell, category, rule), image AUROC and AU-PRO, mean ± sample std over seeds."""
    lines = ["| cell | category | rule | seeds | image AUROC selection | report | AU-PRO selection | report |",
             "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["cell"], r["category"]) for r in rows):
        mine = [r for r in rows if (r["cell"], r["category"]) == key]
        for rule in RULES:
            have = [r for r in mine if rule in r["image_auroc"]]  # rules added later are absent from older rows
            if not have:
                continue
            cols = []
            for metric in ("image_auroc", "au_pro"):
                for half in ("selection", "report"):
                    v = np.array([r[metric][rule][half] for r in have if rule in r.get(metric, {})])
                    cols.append("–" if len(v) == 0 else
                                f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
            lines.append(f"| {key[0]} | {key[1]} | {rule} | {len(have)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    quality_split.seed_study(run, summary, "rd_cpu", "magnetic_tile", quality_split.RESULTS / "map_norm.json")


if __name__ == "__main__":
    main()
