"""RD (EfficientNet-Lite0 teacher, 256 px) on MVTec AD bottle under a CPU budget.

Writes benchmarks/results/rd_bottle.json: I-AUROC, P-AUROC, AU-PRO (official), train img/s, test img/s and
peak RSS. Run: python benchmarks/rd_bottle.py [--epochs 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from _common import write_json

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.data.mvtec import MVTecDataset
from kdad.evaluate import compute_metrics, predict
from kdad.train import fit

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpu-bf16", action="store_true", help="train with bf16 autocast on CPU (train.cpu_bf16)")
    ap.add_argument("--no-levers", action="store_true",
                    help="train without channels_last, the fused optimizer and the heap allocator (train.*)")
    ap.add_argument("--out", default=str(HERE / "results" / "rd_bottle.json"))
    args = ap.parse_args()
    root = SHARED / "data" / "mvtec_ad" / "bottle"
    # the constant learning rate and ReLU readout its results were measured with (rd_cpu changed them in sessions 39-40)
    cfg = load_config("rd_cpu", [], [f"data.root={root}", f"train.epochs={args.epochs}", "train.lr_decay_from=1",
                                      "model.readout=relu",
                                      f"train.device={args.device}", "train.progress=false",
                                      f"train.cpu_bf16={str(args.cpu_bf16).lower()}",
                                      f"train.channels_last={str(not args.no_levers).lower()}",
                                      f"train.fused_optimizer={str(not args.no_levers).lower()}",
                                      f"train.heap_allocator={str(not args.no_levers).lower()}"])
    with tempfile.TemporaryDirectory() as tmp:
        run = fit(cfg, Path(tmp) / "run")
        bundle = load_bundle(run)
        model, _ = model_from_bundle(bundle)
        dev = torch.device(args.device)
        model.to(dev)
        ds = MVTecDataset(root, "test", 256)
        predict(model, torch.utils.data.Subset(ds, range(8)), dev, 16)  # warm-up
        t0 = time.perf_counter()
        pred = predict(model, ds, dev, 16)
        test_s = time.perf_counter() - t0
        metrics = compute_metrics(pred)
    info = bundle["train_info"]
    result = {
        "method": "rd", "teacher": "efficientnet_lite0", "image_size": 256, "category": "bottle",
        "epochs": args.epochs, "train_cpu_bf16": args.cpu_bf16, "eval": "exact fp32 forward", "batch_size": cfg.train.batch_size, "device": args.device,
        "metrics": {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "au_pro", "image_ap", "pixel_ap")},
        "train_levers": {k: info.get(k) for k in ("channels_last", "fused_optimizers", "compiled_modules", "heap_allocator")},
        "train_images_per_s": info["train_images_per_s"], "train_seconds": info["train_seconds"],
        "test_images_per_s_incl_loading": len(pred.scores) / test_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "note": "last epoch kept; thresholds from 10% held-out training normals; no test-set selection",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
