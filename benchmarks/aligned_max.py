"""Where an aligned model's image score comes from (docs/quality.md, "Session 29"): with a zoom > 1 the aligned
view of a part near the image's edge reaches past the input, and `align.warp` fills that with the input's edge
pixels, replicated. Is the map's max there on good images, or off the part (dust, the light's fall-off), and how
does the image AUROC change when the max is taken inside the input, or on the part, only?

Fits the cell (quality.py's syntax) into --run unless a model is there already; models without data.align are
refused. Rows append to --out.

Run: python benchmarks/aligned_max.py --cell dskd_cpu --category screws_lit --seed 0 --run /tmp/x --out F
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F
from quality import add_cell_args, fitted_aligned_cell
from sklearn.metrics import roc_auc_score

from kdad.align import AlignSpec, align_images, foreground
from kdad.data.factory import build_dataset

MARGIN_PX = 8  # "well inside": this far from the input's edge; "on the part": the foreground grown by this, in px


@torch.inference_mode()
def scores(model: Any, ds: Any, spec: AlignSpec, batch: int = 16) -> dict[str, np.ndarray]:
    """Per image: the aligned map's max (the preset's score), its max inside the input, at least MARGIN_PX inside,
    and on the part (align.foreground grown by MARGIN_PX); whether the max lies outside the input, on the part."""
    out: dict[str, list[Any]] = {"max": [], "inside": [], "well inside": [], "on the part": [], "max outside": [],
                                 "max on the part": []}
    for i in range(0, len(ds), batch):
        x = torch.stack([ds[j]["image"] for j in range(i, min(i + batch, len(ds)))])
        aligned, theta = align_images(x, spec)
        m = model(aligned).anomaly_map.float()[:, 0]
        size = m.shape[-1]
        grid = F.affine_grid(theta.float(), [len(x), 1, *m.shape[-2:]], align_corners=False)  # input coordinates
        inside = (grid.abs() <= 1).all(-1)
        well = (grid.abs() <= 1 - 2 * MARGIN_PX / size).all(-1)
        low = m.amin((1, 2), keepdim=True)
        part = _common.grow(foreground(aligned), MARGIN_PX)
        out["on the part"] += torch.where(part, m, low).flatten(1).amax(1).tolist()
        out["max on the part"] += part.flatten(1).gather(1, m.flatten(1).argmax(1)[:, None])[:, 0].tolist()
        out["max"] += m.flatten(1).amax(1).tolist()
        out["inside"] += torch.where(inside, m, low).flatten(1).amax(1).tolist()
        out["well inside"] += torch.where(well, m, low).flatten(1).amax(1).tolist()
        out["max outside"] += (~inside.flatten(1).gather(1, m.flatten(1).argmax(1)[:, None])[:, 0]).tolist()
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_cell_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    name, preset, overrides, model, cfg, spec = fitted_aligned_cell(args)
    test = build_dataset(cfg.data, "test")
    labels = np.array([s.label for s in test.samples])
    sel, rep = _common.halves(test)
    s = scores(model, test, spec)
    row: dict[str, Any] = {
        "cell": name, "preset": preset, "overrides": overrides, "category": args.category, "seed": args.seed,
        "zoom": cfg.data.align_zoom,
        "good images with the max outside the input": float(s["max outside"][labels == 0].mean()),
        "defective images with the max outside the input": float(s["max outside"][labels == 1].mean()),
        "good images with the max on the part": float(s["max on the part"][labels == 0].mean()),
        "defective images with the max on the part": float(s["max on the part"][labels == 1].mean())}
    for key in ("max", "inside", "well inside", "on the part"):
        row[f"image AUROC, {key}"] = {"selection": float(roc_auc_score(labels[sel], s[key][sel])),
                                      "report": float(roc_auc_score(labels[rep], s[key][rep]))}
    print(json.dumps(row, indent=1))
    _common.append_run(args.out, "does an aligned model's max land on the replicated border outside the input, or "
                       "off the part", row)


if __name__ == "__main__":
    main()
