"""DSKD on a small budget: does the global student catch logical anomalies the local (RD-like) student misses?

Parts (each writes into the results JSON as soon as it finishes, so a partial file survives an interruption):
- logical: a generated MVTec-LOCO-format category (kdad.data.loco.write_toy_loco: a box that must hold a red
  disc left and a blue one right; logical = a disc missing, a third disc, colours swapped; structural = a
  scratch) at 128 px. One DSKD model; its local-only, global-only and combined (eq. 8) maps are scored with
  the LOCO protocol (image AUROC and AU-sPRO@0.05 per subset). eq. 8 statistics from the validation split.
- mvtec: RD vs DSKD on MVTec AD bottle and MTD magnetic_tile, same teacher (EfficientNet-Lite0), 256 px,
  iterations, batch and seed (I-AUROC, P-AUROC, AU-PRO@0.3 via kdad.evaluate).
- memory (CUDA only): peak GPU memory of one DSKD training step, WRN50-2 (random weights), batch 16, 256 px,
  for several affinity chunk sizes, with RD as reference (docs/methods/dskd.md's arithmetic, measured).

Run:  python benchmarks/dskd_logical.py [--parts logical mvtec] [--iters 10] [--logical-iters 40] [--batch 4]
Reads ../shared/data (MVTec bottle, MTD). Caveat: a few hundred images seen per run is far from 200 epochs.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RD_PAPER_OVERRIDES, write_json

import kdad
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.data.loco import LocoDataset, write_toy_loco
from kdad.evaluate import Predictions, evaluate_run, loco_metrics
from kdad.train import fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CATEGORIES = {
    "bottle": SHARED / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": SHARED / "data" / "mtd" / "magnetic_tile",
}
PRESETS = {"rd": "rd_cpu", "dskd": "dskd_cpu"}
THREADS = 2
TOY = {"size": 128, "n_train": 60, "n_validation": 12, "n_test": (20, 18, 10), "seed": 0}


def _common(args: argparse.Namespace, iters: int) -> list[str]:
    return [f"train.device={args.device}", "train.progress=false", f"train.max_iters={iters}",
            f"train.batch_size={args.batch}", "train.epochs=1000", f"train.seed={args.seed}",
            "model.backbone=efficientnet_lite0", f"model.weights={args.weights}"]


@torch.inference_mode()
def per_student_scores(run_dir: Path, ds: LocoDataset, device: torch.device) -> dict[str, dict[str, float]]:
    """LOCO metrics of the local-only, global-only and combined maps of one trained DSKD model."""
    model, _ = model_from_bundle(load_bundle(run_dir / "model.ckpt"))
    model.to(device).eval()
    maps: dict[str, list[np.ndarray]] = {"local": [], "global": [], "combined": []}
    for i in range(0, len(ds), 8):
        images = torch.stack([ds[j]["image"] for j in range(i, min(i + 8, len(ds)))]).to(device)
        student = model.student_maps(images)  # (M - mu) / sigma per student (eq. 8), before the blur
        for name, m in (("local", student["local"]), ("global", student["global"]),
                        ("combined", student["local"] + student["global"])):
            maps[name].append(model.blur(m)[:, 0].float().cpu().numpy())
    out = {}
    for name, parts in maps.items():
        arr = np.concatenate(parts)
        pred = Predictions(scores=arr.reshape(len(arr), -1).max(1), labels=np.asarray(ds.labels), paths=[],
                           defect_types=ds.defect_types, map_means=arr.mean((1, 2)), maps=arr)
        m = loco_metrics(pred, ds)
        out[name] = {k: m[k] for k in ("image_auroc_logical", "image_auroc_structural", "image_auroc_mean",
                                       "au_spro_logical@0.05", "au_spro_structural@0.05", "au_spro_mean@0.05")}
    return out


def run_logical(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train DSKD on the generated LOCO category and score each student's map."""
    root = write_toy_loco(work / "discs", **TOY)  # type: ignore[arg-type]
    overrides = [f"data.root={root}", "data.format=loco", f"data.image_size={TOY['size']}",
                 "data.val_split=validation", "train.val_fraction=0.0", *_common(args, args.logical_iters)]
    cfg = load_config("dskd_cpu", [], overrides)
    t0 = time.perf_counter()
    run_dir = fit(cfg, work / "dskd_discs")
    res = evaluate_run(run_dir, device=args.device, report=False)
    ds = LocoDataset(root, "test", TOY["size"])
    info = res["train_info"]
    return {"part": "logical", "dataset": {k: list(v) if isinstance(v, tuple) else v for k, v in TOY.items()},
            "iters": info.get("iters"), "train_seconds": info.get("train_seconds"),
            "per_student": per_student_scores(run_dir, ds, torch.device(args.device)),
            "engine_metrics": {k: v for k, v in res["metrics"].items() if "spro" in k or "auroc" in k},
            "wall_seconds": time.perf_counter() - t0}


