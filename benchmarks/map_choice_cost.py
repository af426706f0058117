"""What ``model.map_norm_shrink: auto`` adds to fit: one calibration with the choice against one without, on the
held-out normals of a kept run, timed in one process (docs/quality.md, "Session 43"). fit calibrates three times
(twice for the cross-fitted thresholds, on half the normals each, and once on all of them).

Run: python benchmarks/map_choice_cost.py --run RUN [--repeats 2] --out F
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import _common
import torch
from torch.utils.data import DataLoader

from kdad.blocks.maps import calibrate_position_norm
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.train import train_val_datasets

QUESTION = "what model.map_norm_shrink: auto adds to a calibration (docs/quality.md, \"Session 43\")"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a kept run of an RD cell with map_norm position (model.ckpt)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = model_from_bundle(load_bundle(Path(args.run) / "model.ckpt"))
    _, val_ds, _ = train_val_datasets(cfg)
    loader = DataLoader(val_ds, batch_size=cfg.train.eval_batch_size, shuffle=False)
    seconds: dict[str, list[float]] = {"plain": [], "auto": []}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both
        for name, shrink in (("plain", 0.0), ("auto", "auto")):
            model.cfg = dataclasses.replace(model.cfg, map_norm_shrink=shrink)
            model.__dict__.pop("map_norm_choice", None)  # a calibration keeps an earlier choice: choose each time
            t = time.perf_counter()
            calibrate_position_norm(model, loader, torch.device("cpu"))
            seconds[name].append(time.perf_counter() - t)
    row = {"run": args.run, "held_out": len(val_ds), "seconds": seconds,  # type: ignore[arg-type]
           "choice": getattr(model, "map_norm_choice", None), **_common.metadata(threads=args.threads)}
    print(json.dumps({k: [round(x, 1) for x in v] for k, v in seconds.items()}), flush=True)
    _common.append_run(args.out, QUESTION, row)


if __name__ == "__main__":
    main()
