"""Where a training step spends its time: kdad RD (each lever set) vs anomalib's, per operator.

Profiles a few steps of RD at batch 16, 256 px, with torch.profiler and writes, for every variant, the step
time and the operators that take the most (CUDA time on a GPU, CPU time otherwise). This is the tool for the
GPU training gap of docs/benchmarks.md: it shows whether the step is launch-bound (many short kernels) or
compute-bound (convolutions), and which kernels a lever changes.

Run:  .venv-anomalib/bin/python benchmarks/train_profile.py --device cuda --out benchmarks/results/train_profile_cuda.json
(without anomalib only the kdad variants are profiled).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import ROOT, metadata, write_json
from _speed import HAVE_ANOMALIB, anomalib_train_fn, kdad_train_fn, sync
from torch import Tensor
from torch.profiler import ProfilerActivity, profile


def _dev_time(e: Any) -> float:
    """Device (kernel) time of a profiler event in us, across torch versions."""
    return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) or 0.0)


def _rows(events: list[Any], key: Callable[[Any], float], steps: int, total: float, top: int) -> list[dict[str, Any]]:
    ranked = sorted(events, key=key, reverse=True)[:top]
    return [{"name": e.key[:90], "ms_per_step": round(key(e) / 1000 / steps, 3),
             "calls_per_step": round(e.count / steps, 1), "share": round(key(e) / max(total, 1e-9), 3)}
            for e in ranked]


def profile_step(fn: Callable[[Tensor], None], x: Tensor, dev: torch.device, steps: int, top: int) -> dict[str, Any]:
    """Median step time over `steps` timed steps, then one profiled pass over `steps` steps.

    CPU: operators by self CPU time. CUDA: kernels by GPU time, the kernel count per step and the fraction of
    the step's wall time the GPU is busy (well below 1 means the step waits on Python / kernel launches),
    and the operators by self CPU time (the launch side).
    """
    for _ in range(3):
        fn(x)
    sync(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn(x)
        sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn(x)
        sync(dev)
    events = list(prof.key_averages())
    cpu_ops = [e for e in events if not str(e.device_type).endswith("CUDA")]
    cpu_total = sum(e.self_cpu_time_total for e in cpu_ops)
    out: dict[str, Any] = {"step_ms": round(1000 * step_s, 3), "img_s": round(x.shape[0] / step_s, 1)}
    if dev.type == "cuda":
        kernels = [e for e in events if str(e.device_type).endswith("CUDA") and _dev_time(e) > 0]
        k_total = sum(_dev_time(e) for e in kernels)
        out |= {"kernels_per_step": round(sum(e.count for e in kernels) / steps, 1),
                "gpu_ms_per_step": round(k_total / 1000 / steps, 3),
                "gpu_busy_fraction": round(k_total / 1e6 / steps / step_s, 3),
                "top_kernels": _rows(kernels, _dev_time, steps, k_total, top)}
    out["top_cpu_ops"] = _rows(cpu_ops, lambda e: float(e.self_cpu_time_total), steps, cpu_total, top)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="also profile train.compile")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_profile_cpu.json"))
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(2)
    variants: dict[str, Callable[[], Callable[[Tensor], None]]] = {
        "kdad_fp32": lambda: kdad_train_fn("rd", args.backbone, dev),
        "kdad_fp32_levers": lambda: kdad_train_fn("rd", args.backbone, dev, levers=True),
        "kdad_bf16_levers": lambda: kdad_train_fn("rd", args.backbone, dev, "bf16", levers=True),
    }
    if dev.type == "cuda":  # train.cuda_graph: one replay per step (profiled as a single graph launch)
        variants["kdad_bf16_levers_graph"] = lambda: kdad_train_fn("rd", args.backbone, dev, "bf16", levers=True,
                                                                   graph=True)
    if args.compile:
        variants["kdad_bf16_levers_compiled"] = lambda: kdad_train_fn("rd", args.backbone, dev, "bf16", levers=True,
                                                                      compile=True)
    if HAVE_ANOMALIB:
        variants = {"anomalib": lambda: anomalib_train_fn("rd", args.backbone, dev), **variants}
    out: dict[str, Any] = {"meta": metadata(
        device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
        method="rd", backbone=args.backbone, batch=args.batch, steps=args.steps,
        anomalib=__import__("anomalib").__version__ if HAVE_ANOMALIB else None,
        ms_per_step="per kernel (GPU time) or per operator (self CPU time), summed over calls"), "variants": {}}
    x = torch.rand(args.batch, 3, 256, 256, device=dev)
    for name, build in variants.items():
        print(f"== {name}", flush=True)
        try:
            out["variants"][name] = profile_step(build(), x, dev, args.steps, args.top)
            print(f"   {out['variants'][name]['step_ms']} ms/step", flush=True)
        except Exception as e:  # noqa: BLE001 - report, keep profiling the other variants
            out["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
