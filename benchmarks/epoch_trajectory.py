"""How a cell's model changes along its schedule: one seed trained in stages (fit, then `--resume` with more epochs,
which continues the run bit-identically), the study's row (benchmarks/quality.py) after each stage. The last stage
equals an uninterrupted run of that many epochs, so the trajectory ends on the study's own number.

Asked for `snl_cpu` (docs/quality.md, "Session 37"): its seed 0 on two threads trains to a far weaker model than on
one thread; does it fall late in the schedule (then fewer epochs would steady it) or early? Only for constant-rate
cells: `snl_cpu` decays its rate since session 38 (`train.lr_decay_from`), so session 37's cell now needs
`train.lr_decay_from=1`.

Run: python benchmarks/epoch_trajectory.py --cell snl_cpu_2t=snl_cpu:train.lr_decay_from=1 --category magnetic_tile --seed 0
         --epochs 20 40 60 80 100 --run /tmp/x --out F [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common
import torch
from quality import cell_config, cell_row, parse_cell

from kdad.train import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", required=True, help="NAME=PRESET:k=v,... (quality.py's cell syntax)")
    ap.add_argument("--category", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, nargs="+", required=True, help="the stages, increasing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", required=True, help="the run folder (resumed from stage to stage)")
    ap.add_argument("--out", required=True, help="results JSON; each stage appends a row")
    args = ap.parse_args()
    if args.epochs != sorted(set(args.epochs)):
        raise SystemExit(f"--epochs {args.epochs}: give increasing stages")
    torch.set_num_threads(args.threads)
    name, preset, overrides = parse_cell(args.cell)
    decay = cell_config(preset, overrides, args.category, args.seed).train.lr_decay_from
    if decay < 1.0:  # the decay sits at a fraction of each stage's epochs, so a stage is no uninterrupted run
        raise SystemExit(f"--cell {args.cell}: train.lr_decay_from={decay} moves with train.epochs; add "
                         "train.lr_decay_from=1 to the cell (a constant-rate trajectory)")
    run = Path(args.run)
    for i, epochs in enumerate(args.epochs):
        over = [*overrides, f"train.epochs={epochs}"]
        fit(cell_config(preset, over, args.category, args.seed), run, resume=i > 0)
        row = cell_row(name, preset, overrides, args.category, args.seed, run) | {"epochs": epochs}
        print({"epochs": epochs, **{h: round(row[h]["image_auroc"], 4) for h in ("selection", "report")}}, flush=True)
        _common.append_run(args.out, "a cell's model along its schedule: the study's row after each stage of one "
                           "seed's training (resumed bit-identically from stage to stage)",
                           {**row, **_common.metadata(threads=args.threads)})  # flat, as quality.py's rows


if __name__ == "__main__":
    main()
