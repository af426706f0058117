"""BKD (k = 2/4/8) beside RD on CPU under one small budget and one teacher (EfficientNet-Lite0, 256 px).

Question: does BKD's support alignment + memory bottleneck help over plain RD on MVTec AD bottle and MTD
magnetic_tile when both get the same (tiny) budget, and what does k cost in training speed and latency?
Caveat: on 2 shared CPU cores a BKD step with k = 8 takes tens of seconds, so the budget is a few dozen
iterations, far from the paper's 200 epochs; the numbers say little about BKD at convergence.

Run:  python benchmarks/bkd_bottle.py [--iters 10] [--batch 2] [--shots 2 4 8] [--test-per-type 10]
Reads ../shared/data. Results are written after every run (benchmarks/results/bkd.json), so a partial file
survives an interruption. Metrics: kdad.evaluate (image/pixel AUROC, F1-max, AU-PRO@0.3, dataset level).
--test-per-type N evaluates on a seeded subset of N test images per folder (good and each defect type) for the
categories listed in --subset (both by default; --test-per-type 0 = full test splits).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from _common import write_json

import kdad
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.evaluate import evaluate_run
from kdad.train import fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CATEGORIES = {
    "bottle": SHARED / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": SHARED / "data" / "mtd" / "magnetic_tile",
}
IMAGE_SIZE = 256
WARMUP, REPEATS = 2, 5


def subset_root(src: Path, dst: Path, per_type: int, seed: int) -> Path:
    """An MVTec-layout folder of symlinks: the whole train split, `per_type` seeded test images per folder."""
    (dst / "train").mkdir(parents=True, exist_ok=True)
    (dst / "train" / "good").symlink_to(src / "train" / "good", target_is_directory=True)
    rng = random.Random(seed)
    for folder in sorted(p for p in (src / "test").iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        keep = sorted(rng.sample(files, min(per_type, len(files))))
        (dst / "test" / folder.name).mkdir(parents=True)
        for f in keep:
            (dst / "test" / folder.name / f.name).symlink_to(f)
            mask = src / "ground_truth" / folder.name / f"{f.stem}_mask.png"
            if mask.is_file():
                (dst / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                (dst / "ground_truth" / folder.name / mask.name).symlink_to(mask)
    return dst


def model_latency_ms(model: torch.nn.Module, repeats: int = REPEATS) -> float:
    """Median forward time for one 256 px image (batch 1, after warm-up), in ms."""
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(WARMUP + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= WARMUP:
                times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def latency_ms(run_dir: Path) -> float:
    """model_latency_ms of a run's saved model."""
    return model_latency_ms(model_from_bundle(load_bundle(run_dir / "model.ckpt"))[0].eval())


