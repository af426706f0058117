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
from kdad.train import fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDAD_SHARED", str(ROOT.parent / "shared")))  # a copy elsewhere (GPU machine)
CATEGORIES = {
    "bottle": SHARED / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": SHARED / "data" / "mtd" / "magnetic_tile",
}
TEXTURES = SHARED / "data" / "dtd" / "images"
PRESETS = {"rd": "rd_cpu", "rdpp": "rdpp_cpu", "urd": "urd_cpu", "cfrg": "cfrg_cpu"}
THREADS = 2


def urd_foreground(category: str) -> str:
    """URD's per-category foreground (bottle: GrabCut), or "none" where OpenCV is missing (recorded)."""
    from kdad.synthesis import URD_FOREGROUND_MVTEC

    method = URD_FOREGROUND_MVTEC.get(category, "none")
    if method == "grabcut" and importlib.util.find_spec("cv2") is None:
        return "none"
    return method


def run_one(method: str, category: str, args: argparse.Namespace, work: Path,
            extra_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train with the method's CPU preset under the shared budget (plus `extra_overrides`), then evaluate on
    the test split."""
    overrides = [
        f"data.root={CATEGORIES[category]}", "data.image_size=256", f"train.device={args.device}",
        "train.progress=false",
        f"train.max_iters={args.iters}", f"train.batch_size={args.batch}", "train.epochs=1000",
        f"train.seed={args.seed}", "train.val_fraction=0.1", "model.backbone=efficientnet_lite0",
        f"train.max_seconds={args.max_seconds}",
    ]
    extra: dict[str, Any] = {}
    if method == "urd":
        extra["foreground"] = urd_foreground(category)
        overrides += [f"data.texture_dir={TEXTURES}", f"model.synthesis.foreground={extra['foreground']}"]
    if method == "cfrg":
        overrides += [f"data.texture_dir={TEXTURES}"]
    cfg = load_config(PRESETS[method], [], [*overrides, *extra_overrides])
    run_dir = work / f"{method}_{category}"
    fit(cfg, run_dir)
    res = evaluate_run(run_dir, device=args.device, report=False)
    info = res["train_info"]
    m = res["metrics"]
    return {
        "method": method, "category": category, "preset": PRESETS[method], **extra,
        "i_auroc": m.get("image_auroc"), "p_auroc": m.get("pixel_auroc"), "au_pro": m.get("au_pro"),
        "train_img_per_s": info.get("train_images_per_s"), "train_seconds": info.get("train_seconds"),
        "iters": info.get("iters"), "n_test_images": res["n_images"], "metrics": m,
    }


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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rd_family.json")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    out: dict[str, Any] = {
        "question": f"RD vs RD++ vs URD, same budget and teacher (efficientnet_lite0, 256 px) on {args.device}",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "kdad": kdad.__version__,
        "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} threads",
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
                args.out.write_text(json.dumps(out, indent=2))
                print(f"{category:14s} {method:5s} I-AUROC {row['i_auroc']:.4f} P-AUROC {row['p_auroc']:.4f} "
                      f"AU-PRO {row['au_pro']:.4f}  {row['train_img_per_s']:.2f} img/s  "
                      f"{row['train_seconds']:.0f} s train  {row['wall_seconds']:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
