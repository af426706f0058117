"""Which region of an aligned model's map should give the image score (docs/quality.md, "Session 30")?

On screws_lit the max of cfrg_cpu's and dskd_cpu's map lies off the part, on the backdrop's dust and light fall-off,
on most images (aligned_max.py), and their image AUROC is at chance. This script scores the same fitted model with
the max taken over other regions of the aligned frame:

- "map": the whole map (the presets' score before session 30);
- "part +m": the image's own part (align.foreground of the aligned image) grown by m px;
- "envelope q +m": the pixels where at least a share q of the aligned training images have their part, grown by m
  px: one fixed region for every image, so a missing piece (a broken tip) still lies inside it.

Choices are made on a selection-only set (screws_dusty: every test image) and reported on others. Fits the cell
(quality.py's syntax) into --run unless a model is there already. Rows append to --out.

Run: python benchmarks/part_roi.py --cell dskd_cpu --category screws_dusty --seed 0 --run /tmp/x --out F
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import _common
import numpy as np
import torch
from quality import KEYS, add_cell_args, fitted_aligned_cell
from sklearn.metrics import roc_auc_score

from kdad.align import ENVELOPE_SAMPLE, ENVELOPE_SHARE, AlignedModel, AlignSpec, align_images, foreground, resolve_auto
from kdad.data.factory import build_dataset, dataset_parts
from kdad.evaluate import compute_metrics, predict
from kdad.prediction_metrics import select

MARGINS = (-4, 0, 4, 8, 16)  # px in the model's input; < 0 shrinks
SHARES = (0.1, 0.5)


@torch.inference_mode()
def aligned_parts(ds: Any, spec: AlignSpec, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(aligned images (N, 3, H, W), each one's part in the aligned frame (N, H, W) bool)."""
    images, parts = [], []
    for i in range(0, len(ds), batch):
        x = torch.stack([ds[j]["image"] for j in range(i, min(i + batch, len(ds)))])
        aligned, _ = align_images(x, spec)
        images.append(aligned)
        parts.append(foreground(aligned))
    return torch.cat(images), torch.cat(parts)


@torch.inference_mode()
def maps_of(model: Any, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]).anomaly_map.float()[:, 0] for i in range(0, len(images), batch)])


def region_max(m: torch.Tensor, region: torch.Tensor) -> np.ndarray:
    """Each map's max over its region; the whole map's max where the region is empty."""
    low = m.amin((1, 2), keepdim=True)
    inside = torch.where(region, m, low).flatten(1).amax(1)
    return torch.where(region.flatten(1).any(1), inside, m.flatten(1).amax(1)).numpy()


def summary(row: dict[str, Any]) -> dict[str, float]:
    """The shipped paths' headline numbers as flat columns (docs/benchmarks.md's table)."""
    out = {}
    for region in ("frame", "part"):
        m = row[f"data.align_region={region}"]
        for half in ("selection", "report"):
            out[f"{region}: image AUROC, {half}"] = m[half]["image_auroc"]
        out[f"{region}: AU-PRO, report"] = m["report"]["au_pro"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_cell_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    name, preset, overrides, model, cfg, spec = fitted_aligned_cell(args)
    _, train_parts = aligned_parts(build_dataset(cfg.data, "train"), spec)
    share = train_parts.float().mean(0)
    test = build_dataset(cfg.data, "test")
    labels = np.array([s.label for s in test.samples])
    kinds = np.array([s.defect_type for s in test.samples])
    images, parts = aligned_parts(test, spec)
    m = maps_of(model, images)
    regions: dict[str, torch.Tensor] = {"map": torch.ones_like(parts)}
    for px in MARGINS:
        regions[f"part +{px}"] = _common.grow(parts, px)
        for q in SHARES:
            regions[f"envelope {q} +{px}"] = _common.grow((share >= q)[None], px).expand_as(parts)
    sel, rep = _common.halves(test)
    good = labels == 0
    row: dict[str, Any] = {"cell": name, "preset": preset, "overrides": overrides, "category": args.category,
                           "seed": args.seed, "zoom": cfg.data.align_zoom, "regions": {}}
    for key, region in regions.items():
        s = region_max(m, region)
        r = {"all": float(roc_auc_score(labels, s)), "selection": float(roc_auc_score(labels[sel], s[sel])),
             "report": float(roc_auc_score(labels[rep], s[rep])),
             "share of the frame": float(region.float().mean()),
             "by type": {k: float(roc_auc_score(labels[good | (kinds == k)], s[good | (kinds == k)]))
                         for k in sorted(set(kinds[~good]))}}
        row["regions"][key] = r
        print(f"{key:28s} all {r['all']:.3f} sel {r['selection']:.3f} rep {r['report']:.3f} "
              f"frame {r['share of the frame']:.2f} " + " ".join(f"{k} {v:.2f}" for k, v in r["by type"].items()),
              flush=True)
    # the shipped code path: the envelope as fit measures it (kdad.align.resolve_auto), maps in the image's frame
    on_part, _ = resolve_auto(dataclasses.replace(cfg.data, align_region="part", align_envelope=""),
                              [ds for _, ds in dataset_parts(cfg.data, "train")])
    frame = dataclasses.replace(spec, region="frame", envelope="")  # the model may have been fitted with either
    for region, sp in (("frame", frame), ("part", AlignSpec.from_data(on_part))):
        assert sp is not None
        pred = predict(AlignedModel(model, sp), test, torch.device("cpu"), 16)
        row[f"data.align_region={region}"] = {half: {k: compute_metrics(select(pred, idx))[k] for k in KEYS}
                                              for half, idx in (("all", list(range(len(test)))), ("selection", sel),
                                                                ("report", rep))}
        print(region, json.dumps(row[f"data.align_region={region}"]), flush=True)
    row["envelope"] = {"share": ENVELOPE_SHARE, "sample": ENVELOPE_SAMPLE, "text": on_part.align_envelope}
    row.update(summary(row))
    _common.append_run(args.out, "which region of the aligned map should give the image score", row)


if __name__ == "__main__":
    main()
