"""`kdad predict`: stream images through a runner and write scores, decisions, overlays and masks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from kdad.checkpoint import atomic_write_bytes
from kdad.infer import Row, expand_inputs, out_name, stream_predictions, write_table
from kdad.visualize import overlay, png_bytes


def make_runner(model_path: str, backend: str | None, device: str, threshold: float | None) -> Any:
    """TorchRunner for checkpoints, OnnxRunner for .onnx graphs (or when backend='onnx')."""
    path = Path(model_path)
    if backend == "onnx" or path.suffix == ".onnx":
        from kdad.export import OnnxRunner

        return OnnxRunner(path, image_threshold=threshold)
    from kdad.runner import TorchRunner

    return TorchRunner(path, device=device, image_threshold=threshold)


def run_predict(args: argparse.Namespace) -> list[Row]:
    """Predict every input; rows go to predictions.csv/json, images to overlays/ and masks/."""
    runner = make_runner(args.run, args.backend, args.device, args.threshold)
    paths = expand_inputs(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for row, amap, image in stream_predictions(runner, paths, runner.image_size, args.batch_size, args.workers):
        rows.append(row)
        if amap is None or image is None:
            continue
        if args.overlays:
            rgb = overlay(image, amap, runner.vmin, runner.vmax)
            atomic_write_bytes(out / "overlays" / out_name(row.path, "_overlay.png"), png_bytes(rgb))
        if args.masks and runner.pixel_threshold is not None:
            mask = ((amap >= runner.pixel_threshold) * 255).astype(np.uint8)
            atomic_write_bytes(out / "masks" / out_name(row.path, "_mask.png"), png_bytes(mask))
    write_table(rows, out)
    n_bad = sum(1 for r in rows if r.error)
    n_anom = sum(1 for r in rows if r.decision == 1)
    print(f"{len(rows)} images, {n_anom} anomalous at threshold {runner.image_threshold}, {n_bad} unreadable; "
          f"wrote {out / 'predictions.csv'}")
    return rows
