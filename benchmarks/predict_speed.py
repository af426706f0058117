"""End-to-end `kdad predict` throughput on real files: every backend and speed option, decoding included.

Trains RD (EfficientNet-Lite0, 256 px) on MVTec bottle for a few steps (speed does not depend on how well it
is trained), exports it to ONNX, then streams the 83 bottle test images through `kdad.infer.stream_predictions`
(the code behind `kdad predict`) with each runner: torch exact / fast fp32 / bf16 / bf16 + compile, and ONNX
Runtime. Each runner gets one untimed pass (warm-up, compilation), then the median of `--repeats` timed passes.
Scores of every option are compared with the exact path's.

Run:  python benchmarks/predict_speed.py [--out benchmarks/results/predict_speed_cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import CATEGORIES, RESULTS, metadata, write_json

from kdad.config import load_config
from kdad.export import export_onnx
from kdad.infer import expand_inputs, stream_predictions
from kdad.predict import make_runner
from kdad.train import fit

OPTIONS: dict[str, dict[str, Any]] = {
    "torch_exact": {"backend": "torch"},
    "torch_fp32": {"backend": "torch", "precision": "fp32"},
    "torch_bf16": {"backend": "torch", "precision": "bf16"},
    "torch_bf16_compile": {"backend": "torch", "precision": "bf16", "compile": True},
    "onnx": {"backend": "onnx"},
}


def run_pass(runner: Any, paths: list[Path], batch: int, workers: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    scores = np.array([row.score for row, _, _ in stream_predictions(runner, paths, runner.image_size, batch,
                                                                     workers, progress=False)])
    return time.perf_counter() - t0, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="decoding processes (kdad predict --workers)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--out", default=str(RESULTS / "predict_speed_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = CATEGORIES["bottle"]
    paths = expand_inputs([str(root / "test")])
    result: dict[str, Any] = {"meta": metadata(
        device=args.device, images=len(paths), batch=args.batch, workers=args.workers, repeats=args.repeats,
        model="rd, efficientnet_lite0, 256 px, 10 training steps on bottle",
        timing="wall time of stream_predictions over all images (decode + resize + model + scores), median"),
        "options": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("rd_cpu", [], [f"data.root={root}", "train.max_iters=10", "train.progress=false",
                                          f"train.device={args.device}"])
        run = fit(cfg, Path(tmp) / "run")
        export_onnx(run)  # RUN/model.onnx, which make_runner(run, "onnx") picks up
        ref: np.ndarray | None = None
        for name in args.options:
            opts = dict(OPTIONS[name])
            backend = opts.pop("backend")
            runner = make_runner(run, backend, args.device, **opts)
            t_first, scores = run_pass(runner, paths, args.batch, args.workers)
            times = [run_pass(runner, paths, args.batch, args.workers)[0] for _ in range(args.repeats)]
            ref = scores if ref is None else ref
            result["options"][name] = {
                "img_s": round(len(paths) / statistics.median(times), 2), "first_pass_s": round(t_first, 2),
                "samples_s": [round(t, 3) for t in times],
                "max_abs_score_diff_vs_exact": float(np.abs(scores - ref).max())}
            print(name, result["options"][name], flush=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
