"""Why the patch student of `patchst_cpu` trails its memory branch (issue 18); SELECTION half by default.

From a `patchst_cpu` run folder made by benchmarks/patchst_branches.py (model.ckpt and its grids.pt):
1. per defect type, image AUROC of each branch's map and the median image score of that type's images, next to
   the held-out normals' mean score: does the student miss defects because normal images score high, or
   because defects score low (the student reproduces them)?
2. the student's residual (target - prediction, a C-vector per position) scored three ways, each fitted on the
   held-out normals, then divided by their per-position mean and blurred as the preset's map:
     mse    mean over channels of the squared residual (the preset's student map)
     diag   each channel over its held-out variance (and mean) first
     maha   Mahalanobis distance with the held-out covariance, ridge eps x mean variance
   a whitening that sees which residual directions normal images produce; each also added to the memory
   branch's map ("+memory"), as the preset adds its branches.
It chooses nothing for a preset. `--half report` scores the other half of the same trained models, to report what
a choice made on the selection half gives (part 1 needs grids.pt of the selection half and is skipped there).

Run: python benchmarks/student_residual.py --run /tmp/kdad_patchst_branches/magnetic_tile_0 [--out ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.data.factory import build_dataset
from kdad.metrics import au_pro, image_auroc
from kdad.train import train_val_datasets


def residuals(model: Any, ds: Any, idx: list[int]) -> Tensor:
    """(N, C, h, w) target minus the student's prediction."""
    out = []
    with torch.no_grad():
        for i in range(0, len(idx), 16):
            x = torch.stack([ds[j]["image"] for j in idx[i:i + 16]])
            (t,), (s,) = model.pairs(x)
            out.append(t - s.float())
    return torch.cat(out)


def residual_grid(r: Tensor, kind: str, mu: Tensor, cov: Tensor, eps: float = 0.0) -> Tensor:
    """(N, 1, h, w) score of each position's residual: mse, diag or maha (see the module doc)."""
    c = r.shape[1]
    if kind == "mse":
        return (r**2).mean(1, keepdim=True)
    z = r - mu.float().view(1, c, 1, 1)
    if kind == "diag":
        return (z**2 / cov.diag().float().view(1, c, 1, 1)).mean(1, keepdim=True)
    prec = torch.linalg.inv(cov + eps * cov.diag().mean() * torch.eye(c, dtype=cov.dtype)).float()
    zf = z.permute(0, 2, 3, 1)
    return ((zf @ prec) * zf).sum(-1).unsqueeze(1) / c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a patchst_cpu run folder of benchmarks/patchst_branches.py")
    ap.add_argument("--half", choices=("selection", "report"), default="selection")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_common.RESULTS / "student_residual.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model, cfg = model_from_bundle(load_bundle(run / "model.ckpt"))
    model.eval()
    test = build_dataset(cfg.data, "test")
    sel, rep = _common.halves(test)
    if args.half == "report":
        sel = rep
    _, val, _ = train_val_datasets(cfg)
    types = np.array([test.samples[j].defect_type for j in sel])
    labels = (types != "good").astype(int)
    masks = np.stack([test[j]["mask"][0].numpy() > 0.5 for j in sel])

    def mx(m: Tensor) -> np.ndarray:
        return m.flatten(1).amax(1).numpy()

    row: dict[str, Any] = {"category": Path(str(cfg.data.root)).name, "seed": cfg.train.seed, "half": args.half,
                           "run": str(run)}
    g, v = torch.load(run / "grids.pt") if args.half == "selection" else (None, None)  # patchst_branches' maps
    branch: dict[str, Any] = {}
    for k, name in enumerate(("student", "memory") if g is not None else ()):
        sc, held = mx(g[:, k]), mx(v[:, k])
        per = {"held_out_mean": round(float(held.mean()), 3), "held_out_std": round(float(held.std()), 3),
               "good_median": round(float(np.median(sc[types == "good"])), 3)}
        for t in sorted(set(types) - {"good"}):
            keep = (types == t) | (types == "good")
            per[t] = {"auroc": round(float(image_auroc(sc[keep], labels[keep])), 3),
                      "median": round(float(np.median(sc[types == t])), 3)}
        branch[name] = per
    row["by_type"] = branch

    rv, rt = residuals(model, val, list(range(len(val)))), residuals(model, test, sel)
    flat = rv.permute(0, 2, 3, 1).reshape(-1, rv.shape[1]).double()
    mu = flat.mean(0)
    cov = torch.cov((flat - mu).T)
    scores: dict[str, Any] = {}
    for kind, eps in (("mse", 0.0), ("diag", 0.0), ("maha", 0.01), ("maha", 0.1), ("maha", 1.0)):
        gv, gt = residual_grid(rv, kind, mu, cov, eps), residual_grid(rt, kind, mu, cov, eps)
        d = gt / gv.mean(0, keepdim=True).clamp_min(1e-6)
        amap = model.blur(F.interpolate(d, size=rt.shape[-1] * 8, mode="bilinear", align_corners=False))[:, 0]
        key = kind if kind != "maha" else f"maha_eps{eps:g}"
        scores[key] = {"image_auroc": round(float(image_auroc(mx(amap), labels)), 4),
                       "au_pro": round(float(au_pro(amap.numpy(), masks)), 4)}
        if g is not None:  # plus the memory branch's map, as the preset adds its two branches
            both = amap + g[:, 1]
            scores[f"{key}+memory"] = {"image_auroc": round(float(image_auroc(mx(both), labels)), 4),
                                       "au_pro": round(float(au_pro(both.numpy(), masks)), 4)}
    row["residual_scores"] = scores
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"question": __doc__.split("\n")[0], "rows": []}
    key = (row["category"], row["seed"], row["half"])
    doc["rows"] = [r for r in doc["rows"] if (r["category"], r["seed"], r["half"]) != key] + [row]
    doc["meta"] = _common.metadata()
    _common.write_json(out, doc)


if __name__ == "__main__":
    main()
