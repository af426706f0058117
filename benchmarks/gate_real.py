"""The invalid-input gate on real data (issue 21.3): how many test normals and test defects of the trained product
are wrongly called `invalid`, and how many images that are not the product are caught.

The gate looks only at the frozen teacher, so a short fit (train.max_iters) gives the same gate as a long one.

    OMP_NUM_THREADS=1 taskset -c 1 env PYTHONPATH=src python benchmarks/gate_real.py \
        --out benchmarks/results/gate_real.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdad.config import load_config
from kdad.data.demo import make_demo_dataset
from kdad.data.transforms import load_image
from kdad.deploy.runner import TorchRunner
from kdad.train import fit

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp")


def images(folder: Path, limit: int | None = None) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and "ground_truth" not in p.parts
                   and not p.stem.endswith("_mask"))
    if limit is not None and len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]
    return paths


def share_invalid(runner: TorchRunner, images01: torch.Tensor) -> dict[str, object]:
    """Verdicts on images (B, 3, S, S) in [0, 1], 32 at a time: the share called invalid, the reasons' kinds
    and the gate scores' spread (to read off what another gate_margin would do)."""
    gates = np.concatenate([runner.gate_scores(images01[i:i + 32]) for i in range(0, len(images01), 32)])
    reasons = [runner.post.invalid_reason(float(g), x.permute(1, 2, 0).numpy()) for g, x in zip(gates, images01)]
    kinds: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            k = r.split(":")[0]
            kinds[k] = kinds.get(k, 0) + 1
    return {"n": len(reasons), "invalid": sum(r is not None for r in reasons),
            "share_invalid": float(np.mean([r is not None for r in reasons])), "reasons": kinds,
            "gate_score_min": float(gates.min()), "gate_score_median": float(np.median(gates)),
            "gate_score_max": float(gates.max())}


def load(paths: list[Path], size: int) -> torch.Tensor:
    return torch.stack([load_image(p, size) for p in paths])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kdad_gate_real")
    ap.add_argument("--out", default="benchmarks/results/gate_real.json")
    ap.add_argument("--limit", type=int, default=60, help="images per foreign set (magnetic tile, DTD)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    bottle = SHARED / "mvtec_ad" / "bottle"
    t0 = time.perf_counter()
    over = [f"data.root={bottle}", "train.progress=false", "train.max_iters=2"]  # the gate needs no training
    run = fit(load_config("rd_cpu", [], over), work / "bottle")
    runner = TorchRunner(run, device="cpu")
    size = runner.image_size
    gate = runner.bundle["gate"]
    res: dict[str, object] = {"command": "python " + " ".join(sys.argv), "preset": "rd_cpu", "overrides": over,
                              "gate": {k: v for k, v in gate.items() if k not in ("mean", "precision", "scores")}}
    test = bottle / "test"
    good = images(test / "good")
    defects = [p for d in sorted(test.iterdir()) if d.name != "good" for p in images(d)]
    sets = {
        "bottle_test_good": load(good, size),
        "bottle_test_defects": load(defects, size),
        "magnetic_tile": load(images(SHARED / "mtd" / "magnetic_tile", args.limit), size),
        "dtd": load(images(SHARED / "dtd" / "images", args.limit), size),
    }
    g = torch.Generator().manual_seed(0)
    n = 20
    sets["black"] = torch.zeros(n, 3, size, size)
    sets["white"] = torch.ones(n, 3, size, size)
    sets["overexposed_bottle"] = (sets["bottle_test_good"][:n] * 4.0).clamp(0, 1)
    sets["uniform_noise"] = torch.rand(n, 3, size, size, generator=g)
    sets["gaussian_noise_on_bottle"] = (sets["bottle_test_good"][:n] + 0.3 * torch.randn(n, 3, size, size,
                                                                                           generator=g)).clamp(0, 1)
    sets["bottle_rotated_90"] = torch.rot90(sets["bottle_test_good"][:n], 1, dims=(2, 3))
    crop = torch.nn.functional.interpolate(sets["bottle_test_good"][:n, :, size // 4: 3 * size // 4,
                                                                    size // 4: 3 * size // 4], size=(size, size),
                                           mode="bilinear", align_corners=False)
    sets["bottle_center_crop_2x"] = crop
    sets["bottle_grayscale"] = sets["bottle_test_good"][:n].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1).clone()
    out: dict[str, object] = {}
    for name, x in sets.items():
        out[name] = share_invalid(runner, x)
        print(name, out[name], flush=True)
    res["bottle_model"] = out
    # the demo model (synthetic parts) on real bottle photos
    demo = make_demo_dataset(work / "demo_data", kind="object", seed=0)
    drun = fit(load_config("rd_demo", [], [f"data.root={demo}", "train.progress=false", "train.max_iters=2"]),
               work / "demo")
    druner = TorchRunner(drun, device="cpu")
    res["demo_model"] = {"bottle_test_good": share_invalid(druner, load(good, druner.image_size)),
                         "demo_test_images": share_invalid(druner, load(images(demo / "test")[:40],
                                                                        druner.image_size))}
    print("demo", res["demo_model"], flush=True)
    res["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
