"""`kdad predict`: stream images through a runner and write scores, decisions, overlays and masks.

Under torchrun each rank predicts every WORLD_SIZE-th input (rank r: inputs r, r + N, ...) on its own device
(cuda:LOCAL_RANK on GPUs) and writes its overlays and masks; rank 0 gathers the rows and writes the one table,
in input order, as a single process would.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdad import distributed as dist_utils
from kdad.data.transforms import pixel_cap
from kdad.deploy.batch import Row, common_base, expand_inputs, out_name, out_stems, stream_predictions, write_table
from kdad.deploy.postprocess import post_of
from kdad.deploy.runner import make_runner
from kdad.errors import KdadError
from kdad.fileio import atomic_write_bytes
from kdad.seed import resolve_device
from kdad.visualize import png_bytes


def _write_image(path: Path, rgb: np.ndarray) -> None:
    try:
        atomic_write_bytes(path, png_bytes(rgb))
    except OSError as e:
        raise KdadError(f"cannot write {path}: {e}") from e


def run_predict(run: str | Path, inputs: Sequence[str], out: str | Path, backend: str | None = None,
                device: str = "auto", threshold: float | None = None, batch_size: int = 16, workers: int = 0,
                overlays: bool = False, masks: bool = False, progress: bool = True,
                max_megapixels: float | None = None, **runner_options: Any) -> list[Row]:
    """Predict every input; rows go to predictions.csv/json in `out`, images to overlays/ and masks/.

    runner_options: make_runner's precision, compile, cuda_graph. The table is written even when a later image
    or write fails, so scores already computed are kept.
    """
    rank, local_rank, world_size = dist_utils.world()
    if world_size > 1:
        dev = resolve_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
            device = str(dev)
        dist_utils.init(dev)
    runner = make_runner(run, backend, device, threshold, **runner_options)
    post = post_of(runner)
    paths = expand_inputs(inputs)
    mine = paths[rank::world_size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if masks and post.pixel_threshold is None and rank == 0:
        print("note: the model has no pixel threshold, so no masks are written", file=sys.stderr)
    base = common_base(paths)
    stems = out_stems(paths, base) if overlays or masks else {}
    renamed = [p for p, stem in stems.items() if stem != out_name(p, "", base)]
    if renamed and rank == 0:
        print(f"note: {len(renamed)} input(s) flatten to an output name already taken (e.g. {renamed[0]} -> "
              f"{stems[renamed[0]]}_overlay.png); they get a ~N suffix", file=sys.stderr)
    rows: list[Row] = []
    cap = pixel_cap(max_megapixels)  # a bad value fails before any image is read
    stream = stream_predictions(runner, mine, runner.image_size, batch_size, workers,
                                progress=progress and rank == 0, max_megapixels=cap)
    try:
        for row, amap, image in stream:
            rows.append(row)
            if amap is None or image is None:
                continue
            if overlays:
                _write_image(out / "overlays" / f"{stems[row.path]}_overlay.png", post.overlay(image, amap))
            keep = post.mask(amap) if masks else None
            if keep is not None:
                _write_image(out / "masks" / f"{stems[row.path]}_mask.png", (keep * 255).astype(np.uint8))
    except BaseException:
        part = out if world_size == 1 else out / f"rank{rank}"  # ranks must not overwrite each other's table
        part.mkdir(parents=True, exist_ok=True)
        write_table(rows, part)
        print(f"kdad predict: stopped after {len(rows)} of {len(mine)} images; their results are in "
              f"{part / 'predictions.csv'}", file=sys.stderr)
        raise
    if world_size > 1:
        shards = dist_utils.gather_objects(rows)
        if shards is None:  # not rank 0: rank 0 writes the table
            return rows
        rows = [shards[i % world_size][i // world_size] for i in range(len(paths))]
    write_table(rows, out)
    n_bad = sum(1 for r in rows if r.error)
    n_anom = sum(1 for r in rows if r.decision == 1)
    n_invalid = sum(1 for r in rows if r.label == "invalid")
    print(f"{len(rows)} images, {n_anom} anomalous at threshold {post.image_threshold}, {n_invalid} invalid "
          f"(not a picture of the trained product), {n_bad} unreadable; "
          f"wrote {out / 'predictions.csv'}")
    return rows
