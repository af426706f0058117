"""A kept study run read out under another map normalisation, without retraining (docs/quality.md, "Session 41").

`model.map_norm` acts after training: fit trains the same weights whatever it says (the model's init, the split
and the loss do not read it; checked in session 41 by two one-epoch fits whose last.ckpt weights were equal), and
then calibrates the map statistics and the thresholds on the held-out normals. So a finished run of a cell can be
re-read with another `map_norm`: its folder is copied without model.ckpt, the stored config of last.ckpt (all
epochs done) gets the new value, and fit resumes from it under the new config, which trains no epoch and only
calibrates. The row is the study's (quality.cell_row) for the new cell name; its training minutes are the source
run's, and `renormed_from` names that run.

Run: python benchmarks/renorm_cell.py --from RUN --cell NAME=PRESET:k=v,... --category C --seed S --work DIR --out F
(the cell must be the source run's with only model.map_norm, map_norm_shrink or map_norm_floor changed;
the rows append to F)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import _common as quality_split
import torch
from quality import append_row, cell_config, cell_row, parse_cell

from kdad.speed import cpu_has_fast_bf16
from kdad.train import fit

# what acts after training only (kdad.blocks.maps.calibrate_position_norm)
RENORM_KEYS = ("map_norm", "map_norm_shrink", "map_norm_floor")


def renorm(source: Path, cell: str, category: str, seed: int, work: Path) -> dict[str, Any]:
    """The study row of `cell` (the source run's cell with another model.map_norm) from `source`'s weights."""
    name, preset, overrides = parse_cell(cell)
    cfg = cell_config(preset, overrides, category, seed)
    ck = torch.load(source / "last.ckpt", map_location="cpu", weights_only=False)
    run = work / f"{name}_{category}_{seed}"
    if run.exists():
        raise SystemExit(f"{run} exists; remove it or choose another --work")
    run.mkdir(parents=True)
    for f in ("config.yaml", "train_log.jsonl", "train_info.json"):
        if (source / f).is_file():
            shutil.copy2(source / f, run / f)
    for key in RENORM_KEYS:  # fit's resume check refuses any other change
        if key in cfg.model:
            ck["config"]["model"][key] = cfg.model[key]
        else:
            ck["config"]["model"].pop(key, None)
    # training leaves every PositionNorm empty (fit calibrates after it); dropped, they load as the identity under
    # map_norm position and need no module under none
    ck["model"] = {k: v for k, v in ck["model"].items() if not (k.endswith("norm.mean") and v.numel() == 0)}
    torch.save(ck, run / "last.ckpt")
    fit(cfg, run, resume=True)
    row = cell_row(name, preset, overrides, category, seed, run)
    info = json.loads((source / "train_info.json").read_text())
    row["train_minutes"] = info["train_seconds"] / 60  # the source's training: no epoch ran here
    row["train_img_per_s"] = info.get("train_images_per_s")
    row["renormed_from"] = str(source)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="source", required=True, help="a finished run folder of the study (last.ckpt)")
    ap.add_argument("--cell", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--work", required=True, help="the new run folder goes under this folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    row = {**renorm(Path(args.source), args.cell, args.category, args.seed, Path(args.work)),
           **quality_split.metadata(threads=args.threads, cpu_fast_bf16=cpu_has_fast_bf16())}
    print(json.dumps({k: row[k] for k in ("cell", "category", "seed", "selection", "report")}), flush=True)
    append_row(Path(args.out), row, {
        "question": "which CPU recipe finds the defects (rows re-read from kept runs under another map_norm)",
        "split_seed": quality_split.SPLIT_SEED, "runs": []})


if __name__ == "__main__":
    main()
