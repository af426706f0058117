"""RD vs RD++ vs URD on CPU under one budget and one teacher (EfficientNet-Lite0, 256 px).

Question: on a small CPU budget, do RD++'s projection/denoising and URD's expert-teacher-student + GII help
over plain RD on MVTec AD bottle and MTD magnetic_tile? Same iterations, batch, seed and teacher for all.
Caveat: a few hundred images seen per run is far from the papers' budgets (RD++ steps its optimizers every
2nd batch, so it gets half the updates, as its official gradient accumulation).

Run:  python benchmarks/rd_family.py [--iters 12] [--batch 8] [--out benchmarks/results/rd_family.json]
Reads ../shared/data (MVTec bottle, MTD, DTD textures). Results are written after every run, so a partial
file survives an interruption. Metrics: kdad.evaluate (I-AUROC, P-AUROC, AU-PRO@0.3, dataset level).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import CATEGORIES, RESULTS, metadata, run_one, write_json

THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--methods", nargs="+", default=["rd", "rdpp", "urd"])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="also stop each run after this much training time (0 = iterations only)")
    parser.add_argument("--device", default="cpu", help="cpu (the issue's CPU comparison) or cuda")
    parser.add_argument("--out", type=Path, default=RESULTS / "rd_family.json")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    out: dict[str, Any] = {
        "question": f"RD vs RD++ vs URD, same budget and teacher (efficientnet_lite0, 256 px) on {args.device}",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "meta": metadata(),
        "budget": {"iters": args.iters, "max_seconds": args.max_seconds, "batch_size": args.batch, "seed": args.seed, "image_size": 256},
        "protocol": "last iteration kept; thresholds from 10% held-out normals; metrics at 256 px, "
                    "AU-PRO dataset-level @0.3", "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories:
            for method in args.methods:
                t0 = time.perf_counter()
                row = run_one(method, category, args, Path(tmp))
                row["wall_seconds"] = time.perf_counter() - t0
                out["runs"].append(row)
                write_json(args.out, out)
                print(f"{category:14s} {method:5s} I-AUROC {row['i_auroc']:.4f} P-AUROC {row['p_auroc']:.4f} "
                      f"AU-PRO {row['au_pro']:.4f}  {row['train_img_per_s']:.2f} img/s  "
                      f"{row['train_seconds']:.0f} s train  {row['wall_seconds']:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
