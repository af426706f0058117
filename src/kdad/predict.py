"""`kdad predict`: stream images through a runner and write scores, decisions, overlays and masks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kdad.data.transforms import pixel_cap
from kdad.errors import KdadError
from kdad.fileio import atomic_write_bytes
from kdad.infer import Row, common_base, expand_inputs, out_name, out_stems, stream_predictions, write_table
from kdad.thresholds import defect_mask
from kdad.visualize import overlay, png_bytes


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The torch-backend speed options of `kdad predict/serve` (--precision, --compile, --cuda-graph)."""
    return {"precision": getattr(args, "precision", "exact"), "compile": getattr(args, "compile", False),
            "cuda_graph": getattr(args, "cuda_graph", False)}


def make_runner(model_path: str | Path, backend: str | None, device: str = "auto",
                threshold: float | None = None, precision: str = "exact", compile: bool = False,
                cuda_graph: bool = False) -> Any:
    """TorchRunner for checkpoints, OnnxRunner for .onnx graphs (or when backend='onnx').

    With backend='onnx' a run folder or checkpoint means its exported graph (RUN/model.onnx, X.onnx).
    A model trained with data.tiling comes wrapped in a kdad.tiling.TiledRunner (stitched full-size maps).
    """
    from kdad.errors import ConfigError, KdadError
    from kdad.thresholds import finite_threshold
    from kdad.tiling import tiled_runner

    finite_threshold(threshold, "--threshold")
    path = Path(model_path)
    if backend not in (None, "torch", "onnx"):
        raise KdadError(f"unknown backend {backend!r}; valid: torch, onnx")
    wanted = [flag for flag, on in (("--compile", compile), ("--cuda-graph", cuda_graph)) if on]
    if wanted and precision == "exact":
        raise ConfigError(f"{' and '.join(wanted)} need the fast path: add --precision fp32 or --precision bf16")
    if wanted and (backend == "onnx" or path.suffix == ".onnx"):
        raise ConfigError(f"{' and '.join(wanted)} apply to the torch backend only, not to ONNX graphs")
    if path.suffix == ".onnx" and backend == "torch":
        raise KdadError(f"{path} is an ONNX graph; use --backend onnx, or the run folder / .ckpt for torch")
    if backend == "onnx" or path.suffix == ".onnx":
        from kdad.export import OnnxRunner, default_onnx_path

        if path.suffix != ".onnx":
            graph = default_onnx_path(path)
            if not graph.is_file():
                raise KdadError(f"no exported graph {graph} for {path}; run `kdad export {path}` first")
            path = graph
        return tiled_runner(OnnxRunner(path, image_threshold=threshold))
    from kdad.runner import TorchRunner

    return tiled_runner(TorchRunner(path, device=device, image_threshold=threshold, precision=precision,
                                    compile=compile, cuda_graph=cuda_graph))


def _write_image(path: Path, rgb: np.ndarray) -> None:
    try:
        atomic_write_bytes(path, png_bytes(rgb))
    except OSError as e:
        raise KdadError(f"cannot write {path}: {e}") from e


def run_predict(args: argparse.Namespace) -> list[Row]:
    """Predict every input; rows go to predictions.csv/json, images to overlays/ and masks/.

    The table is written even when a later image or write fails, so scores already computed are kept.
    """
    runner = make_runner(args.run, args.backend, args.device, args.threshold, **runner_options(args))
    paths = expand_inputs(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.masks and runner.pixel_threshold is None:
        print("note: the model has no pixel threshold, so no masks are written", file=sys.stderr)
    base = common_base(paths)
    stems = out_stems(paths, base) if args.overlays or args.masks else {}
    renamed = [p for p, stem in stems.items() if stem != out_name(p, "", base)]
    if renamed:
        print(f"note: {len(renamed)} input(s) flatten to an output name already taken (e.g. {renamed[0]} -> "
              f"{stems[renamed[0]]}_overlay.png); they get a ~N suffix", file=sys.stderr)
    rows: list[Row] = []
    cap = pixel_cap(getattr(args, "max_megapixels", None))  # a bad value fails before any image is read
    stream = stream_predictions(runner, paths, runner.image_size, args.batch_size, args.workers,
                                progress=getattr(args, "progress", True), max_megapixels=cap)
    try:
        for row, amap, image in stream:
            rows.append(row)
            if amap is None or image is None:
                continue
            if args.overlays:
                _write_image(out / "overlays" / f"{stems[row.path]}_overlay.png",
                             overlay(image, amap, runner.vmin, runner.vmax))
            if args.masks and runner.pixel_threshold is not None:
                keep = defect_mask(amap, runner.pixel_threshold, getattr(runner, "pixel_min_area", 1))
                mask = (keep * 255).astype(np.uint8)
                _write_image(out / "masks" / f"{stems[row.path]}_mask.png", mask)
    except BaseException:
        write_table(rows, out)
        print(f"kdad predict: stopped after {len(rows)} of {len(paths)} images; their results are in "
              f"{out / 'predictions.csv'}", file=sys.stderr)
        raise
    write_table(rows, out)
    n_bad = sum(1 for r in rows if r.error)
    n_anom = sum(1 for r in rows if r.decision == 1)
    print(f"{len(rows)} images, {n_anom} anomalous at threshold {runner.image_threshold}, {n_bad} unreadable; "
          f"wrote {out / 'predictions.csv'}")
    return rows
