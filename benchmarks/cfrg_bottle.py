"""CFRG beside RD and URD on CPU under one budget and one teacher (EfficientNet-Lite0, 256 px).

Question: with the same few optimizer steps, batch, seed and teacher, how do CFRG (3CAD, AAAI 2025; student
trained from scratch + recovery branch + segmentation head) and URD compare with plain RD on MVTec AD bottle and
MTD magnetic_tile? Caveat: a few hundred images seen per run is far below the papers' budgets (CFRG: 50 epochs
at batch 32), and CFRG's EfficientNet-b0 student starts from random weights, so this measures early training only.
The machine is shared: the 1-minute load average is recorded with every run, and img/s depend on it.

Run:  python benchmarks/cfrg_bottle.py [--iters 12] [--batch 8] [--methods rd urd cfrg]
Reads ../shared/data (MVTec bottle, MTD, DTD textures). Results are written after every run to
benchmarks/results/cfrg.json, so a partial file survives an interruption. Metrics: kdad.evaluate
(I-AUROC, P-AUROC, AU-PRO@0.3, dataset level, at 256 px).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import kdad
from kdad.config import load_config
from kdad.evaluate import evaluate_run
from kdad.methods import METHODS
from kdad.train import fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CATEGORIES = {
    "bottle": SHARED / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": SHARED / "data" / "mtd" / "magnetic_tile",
}
TEXTURES = SHARED / "data" / "dtd" / "images"
PRESETS = {"rd": "rd_cpu", "urd": "urd_cpu", "cfrg": "cfrg_cpu"}
THREADS = 2
DECAY_AT = (0.8, 0.9)  # CFRG's official LR decays, as fractions of the run


def method_overrides(method: str, category: str, iters: int) -> tuple[list[str], dict[str, Any]]:
    """Per-method settings: textures for the synthesising methods, CFRG's decays scaled to the budget."""
    extra: dict[str, Any] = {}
    sets: list[str] = []
    if method in ("urd", "cfrg"):
        sets.append(f"data.texture_dir={TEXTURES}")
    if method == "urd":
        from kdad.synthesis import URD_FOREGROUND_MVTEC

        fg = URD_FOREGROUND_MVTEC.get(category, "none")
        if fg == "grabcut" and importlib.util.find_spec("cv2") is None:
            fg = "none"  # GrabCut needs OpenCV; recorded in the result row
        extra["foreground"] = fg
        sets.append(f"model.synthesis.foreground={fg}")
    if method == "cfrg":
        milestones = [max(1, round(f * iters)) for f in DECAY_AT]
        extra["lr_milestones_steps"] = milestones
        sets += ["model.lr_unit=step", f"model.lr_milestones={json.dumps(milestones)}"]
    return sets, extra


def run_one(method: str, category: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train with the method's CPU preset under the shared budget, then evaluate on the test split."""
    sets, extra = method_overrides(method, category, args.iters)
    overrides = [
        f"data.root={CATEGORIES[category]}", "data.image_size=256", "train.device=cpu", "train.progress=false",
        f"train.max_iters={args.iters}", f"train.batch_size={args.batch}", "train.epochs=1000",
        f"train.seed={args.seed}", "train.val_fraction=0.1", "model.backbone=efficientnet_lite0", *sets,
    ]
    cfg = load_config(PRESETS[method], [], overrides)
    run_dir = work / f"{method}_{category}"
    load_before = os.getloadavg()[0]
    fit(cfg, run_dir)
    t0 = time.perf_counter()
    res = evaluate_run(run_dir, device="cpu", report=False)
    info, m = res["train_info"], res["metrics"]
    return {
        "method": method, "category": category, "preset": PRESETS[method], **extra,
        "i_auroc": m.get("image_auroc"), "p_auroc": m.get("pixel_auroc"), "au_pro": m.get("au_pro"),
        "train_img_per_s": info.get("train_images_per_s"), "train_seconds": info.get("train_seconds"),
        "eval_seconds": time.perf_counter() - t0, "iters": info.get("iters"), "n_test_images": res["n_images"],
        "load_avg_1min": [load_before, os.getloadavg()[0]], "metrics": m,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--methods", nargs="+", default=[m for m in PRESETS if m in METHODS])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cfrg.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    out: dict[str, Any] = {
        "question": "CFRG beside RD and URD, same CPU budget and teacher (efficientnet_lite0, 256 px)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "kdad": kdad.__version__,
        "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus, {THREADS} threads, shared",
        "budget": {"iters": args.iters, "batch_size": args.batch, "seed": args.seed, "image_size": 256},
        "protocol": "last iteration kept; thresholds from 10% held-out normals; metrics at 256 px, "
                    "AU-PRO dataset-level @0.3; CFRG LR decays x0.2 at 0.8 and 0.9 of the run",
        "methods_missing": [m for m in PRESETS if m not in METHODS], "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories:
            for method in args.methods:
                t0 = time.perf_counter()
                row = run_one(method, category, args, Path(tmp))
                row["wall_seconds"] = time.perf_counter() - t0
                out["runs"].append(row)
                args.out.write_text(json.dumps(out, indent=2))
                print(f"{category:14s} {method:5s} I-AUROC {row['i_auroc']:.4f} P-AUROC {row['p_auroc']:.4f} "
                      f"AU-PRO {row['au_pro']:.4f}  {row['train_img_per_s']:.2f} img/s  "
                      f"{row['train_seconds']:.0f} s train  {row['wall_seconds']:.0f} s total  "
                      f"load {row['load_avg_1min'][0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
