"""PatchST inference throughput with and without its memory branch, in one process (docs/methods/patchst.md).

Takes trained runs (model.ckpt with a memory bank) and times forward passes of random 256 px batches, each
model as trained against a copy with the bank removed (the student alone), alternating so load drifts hit all.
Several runs (e.g. two teachers) are timed in the same process; each is keyed by its directory name.

Run: taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/patchst_memory_speed.py RUN [RUN ...] --out results/patchst_memory_speed.json
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import _common
import torch

from kdad.checkpoint import load_bundle, model_from_bundle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models: dict[str, torch.nn.Module] = {}
    banks: dict[str, dict[str, float]] = {}
    for run in args.runs:
        model, _ = model_from_bundle(load_bundle(Path(run) / "model.ckpt"))
        model.eval()
        student = copy.deepcopy(model)
        student.bank = torch.zeros(0, model.bank.shape[1])
        student.map_mean = model.map_mean[:, :1].clone()  # the student's own plane of the statistics
        key = "" if len(args.runs) == 1 else Path(run).name + ":"
        models[key + "with_memory"], models[key + "student_only"] = model, student
        banks[Path(run).name] = {"bank_rows": int(model.bank.shape[0]), "bank_channels": int(model.bank.shape[1]),
                                 "bank_mb": model.bank.numel() * 4 / 2**20}
    x = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    ips: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(args.reps):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                ips[name].append(args.batch / (time.perf_counter() - t0))
    doc = {"images_per_s": {k: [round(v, 2) for v in vs] for k, vs in ips.items()}, "banks": banks,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "meta": _common.metadata(batch=args.batch, threads=args.threads)}
    print(doc["images_per_s"], doc["peak_rss_mb"])
    if args.out:
        _common.write_json(args.out, doc)


if __name__ == "__main__":
    main()
