"""How an RD-family model's map is read out, varied after training (no retraining): does another image score
or another way of adding up the teacher layers close the gap to the probe? (docs/quality.md, "Session 28")

Fits the cell (quality.py's syntax) into --run unless a model is there already, then computes each teacher
layer's distance map (resized to the input and blurred, as the preset's head does) for the held-out normals of
fit's split and for the test images, and scores on the quality study's selection and report halves:
- the image score: the map's max (the presets'), or the mean of its top 0.1 %, 1 % or 3 % of pixels;
- the layers' sum: raw; over the normals' mean of the sum (the preset's `map_norm: position`); each layer over
  its own normals' mean; each layer standardised by the normals' mean and std per position; the sum standardised;
  each single layer and each pair over its normals' mean.

Run: python benchmarks/map_readout.py --cell rd_cpu --category magnetic_tile --seed 0 --run /tmp/x --out F
(the rows append to F; models with `data.align` on are refused: the layers would have to be warped back too)
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F
from quality import cell_config, parse_cell
from sklearn.metrics import roc_auc_score

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.data.factory import build_dataset
from kdad.train import fit, train_val_datasets

TOPS = (0.0, 0.001, 0.01, 0.03)  # 0 = the max


@torch.inference_mode()
def layer_maps(model: Any, ds: Any, batch: int = 16) -> np.ndarray:
    """(N, L, H, W) float32: each layer's blurred distance map at the input size, before any normalisation."""
    head, out = model.head, []
    for i in range(0, len(ds), batch):
        x = torch.stack([ds[j]["image"] for j in range(i, min(i + batch, len(ds)))])
        teacher, student = model.pairs(x)
        maps = [head.blur(F.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear",
                                        align_corners=head.align_corners)) for m in head.layer_maps(teacher, student)]
        out.append(torch.cat(maps, 1).numpy())
    return np.concatenate(out)


def image_score(maps: np.ndarray, top: float) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    if top == 0:
        return flat.max(1)
    k = max(1, int(round(flat.shape[1] * top)))
    return -np.sort(-flat, 1)[:, :k].mean(1)


def readouts(val: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> (N, H, W) map of the test images, from the per-layer maps of the normals and the test images."""
    mu, sd = val.mean(0), val.std(0) + 1e-6
    vsum = val.sum(1)
    out = {"sum, raw": test.sum(1),
           "sum over the normals' mean (map_norm: position)": test.sum(1) / np.maximum(vsum.mean(0), 1e-6),
           "each layer over its normals' mean": (test / mu).sum(1),
           "each layer standardised": ((test - mu) / sd).sum(1),
           "sum standardised": (test.sum(1) - vsum.mean(0)) / (vsum.std(0) + 1e-6)}
    n = test.shape[1]
    for r in range(1, n):
        for sub in itertools.combinations(range(n), r):
            out[f"layers {[i + 1 for i in sub]} of {n}, each over its mean"] = (test[:, sub] / mu[list(sub)]).sum(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", required=True, help="the run folder: fitted here unless it holds model.ckpt")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    name, preset, overrides = parse_cell(args.cell)
    run = Path(args.run)
    if not (run / "model.ckpt").is_file():
        fit(cell_config(preset, overrides, args.category, args.seed), run)
    model, cfg = model_from_bundle(load_bundle(run / "model.ckpt"))
    model.eval()
    if cfg.data.align != "none":
        raise SystemExit(f"{run}: data.align={cfg.data.align}; this readout works on unaligned models only")
    _, val, _ = train_val_datasets(cfg)
    test = build_dataset(cfg.data, "test")
    labels = np.array([s.label for s in test.samples])
    sel, rep = _common.halves(test)
    vmaps, tmaps = layer_maps(model, val), layer_maps(model, test)
    rows = []
    for readout, maps in readouts(vmaps, tmaps).items():
        for top in TOPS:
            s = image_score(maps, top)
            rows.append({"readout": readout, "image_score": "max" if top == 0 else f"top {top:.1%} mean",
                         "selection": float(roc_auc_score(labels[sel], s[sel])),
                         "report": float(roc_auc_score(labels[rep], s[rep]))})
    for r in rows:
        print(f"{r['readout']:50s} {r['image_score']:15s} {r['selection']:.3f} / {r['report']:.3f}")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {
        "question": "does another image score or layer sum of a trained RD-family model beat its preset's map "
                    "(image AUROC on the selection / report halves)", "meta": _common.metadata(), "runs": []}
    doc["runs"].append({"cell": name, "preset": preset, "overrides": overrides, "category": args.category,
                        "seed": args.seed, "held_out_normals": len(vmaps), "rows": rows})
    _common.write_json(out, doc)


if __name__ == "__main__":
    main()