def run_mvtec(method: str, category: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train with the method's CPU preset under the shared budget, then evaluate on the test split."""
    overrides = [f"data.root={CATEGORIES[category]}", "data.image_size=256", "train.val_fraction=0.1",
                 *_common(args, args.iters)] + (list(RD_PAPER_OVERRIDES) if method == "rd" else [])
    cfg = load_config(PRESETS[method], [], overrides)
    t0 = time.perf_counter()
    run_dir = fit(cfg, work / f"{method}_{category}")
    res = evaluate_run(run_dir, device=args.device, report=False)
    m, info = res["metrics"], res["train_info"]
    return {"part": "mvtec", "method": method, "category": category, "i_auroc": m.get("image_auroc"),
            "p_auroc": m.get("pixel_auroc"), "au_pro": m.get("au_pro"), "iters": info.get("iters"),
            "train_seconds": info.get("train_seconds"), "n_test_images": res["n_images"],
            "wall_seconds": time.perf_counter() - t0}


def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak CUDA memory of one training step at batch 16, 256 px, WRN50-2 (random weights)."""
    from kdad.config import from_dict
    from kdad.methods import get_method

    rows = []
    x = torch.rand(16, 3, 256, 256, device="cuda")
    for method, chunk in (("rd", None), ("dskd", 0), ("dskd", 4096), ("dskd", 16384), ("dskd", 65536)):  # rows over the batch
        for amp in (False, True):
            spec = get_method(method)
            extra = {} if chunk is None else {"affinity_chunk": chunk}
            cfg = from_dict(spec.Config, {"backbone": "wide_resnet50_2", "weights": "random", **extra})
            model = spec.Model(cfg).cuda().train()
            opts = spec.optimizers(model, cfg)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cuda", enabled=False)
            with ctx:
                spec.train_step(model, {"image": x}, opts, cfg, torch.Generator())  # warm-up (Adam state)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with ctx:
                spec.train_step(model, {"image": x}, opts, cfg, torch.Generator())
            torch.cuda.synchronize()
            rows.append({"method": method, "affinity_chunk": chunk, "bf16_autocast": amp,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "step_seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            del model, opts
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["logical", "mvtec"], choices=["logical", "mvtec", "memory"])
    parser.add_argument("--iters", type=int, default=10, help="MVTec/MTD runs")
    parser.add_argument("--logical-iters", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="imagenet", help="teacher weights (random where none ship)")
    parser.add_argument("--methods", nargs="+", default=list(PRESETS))
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dskd.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    out: dict[str, Any] = {
        "question": "does DSKD's global student detect logical anomalies the local student misses; "
                    "DSKD vs RD on bottle / magnetic_tile under one small budget",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "kdad": kdad.__version__, "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {THREADS} threads, device {args.device}, "
                   f"load average at start {os.getloadavg()[0]:.1f} (cores shared with other jobs)"
                   + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
        "budget": {"iters": args.iters, "logical_iters": args.logical_iters, "batch_size": args.batch,
                   "seed": args.seed, "teacher": f"efficientnet_lite0 ({args.weights})"},
        "protocol": "last iteration kept; eq. 8 stats + thresholds from held-out normals (LOCO validation split "
                    "/ 10% of MVTec train); metrics at image size; AU-PRO dataset-level @0.3; AU-sPRO exact "
                    "global-sort @0.05 with all good images per subset",
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "memory" in args.parts:
            out["memory"] = run_memory(args)
            write_json(args.out, out)
        if "logical" in args.parts:
            row = run_logical(args, Path(tmp))
            out["runs"].append(row)
            write_json(args.out, out)
            for name, m in row["per_student"].items():
                print(f"logical toy  {name:8s} I-AUROC logical {m['image_auroc_logical']:.3f} structural "
                      f"{m['image_auroc_structural']:.3f}  AU-sPRO@0.05 logical {m['au_spro_logical@0.05']:.3f} "
                      f"structural {m['au_spro_structural@0.05']:.3f}", flush=True)
        if "mvtec" in args.parts:
            for category in args.categories:
                for method in args.methods:
                    row = run_mvtec(method, category, args, Path(tmp))
                    out["runs"].append(row)
                    write_json(args.out, out)
                    print(f"{category:14s} {method:5s} I-AUROC {row['i_auroc']:.4f} P-AUROC {row['p_auroc']:.4f} "
                          f"AU-PRO {row['au_pro']:.4f}  {row['train_seconds']:.0f} s train "
                          f"{row['wall_seconds']:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
