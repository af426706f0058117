"""Memory-size study behind patchst_cpu's `memory: 80000` (docs/methods/patchst.md), SELECTION half only.

Reads the grids saved by `student_ensemble.py --k 1 --steps 1000 --every 1000 --save-grids G` (student error
grids and standardised target features of the held-out normals and the selection-half test images). For each
memory size it draws that many training positions at random, scores the squared distance to the nearest one,
divides it by its held-out per-position mean and reports it alone and added to the student's map.

Run: python benchmarks/student_memory.py G --sizes 10000 20000 40000 80000 --out results/student_memory.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common
import torch
from student_ensemble import knn_grid, scores

from kdad.blocks.maps import GaussianBlur


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("grids")
    ap.add_argument("--sizes", nargs="+", type=int, default=[10000, 20000, 40000, 80000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = torch.load(args.grids, weights_only=False)
    blur = GaussianBlur(4.0)
    labels, masks, types = d["labels"], d["masks"], d["types"]
    gt, gc = d["gt"][0], d["gc"][0]
    kd_t, kd_c = gt / gc.mean(0).clamp_min(1e-6), gc / gc.mean(0).clamp_min(1e-6)
    rows = [scores("student", gt, gc, 256, blur, labels, masks, types, True)]
    flat = d["tt"].permute(0, 2, 3, 1).reshape(-1, d["tt"].shape[1])
    for m in args.sizes:
        bank = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:m]]
        kt, kc = knn_grid(bank, d["ts"]) ** 2, knn_grid(bank, d["tc"]) ** 2
        row = {"memory": m, **scores("memory", kt, kc, 256, blur, labels, masks, types, True)}
        at, ac = kt / kc.mean(0).clamp_min(1e-6), kc / kc.mean(0).clamp_min(1e-6)
        row.update(scores("student_plus_memory", kd_t + at, kd_c + ac, 256, blur, labels, masks, types, True))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        _common.write_json(Path(args.out), {"args": vars(args), "rows": rows, "meta": _common.metadata()})


if __name__ == "__main__":
    main()
