"""How much faster a preset trains on 2 threads than on 1: the factor that turns the quality study's one-core
training minutes (benchmarks/quality.py runs one thread per run, two runs at a time) into minutes on the issue's
2-core budget.

For each preset: its model as fit builds it (the preset's teacher, layers and method options, ImageNet weights
where the preset loads them), one training step at the preset's batch size and precision as the engine runs it
(channels_last + fused optimizer, fit's heap allocator), timed with torch.set_num_threads(1) and (2) in
alternating rounds in one process; the median img/s per thread count, and their ratio. Data loading is left out.
Run on a quiet machine (nothing else on the cores; the meta records the load).

Run:  python benchmarks/threads_scaling.py --presets rd_cpu snl_cpu --out benchmarks/results/threads_scaling.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import write_json
from _speed import engine_step_fn
from quality import parse_cell

from kdad.config import load_config, method_config
from kdad.hardware import cpu_bf16_enabled, heap_allocator
from kdad.methods import get_method


def step_for(cfg: Any) -> tuple[Callable[[torch.Tensor], None], int, str]:
    """(step closure, batch size, precision) for one preset's training step on the CPU."""
    spec = get_method(cfg.method)
    mcfg = method_config(cfg)
    torch.manual_seed(0)
    model = spec.Model(mcfg)
    precision = "bf16" if cpu_bf16_enabled(cfg.train.cpu_bf16) else "fp32"
    step = engine_step_fn(cfg.method, model, mcfg, torch.device("cpu"), precision, levers=True)
    return step, cfg.train.batch_size, precision


def time_steps(step: Callable[[torch.Tensor], None], x: torch.Tensor, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    step(x)  # one warm step at this thread count
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", required=True, help="preset names, or NAME:k=v,k=v with overrides")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and thread count")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for text in args.presets:
        _, preset, overrides = parse_cell(text)  # the study's NAME=PRESET:k=v,... form; [a,b] values kept whole
        cfg = load_config(preset, overrides=overrides)
        step, batch, precision = step_for(cfg)
        x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
        rates: dict[int, list[float]] = {1: [], 2: []}
        with heap_allocator(cfg.train.heap_allocator):  # fit trains under it; without it steps run far slower
            for r in range(args.rounds):
                for threads in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate so drifting load hits both alike
                    rates[threads].append(time_steps(step, x, threads, args.steps))
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        rows.append({"preset": text, "batch": batch, "precision": precision, "img_per_s_1_thread": one,
                     "img_per_s_2_threads": two, "speedup": two / one, "rounds": rates})
        print(f"{text}: {one:.1f} img/s on 1 thread, {two:.1f} on 2, x{two / one:.2f}", flush=True)
    write_json(args.out, {"question": "training speed-up from 1 to 2 threads, per preset", "runs": rows})


if __name__ == "__main__":
    main()
