"""Do the training speed levers change what RD learns? Paired runs over seeds, levers on vs off.

channels_last and the fused optimizer compute the same math with different rounding (tests/test_speed.py
checks loss and gradients); over a short training run rounding differences can send a run elsewhere. This
trains RD (EfficientNet-Lite0, 256 px, rd_family.py's small CPU budget: 40 steps of 8 images) on each
category with the levers off and on, for several seeds, and reports the paired metric differences.
(The heap allocator changes where memory comes from, not any value, so it is on in both arms.)

Run:  python benchmarks/levers_seeds.py [--seeds 111 112 113 114 115]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, metadata, run_one, write_json

KEYS = ("image_auroc", "pixel_auroc", "au_pro")


def run(category: str, seed: int, levers: bool, args: argparse.Namespace) -> dict[str, float]:
    flag = str(levers).lower()
    budget = argparse.Namespace(iters=args.iters, batch=args.batch, seed=seed, device="cpu", max_seconds=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        row = run_one("rd", category, budget, Path(tmp),
                      (f"train.channels_last={flag}", f"train.fused_optimizer={flag}"))
    return {k: float(row["metrics"][k]) for k in KEYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[111, 112, 113, 114, 115])
    p.add_argument("--categories", nargs="+", default=["bottle", "magnetic_tile"])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS / "levers_seeds.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    result: dict[str, Any] = {"meta": metadata(
        question="do channels_last + fused optimizer change RD's metrics beyond seed-to-seed variation?",
        budget=f"{args.iters} steps x {args.batch} images, efficientnet_lite0, 256 px, CPU",
        protocol="rd_family.py's: last step kept, thresholds from 10% held-out normals"), "categories": {}}
    for cat in args.categories:
        runs = []
        for seed in args.seeds:
            off, on = run(cat, seed, False, args), run(cat, seed, True, args)
            runs.append({"seed": seed, "off": off, "on": on})
            print(cat, seed, {k: (round(off[k], 4), round(on[k], 4)) for k in KEYS}, flush=True)
        summary = {}
        for k in KEYS:
            diffs = [r["on"][k] - r["off"][k] for r in runs]
            summary[k] = {"mean_off": statistics.mean(r["off"][k] for r in runs),
                          "mean_on": statistics.mean(r["on"][k] for r in runs),
                          "mean_paired_diff": statistics.mean(diffs),
                          "sd_paired_diff": statistics.stdev(diffs) if len(diffs) > 1 else None,
                          "sd_over_seeds_off": statistics.stdev(r["off"][k] for r in runs) if len(runs) > 1 else None,
                          "on_higher_lower_tied": [sum(x > 0 for x in diffs), sum(x < 0 for x in diffs),
                                                   sum(x == 0 for x in diffs)]}
        result["categories"][cat] = {"runs": runs, "summary": summary}
        write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
