"""Whether bf16 autocast trains a preset faster than fp32 on this CPU: the presets that set train.cpu_bf16 were
timed on CPUs where bf16 is 2-3x faster (AMX, or AVX-512 BF16 on an AMD EPYC); on other CPUs with AVX-512 BF16 it
can be slower, and `--set train.cpu_bf16=false` is then the faster recipe (in quality the study found the two
level for RD and PatchST, not for one SNL seed on magnetic_tile: docs/quality.md, "Session 34").

For each preset: its training step as the engine runs it (threads_scaling.step_for: the preset's model, batch,
channels_last + fused optimizer, fit's heap allocator) with train.cpu_bf16 true and false, timed at each thread count in
alternating rounds in one process; the median img/s per precision and their ratio. Data loading is left out.
Run on a quiet machine (the meta records the load).

Run:  python benchmarks/cpu_precision.py --presets rd_cpu snl_cpu --threads 1 2 --out benchmarks/results/cpu_precision.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import write_json
from quality import parse_cell
from threads_scaling import step_for, time_steps

from kdad.config import load_config
from kdad.hardware import heap_allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", required=True, help="preset names, or NAME:k=v,k=v with overrides")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round and precision")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts, each timed apart")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for text, threads in ((t, n) for t in args.presets for n in args.threads):
        _, preset, overrides = parse_cell(text)
        steps = {}
        for bf16 in (True, False):
            cfg = load_config(preset, overrides=[*overrides, f"train.cpu_bf16={str(bf16).lower()}"])
            steps[bf16] = step_for(cfg)
        batch = steps[True][1]
        x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
        rates: dict[str, list[float]] = {"bf16": [], "fp32": []}
        with heap_allocator(cfg.train.heap_allocator):
            for r in range(args.rounds):
                for bf16 in ((True, False) if r % 2 == 0 else (False, True)):  # alternate against drifting load
                    rates["bf16" if bf16 else "fp32"].append(time_steps(steps[bf16][0], x, threads, args.steps))
        bf, fp = statistics.median(rates["bf16"]), statistics.median(rates["fp32"])
        rows.append({"preset": text, "batch": batch, "threads": threads, "img_per_s_bf16": bf,
                     "img_per_s_fp32": fp, "bf16_over_fp32": bf / fp, "rounds": rates})
        print(f"{text}, {threads} thread(s): bf16 {bf:.1f} img/s, fp32 {fp:.1f}, bf16/fp32 x{bf / fp:.2f}", flush=True)
    write_json(args.out, {"question": "training speed of bf16 autocast against fp32 on this CPU, per preset",
                          "runs": rows})


if __name__ == "__main__":
    main()
