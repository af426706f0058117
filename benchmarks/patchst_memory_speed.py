"""PatchST inference throughput with and without its memory branch, in one process (docs/methods/patchst.md).

Takes a trained run (model.ckpt with a memory bank) and times forward passes of random 256 px batches, the
model as trained against a copy with the bank removed (the student alone), alternating so load drifts hit both.

Run: taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/patchst_memory_speed.py RUN --out results/patchst_memory_speed.json
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
    ap.add_argument("run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = model_from_bundle(load_bundle(Path(args.run) / "model.ckpt"))
    model.eval()
    student = copy.deepcopy(model)
    student.bank = torch.zeros(0, model.bank.shape[1])
    student.map_mean = model.map_mean[:, :1].clone()  # the student's own plane of the statistics
    x = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    ips: dict[str, list[float]] = {"with_memory": [], "student_only": []}
    with torch.inference_mode():
        model(x), student(x)  # warm-up
        for _ in range(args.reps):
            for name, m in (("with_memory", model), ("student_only", student)):
                t0 = time.perf_counter()
                m(x)
                ips[name].append(args.batch / (time.perf_counter() - t0))
    doc = {"images_per_s": {k: [round(v, 2) for v in vs] for k, vs in ips.items()},
           "bank_rows": int(model.bank.shape[0]), "bank_mb": model.bank.numel() * 4 / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "meta": _common.metadata(batch=args.batch, threads=args.threads)}
    print(doc["images_per_s"], doc["peak_rss_mb"])
    if args.out:
        _common.write_json(args.out, doc)


if __name__ == "__main__":
    main()
