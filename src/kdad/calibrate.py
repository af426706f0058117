"""`kdad calibrate`: new thresholds for an existing run from new normal images, without retraining.

A new camera, lighting or line shifts the scores of good parts; the weights stay useful but the threshold's
false-alarm guarantee (docs/operating_point.md) holds only for images exchangeable with the calibration set.
This recomputes the thresholds on a folder of new good images, writes a new model.ckpt atomically (the old
one is kept beside it) and updates the metadata JSON of an exported graph the same way.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import to_dict
from kdad.fileio import atomic_torch_save, atomic_write_text
from kdad.thresholds import calibration_record


def _keep(path: Path, stamp: str) -> Path:
    """Copy `path` to <stem>.before-calibrate-<stamp><suffix> (never overwriting one) and return the copy."""
    backup = path.with_name(f"{path.stem}.before-calibrate-{stamp}{path.suffix}")
    i = 1
    while backup.exists():
        backup = path.with_name(f"{path.stem}.before-calibrate-{stamp}-{i}{path.suffix}")
        i += 1
    shutil.copy2(path, backup)
    return backup


def calibrate_run(run: str | Path, normals: str | Path, alpha: float | None = None, device: str = "auto",
                  batch_size: int = 16, out: str | Path | None = None) -> dict[str, Any]:
    """Recalibrate `run` (a folder with model.ckpt, or a .ckpt) on the good images in `normals`.

    alpha: the false-alarm rate (switches a quantile-rule run to the conformal rule); None keeps the run's.
    out: write the new bundle there instead of replacing model.ckpt (which is then left untouched).
    Returns a summary: paths written, n, alpha, the old and new image thresholds, the warning if n is too small.
    """
    from kdad.align import AlignSpec, aligned_forward
    from kdad.data.folder import FolderDataset
    from kdad.evaluate import thresholds_from_normals
    from kdad.seed import resolve_device
    from kdad.thresholds import check_alpha
    from kdad.tiling import TileSpec

    ckpt = Path(run) / "model.ckpt" if Path(run).is_dir() else Path(run)
    bundle = load_bundle(ckpt)
    model, cfg = model_from_bundle(bundle)
    tc = cfg.train
    if alpha is not None:
        tc = dataclasses.replace(tc, alpha=check_alpha(alpha), image_threshold_rule="conformal")
    tc = dataclasses.replace(tc, eval_batch_size=batch_size)
    ds = FolderDataset(good_dir=normals, image_size=cfg.data.image_size, split="train")
    dev = resolve_device(device)
    model.to(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thr, display, scores = thresholds_from_normals(aligned_forward(model, AlignSpec.from_data(cfg.data)), ds, dev,
                                                       tc, tiles=TileSpec.from_data(cfg.data))
    notes = [str(w.message) for w in caught]
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, alpha=tc.alpha,
                                                             image_threshold_rule=tc.image_threshold_rule))
    old = dict(bundle.get("thresholds") or {})
    entry = {"time": stamp, "normals": str(normals), "n": int(len(scores)), "alpha": thr.alpha,
             "image_threshold": thr.image, "previous_image_threshold": old.get("image"), "warnings": notes}
    if bundle.get("gate") is not None:  # the invalid-input gate keeps its features' mean and covariance
        entry["gate_threshold"], entry["previous_gate_threshold"] = _recalibrate_gate(bundle, model, ds, dev,
                                                                                      batch_size, normals)
    new = {**bundle, "config": to_dict(cfg), "thresholds": thr.to_metadata(), "display": display,
           "calibration": calibration_record(scores, f"kdad calibrate {normals}"),
           "calibration_history": [*bundle.get("calibration_history", []), entry]}
    target = Path(out) if out else ckpt
    kept = None if out else _keep(ckpt, stamp)
    atomic_torch_save(new, target)
    summary = {**entry, "checkpoint": str(target), "kept": None if kept is None else str(kept),
               "guarantee": thr.guarantee, "onnx_metadata": None}
    summary["onnx_metadata"] = _update_onnx_metadata(ckpt, target, new, stamp) if not out else None
    return summary


def _recalibrate_gate(bundle: dict[str, Any], model: Any, ds: Any, device: Any, batch_size: int,
                      normals: str | Path) -> tuple[float, float]:
    """Re-threshold the bundle's gate (in place) on the new normals' gate scores: the conformal threshold at the
    gate's alpha times its margin. The mean and covariance of the training normals are kept (the new normals are
    the calibration set, not the fit set). Returns (new, old) thresholds."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from kdad.gate import Gate
    from kdad.thresholds import conformal_threshold

    gate = Gate.from_bundle(bundle["gate"])
    module = gate.module(model).to(device).eval()
    with torch.inference_mode():
        scores = np.concatenate([module(b["image"].to(device)).cpu().numpy()
                                 for b in DataLoader(ds, batch_size=batch_size, shuffle=False)]).astype(np.float64)
    conf = conformal_threshold(scores, gate.alpha)
    new = dataclasses.replace(gate, threshold=conf.threshold * gate.margin, n_calibration=len(scores),
                              scores=tuple(float(v) for v in np.sort(scores)),
                              source=f"{gate.source.split(';')[0]}; threshold from kdad calibrate {normals}")
    bundle["gate"] = new.to_bundle()
    return new.threshold, gate.threshold


def _update_onnx_metadata(ckpt: Path, target: Path, bundle: dict[str, Any], stamp: str) -> str | None:
    """Rewrite the thresholds of the graph exported from `ckpt` (RUN/model.onnx's JSON), keeping the old JSON."""
    from kdad.export import default_onnx_path, metadata_path, read_metadata, sha256_file, threshold_metadata

    graph = default_onnx_path(ckpt.parent if ckpt.name == "model.ckpt" else ckpt)
    if not metadata_path(graph).is_file():
        return None
    meta = read_metadata(graph)
    _keep(metadata_path(graph), stamp)
    if bundle.get("gate") is not None and meta.get("gate") is not None:
        from kdad.gate import Gate

        meta["gate"] = {**meta["gate"], **Gate.from_bundle(bundle["gate"]).metadata()}
    meta.update(thresholds=threshold_metadata(bundle["thresholds"]), display=bundle["display"],
                calibration=bundle["calibration"], calibration_history=bundle["calibration_history"])
    meta["source_checkpoint"] = {"path": str(target), "sha256": sha256_file(target)}  # same weights, new thresholds
    atomic_write_text(metadata_path(graph), json.dumps(meta, indent=2) + "\n")
    return str(metadata_path(graph))


def describe(summary: dict[str, Any]) -> str:
    """The summary `kdad calibrate` prints."""
    lines = [f"calibrated on {summary['n']} good images from {summary['normals']}: image threshold "
             f"{summary['previous_image_threshold']} -> {summary['image_threshold']:.6g}",
             f"guarantee: {summary['guarantee'] or 'none (quantile rule)'}",
             f"wrote {summary['checkpoint']}" + (f" (previous kept as {summary['kept']})" if summary["kept"] else "")]
    if summary["onnx_metadata"]:
        lines.append(f"updated {summary['onnx_metadata']} (previous kept beside it)")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)