def latency_table(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of every variant measured in one process, interleaved over rounds, so that the load of a
    shared machine hits all of them alike (the per-run latencies of the main table were taken minutes apart)."""
    from kdad.config import method_config
    from kdad.methods import get_method

    variants: dict[str, list[str]] = {"rd": ["method=rd"]}
    for k in args.shots:
        for impl in ("grid", "torchvision"):
            variants[f"bkd k={k} {impl}"] = ["method=bkd", f"model.shots={k}", f"model.dcn_impl={impl}"]
    variants["bkd k=2 ablated"] = ["method=bkd", "model.shots=2", *ABLATED]
    models = {}
    for name, sets in variants.items():
        cfg = load_config(None, [], [*sets, "model.backbone=efficientnet_lite0", "model.weights=random"])
        model = get_method(cfg.method).Model(method_config(cfg)).eval()
        if hasattr(model, "set_support"):
            model.set_support(torch.rand(model.cfg.shots, 3, IMAGE_SIZE, IMAGE_SIZE))
        models[name] = model
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.latency_rounds):
        for name, model in models.items():
            rounds[name].append(model_latency_ms(model, repeats=3))
    return {name: {"median_ms": statistics.median(v), "rounds_ms": v} for name, v in rounds.items()}


ABLATED = ("model.augment=false", "model.memory=false", "model.dcn=false")  # Table 4, first row


def run_one(method: str, shots: int | None, root: Path, category: str, args: argparse.Namespace,
            work: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train with the method's CPU preset under the shared budget, evaluate, time inference."""
    overrides = [
        f"data.root={root}", f"data.category={category}", f"data.image_size={IMAGE_SIZE}", "train.device=cpu",
        "train.progress=false", f"train.max_iters={args.iters}", f"train.batch_size={args.batch}",
        "train.epochs=1000", f"train.seed={args.seed}", "train.val_fraction=0.1", "model.backbone=efficientnet_lite0",
    ]
    if shots is not None:
        overrides.append(f"model.shots={shots}")
    preset = f"{method}_cpu"
    cfg = load_config(preset, [], overrides + list(extra))
    run_dir = work / f"{method}{shots or ''}{'_ablated' if extra else ''}_{category}"
    fit(cfg, run_dir)
    res = evaluate_run(run_dir, device="cpu", report=False)
    info, m = res["train_info"], res["metrics"]
    return {
        "method": method, "shots": shots, "category": category, "preset": preset, "overrides": list(extra),
        "i_auroc": m.get("image_auroc"), "p_auroc": m.get("pixel_auroc"), "i_f1_max": m.get("image_f1_max"),
        "p_f1_max": m.get("pixel_f1_max"), "au_pro": m.get("au_pro"),
        "train_img_per_s": info.get("train_images_per_s"), "train_seconds": info.get("train_seconds"),
        "latency_ms_b1": latency_ms(run_dir), "iters": info.get("iters"), "n_test_images": res["n_images"],
        "metrics": m,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shots", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--test-per-type", type=int, default=10)
    parser.add_argument("--subset", nargs="*", default=list(CATEGORIES))
    parser.add_argument("--no-rd", action="store_true")
    parser.add_argument("--ablate", action="store_true",
                        help="add BKD k=2 with augment, memory and DCN off (Table 4, first row)")
    parser.add_argument("--latency-only", action="store_true", help="only the interleaved latency table")
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bkd.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.latency_only:
        table = {"question": "inference latency per 256 px image, batch 1, same process, interleaved rounds",
                 "date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
                 "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), {args.threads} torch threads",
                 "teacher": "efficientnet_lite0 (random init; weights do not change the cost)",
                 "latency": latency_table(args)}
        write_json(args.out, table)
        for name, row in table["latency"].items():
            print(f"{name:24s} {row['median_ms']:.1f} ms")
        return
    out: dict[str, Any] = {
        "question": "BKD (k=2/4/8) vs RD, same CPU budget and teacher (efficientnet_lite0, 256 px)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "kdad": kdad.__version__,
        "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), "
                                                f"{args.threads} torch threads",
        "budget": {"iters": args.iters, "batch_size": args.batch, "seed": args.seed, "image_size": IMAGE_SIZE},
        "test_subset": {c: f"{args.test_per_type} seeded images per test folder" for c in args.subset},
        "protocol": "last iteration kept; 10% held-out normals give BKD's support set and the thresholds; "
                    "metrics at 256 px, AU-PRO dataset-level @0.3; latency = median of 5 batch-1 forwards "
                    "after 2 warm-ups, same threads", "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, int | None, tuple[str, ...]]] = ([] if args.no_rd else [("rd", None, ())])
    runs += [("bkd", k, ()) for k in args.shots] + ([("bkd", 2, ABLATED)] if args.ablate else [])
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories:
            root = CATEGORIES[category]
            if category in args.subset and args.test_per_type > 0:
                root = subset_root(root, Path(tmp) / "data" / category, args.test_per_type, args.seed)
            for method, shots, extra in runs:
                t0 = time.perf_counter()
                row = run_one(method, shots, root, category, args, Path(tmp), extra)
                row["wall_seconds"] = time.perf_counter() - t0
                out["runs"].append(row)
                write_json(args.out, out)
                print(f"{category:14s} {method}{shots or '':<2}{' ablated' if extra else ''} I-AUROC {row['i_auroc']:.4f} P-AUROC "
                      f"{row['p_auroc']:.4f} I-F1 {row['i_f1_max']:.4f} P-F1 {row['p_f1_max']:.4f} "
                      f"AU-PRO {row['au_pro']:.4f} {row['train_img_per_s']:.2f} img/s "
                      f"{row['latency_ms_b1']:.0f} ms/img {row['wall_seconds']:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
