"""Quality study cells through the real engine: `fit` with a preset (+ overrides), then metrics on the selection
and report halves of the test split (benchmarks/_common.py). Appends one row per (cell, category, seed)
to the --out JSON file after every run, so an interrupted study keeps what it finished; benchmarks/quality_merge.py
then adds those rows to the committed study (quality.json and its continuations, each under 1 MB).

Run: python benchmarks/quality.py --cell stfpm_cpu --categories magnetic_tile bottle --seeds 0 1 2 --out F [--threads 1]
     python benchmarks/quality.py --cell stfpm_cpu_old=stfpm_cpu:model.pool=1,model.layers=[1,2,3] --out F
A cell is NAME=PRESET[:key=value,...] or just a preset name. Train minutes are wall time of fit's training loop
on this machine; the JSON records the thread count, the CPU flags that matter and the 1-min load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import _common as quality_split  # the split logic and data paths live in _common
import numpy as np
import torch

from kdad.align import AlignSpec, aligned_forward
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.data.factory import build_dataset
from kdad.deploy.postprocess import PostProcess
from kdad.evaluate import (
    Predictions,
    compute_metrics,
    false_alarms,
    good_images_flagged,
    invalid_decisions,
    predict,
)
from kdad.gate import Gate
from kdad.prediction_metrics import metrics_by_defect_type, select
from kdad.speed import cpu_has_fast_bf16
from kdad.thresholds import clopper_pearson, conformal_threshold
from kdad.tiling import TileSpec, tiled_dataset
from kdad.train import fit

KEYS = ("image_auroc", "pixel_auroc", "au_pro")


def parse_cell(text: str) -> tuple[str, str, list[str]]:
    """NAME=PRESET:k=v,k=v -> (name, preset, overrides); commas inside [...] stay with their value."""
    name, _, rest = text.partition("=") if "=" in text.split(":")[0] else (text, "", text)
    preset, _, tail = rest.partition(":")
    overrides, depth, cur = [], 0, ""
    for ch in tail:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            overrides.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        overrides.append(cur)
    return name, preset, overrides


def cell_config(preset: str, overrides: list[str], category: str, seed: int) -> Any:
    """The RunConfig a study cell trains: the preset on the category's data, the seed, the cell's overrides."""
    return load_config(preset, [], [f"data.root={quality_split.CATEGORIES[category]}", f"train.seed={seed}",
                                    "train.progress=false", f"data.texture_dir={quality_split.TEXTURES}", *overrides])


def add_cell_args(ap: argparse.ArgumentParser) -> None:
    """The options of a script that studies one fitted cell: --cell --category --seed --run --out."""
    ap.add_argument("--cell", required=True, help="NAME=PRESET:k=v,... (this module's cell syntax)")
    ap.add_argument("--category", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", required=True, help="the run folder: fitted here unless it holds model.ckpt")
    ap.add_argument("--out", required=True, help="results JSON; the run appends to it")


def fitted_cell(args: argparse.Namespace) -> tuple[str, str, list[str], torch.nn.Module, Any]:
    """(name, preset, overrides, model in eval mode, its config) of --cell, fitted into --run unless it holds
    model.ckpt already (the model is then reused, not retrained)."""
    name, preset, overrides = parse_cell(args.cell)
    run = Path(args.run)
    if not (run / "model.ckpt").is_file():
        fit(cell_config(preset, overrides, args.category, args.seed), run)
    model, cfg = model_from_bundle(load_bundle(run / "model.ckpt"))
    return name, preset, overrides, model.eval(), cfg


def fitted_aligned_cell(args: argparse.Namespace) -> tuple[str, str, list[str], torch.nn.Module, Any, AlignSpec]:
    """:func:`fitted_cell` plus the model's AlignSpec, for checks of aligned models; exits naming --run when the
    model is not aligned."""
    name, preset, overrides, model, cfg = fitted_cell(args)
    spec = AlignSpec.from_data(cfg.data)
    if spec is None:
        raise SystemExit(f"{args.run}: data.align={cfg.data.align}; this check is for aligned models")
    return name, preset, overrides, model, cfg, spec


def run_cell(name: str, preset: str, overrides: list[str], category: str, seed: int, work: Path) -> dict[str, Any]:
    run = fit(cell_config(preset, overrides, category, seed), work / f"{name}_{category}_{seed}")
    return cell_row(name, preset, overrides, category, seed, run)


def cell_row(name: str, preset: str, overrides: list[str], category: str, seed: int, run: Path) -> dict[str, Any]:
    """The study's row for the fitted run folder `run` of a cell: metrics on both halves, by defect type, the
    operating point."""
    bundle = load_bundle(run / "model.ckpt")
    model, cfg = model_from_bundle(bundle)
    test = tiled_dataset(build_dataset(cfg.data, "test"), cfg.data)  # full-size images when data.tiling is on
    pred = predict(aligned_forward(model, AlignSpec.from_data(cfg.data)), test, torch.device("cpu"),
                   cfg.train.eval_batch_size, tiles=TileSpec.from_data(cfg.data))
    sel, rep = quality_split.halves(test)
    info = bundle.get("train_info", {})
    row: dict[str, Any] = {"cell": name, "preset": preset, "overrides": overrides, "category": category,
                           "seed": seed, "train_minutes": info.get("train_seconds", float("nan")) / 60,
                           "train_img_per_s": info.get("train_images_per_s"),
                           "load_avg_1min": os.getloadavg()[0]}
    parts = (("selection", sel), ("report", rep), ("all", list(range(len(test)))))
    for half, idx in parts:
        m = compute_metrics(select(pred, idx))
        row[half] = {k: m[k] for k in KEYS}
    native = native_view(pred, cfg)
    if native is not None:  # pixel metrics at the images' own size, comparable between resized and tiled runs
        row["native"] = {half: {k: compute_metrics(select(native, idx))[k] for k in KEYS} for half, idx in parts}
    row["report_by_type"] = metrics_by_defect_type(select(pred, rep))  # which defects it finds, which it misses
    row["good_images_flagged"] = good_images_flagged(select(pred, rep), bundle.get("thresholds") or {})
    row["operating_point"] = operating_point(bundle, model, pred, test)
    return row


def native_view(pred: Predictions, cfg: Any) -> Predictions | None:
    """The predictions against masks at the images' native size; None when the maps already have it or the
    test images differ in size.

    A resized run's masks are downsampled with the images, and thin defects drop out of them; a tiled run is
    scored at native size. Upsampling the resized run's maps (bilinear) to the native masks puts both on one
    footing. The image scores are unchanged."""
    assert pred.maps is not None
    full = dataclasses.replace(cfg.data, tiling=True, tile_overlap=0.0, tile_resolution=0, tile_metric_size=0)
    ds = tiled_dataset(build_dataset(full, "test"), full)
    sizes = {ds.hw(i) for i in range(len(pred.paths))}  # from the file headers: nothing decoded yet
    if len(sizes) != 1 or sizes == {tuple(pred.maps.shape[1:])}:
        return None  # images of several sizes (MTD): no one native grid; or the maps are native already
    items = [ds[i] for i in range(len(pred.paths))]
    if [str(it["path"]) for it in items] != [str(p) for p in pred.paths]:
        raise RuntimeError("native_view: the native test set is not in the order of the predictions")
    masks = [it["mask"][0].numpy() > 0.5 for it in items]
    maps = torch.nn.functional.interpolate(torch.from_numpy(pred.maps)[:, None], size=masks[0].shape,
                                           mode="bilinear", align_corners=False)[:, 0].numpy()
    return dataclasses.replace(pred, maps=maps, masks=np.stack(masks))


ALPHAS = (0.01, 0.05, 0.10)


def operating_point(bundle: dict[str, Any], model: torch.nn.Module, pred: Predictions, test: Any) -> dict[str, Any]:
    """Issue 21.6, on ALL test images (no choice is made on them): for each alpha the conformal threshold from the
    run's calibration scores, the false-alarm rate seen on the test normals (exact 95 % interval) and the share
    of test defects caught; the stored threshold's own false alarms; the gate's invalid shares."""
    cal = (bundle.get("calibration") or {}).get("scores") or []
    good, bad = pred.scores[pred.labels == 0], pred.scores[pred.labels == 1]
    sweep = []
    for alpha in ALPHAS:
        c = conformal_threshold(cal, alpha)
        k = int((good >= c.threshold).sum())
        sweep.append({"alpha": alpha, "n_calibration": c.n, "rank": c.rank, "enough": c.enough,
                      "false_alarms": k, "n_good": int(len(good)), "rate": k / len(good),
                      "ci95": list(clopper_pearson(k, len(good))),
                      "detected": float((bad >= c.threshold).mean()) if len(bad) else None})
    thr = bundle.get("thresholds") or {}
    out: dict[str, Any] = {"sweep": sweep, "stored": false_alarms(pred, thr)}
    if bundle.get("gate") is not None:
        gate = Gate.from_bundle(bundle["gate"]).module(model).eval()
        out["invalid"] = invalid_decisions(PostProcess.from_thresholds(thr, gate=bundle["gate"]),
                                           lambda x: gate(x.float()), test)
    return out


def append_row(out: Path, row: dict[str, Any], empty: dict[str, Any]) -> None:
    """Add `row` to the results file `out` (`empty` when there is none yet), re-read first because other processes
    may append to it, and written atomically."""
    doc = json.loads(out.read_text()) if out.is_file() else empty
    doc["runs"].append(row)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(quality_split.dumps_rows(doc))
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", action="append", required=True)
    ap.add_argument("--categories", nargs="+", default=["magnetic_tile", "bottle"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="results file; benchmarks/quality_merge.py adds it to the study")
    ap.add_argument("--keep", help="keep the run folders (NAME_CATEGORY_SEED, with model.ckpt) under this folder, "
                    "for scripts that read a fitted model with --run; default: a temporary folder, removed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    doc: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {
        "question": "which CPU recipe finds the defects: each cell through fit, metrics on the selection and "
                    "report halves of the test split (quality_split.SPLIT_SEED), several seeds",
        "split_seed": quality_split.SPLIT_SEED, "runs": []}
    meta = quality_split.metadata(threads=args.threads, cpu_fast_bf16=cpu_has_fast_bf16())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        for text in args.cell:
            name, preset, overrides = parse_cell(text)
            for cat in args.categories:
                for seed in args.seeds:
                    row = {**run_cell(name, preset, overrides, cat, seed, work), **meta}
                    print(json.dumps({k: row[k] for k in ("cell", "category", "seed", "train_minutes", "selection",
                                                          "report")}), flush=True)
                    append_row(out, row, doc)


if __name__ == "__main__":
    main()
