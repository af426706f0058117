"""Inference and training speed, memory, parameters and FLOPs of every kdad method (those with no anomalib peer).

For each method in kdad.methods.METHODS (RD and STFPM are in vs_anomalib.py) and each teacher
(efficientnet_lite0, resnet18; random weights, 256 px): one train step at batch 2 (so methods that fill
state during training have it), then interleaved timing of eager fp32 and kdad.speed's fast fp32 / bf16
paths at batch 1 and 16 (medians over rounds), peak RSS growth of a fresh process running eager batch-16
inference, parameter count, FLOPs per image (torch.utils.flop_counter.FlopCounterMode, eager forward), and
training img/s at batch 16 as fit() runs it (channels_last + fused optimizer + heap allocator on CPU), in fp32
and bf16 autocast.

Run:  python benchmarks/methods_speed.py [--device cpu|cuda] [--out benchmarks/results/methods_speed_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, metadata, write_json
from _speed import engine_step_fn, infer_fn, interleaved, memory_cuda, peak_rss_mb, rss_mb
from torch import nn

from kdad.config import from_dict
from kdad.methods import METHODS, get_method
from kdad.speed import heap_allocator, optimize_for_inference

SIZE = 256
PEERED = ("rd", "stfpm")  # benchmarked against anomalib in vs_anomalib.py
TEACHERS = ("efficientnet_lite0", "resnet18")


def build(method: str, teacher: str, dev: torch.device) -> nn.Module:
    """The method with a random-weight teacher, after one train step at batch 2 (eval mode)."""
    spec = get_method(method)
    cfg = from_dict(spec.Config, {"backbone": teacher, "weights": "random"})
    torch.manual_seed(0)
    model = spec.Model(cfg).to(dev)
    opts = spec.optimizers(model, cfg)
    model.train()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(dev)
    batch = {"image": x, "mask": torch.zeros(2, 1, SIZE, SIZE, device=dev), "label": torch.zeros(2, dtype=torch.long)}
    spec.train_step(model, batch, opts, cfg, torch.Generator().manual_seed(0))
    return model.eval()


def flops_per_image(model: nn.Module, dev: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, SIZE, SIZE, device=dev))
    return counter.get_total_flops() / 1e9


def memory_probe(method: str, teacher: str, batch: int) -> dict[str, float]:
    torch.set_num_threads(int(os.environ.get("KDAD_BENCH_THREADS", "2")))
    fn = infer_fn(build(method, teacher, torch.device("cpu")))
    x = torch.rand(batch, 3, SIZE, SIZE)
    base = rss_mb()
    for _ in range(2):
        fn(x)
    peak = peak_rss_mb()
    return {"rss_before_mib": round(base, 1), "peak_rss_mib": round(peak, 1), "peak_growth_mib": round(peak - base, 1)}


def memory(method: str, teacher: str, batch: int, dev: torch.device, model: nn.Module) -> dict[str, Any]:
    if dev.type == "cuda":
        return memory_cuda(infer_fn(model), torch.rand(batch, 3, SIZE, SIZE, device=dev))
    cmd = [sys.executable, __file__, "--memory-probe", method, teacher, str(batch)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[-300:]}"}


def bench(method: str, teacher: str, dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {method} {teacher}", flush=True)
    row: dict[str, Any] = {"method": method, "teacher": teacher, "input": SIZE}
    try:
        model = build(method, teacher, dev)
    except Exception as e:  # noqa: BLE001 - record and go on with the other methods
        return {**row, "error": f"{type(e).__name__}: {e}"}
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    row["trainable_params_m"] = round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 3)
    row["gflop_per_img"] = round(flops_per_image(model, dev), 2)
    fns = {"eager_fp32": infer_fn(model)}
    probe = torch.rand(1, 3, SIZE, SIZE, device=dev)
    for prec in ("fp32", "bf16"):
        try:  # one call first: e.g. torchvision's deform_conv2d has no bf16 kernel
            fn = optimize_for_inference(model, dev, prec)
            fn(probe)
            fns[f"fast_{prec}"] = fn
        except Exception as e:  # noqa: BLE001 - record and time the other paths
            row[f"fast_{prec}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    for b in args.batches:
        x = torch.rand(b, 3, SIZE, SIZE, device=dev)
        rounds = args.rounds if b == 1 else args.rounds_big
        rows = interleaved(fns, x, rounds, dev, args.warmup, args.calls if b == 1 else args.calls_big)
        row[f"b{b}"] = {k: {"img_s": round(v["img_s"], 3), "ms_per_img": round(v["ms_per_img"], 2)} for k, v in rows.items()}
        print(f"   b{b}: " + ", ".join(f"{k} {v['img_s']:.2f}" for k, v in rows.items()), flush=True)
    if not args.no_memory:
        row[f"memory_infer_b{args.batches[-1]}"] = memory(method, teacher, args.batches[-1], dev, model)
    if args.train_batch:
        row[f"train_b{args.train_batch}"] = bench_train(method, teacher, dev, args)
        print(f"   train b{args.train_batch}: " + ", ".join(
            f"{k} {v.get('img_s', v.get('error'))}" for k, v in row[f"train_b{args.train_batch}"].items()), flush=True)
    return row


def train_fn(method: str, teacher: str, dev: torch.device, precision: str) -> Any:
    """One engine training step with the fit() defaults (channels_last + fused optimizer) at `precision`;
    bench_train runs it under the heap allocator, as fit() does on CPU."""
    spec = get_method(method)
    cfg = from_dict(spec.Config, {"backbone": teacher, "weights": "random"})
    torch.manual_seed(0)
    return engine_step_fn(method, spec.Model(cfg).to(dev), cfg, dev, precision, levers=True)


def bench_train(method: str, teacher: str, dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Training img/s at batch args.train_batch, fp32 and bf16 (synthesis methods use the batch as textures)."""
    fns, errors = {}, {}
    for prec in ("fp32", "bf16"):
        try:
            fns[prec] = train_fn(method, teacher, dev, prec)
        except Exception as e:  # noqa: BLE001 - record and go on
            errors[prec] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    x = torch.rand(args.train_batch, 3, SIZE, SIZE, device=dev)
    with heap_allocator(dev.type == "cpu"):  # as fit() trains on CPU (train.heap_allocator)
        rows = interleaved(fns, x, args.rounds_big, dev, args.warmup, args.calls_big)
    return {**{k: {"img_s": round(v["img_s"], 3), "ms_per_img": round(v["ms_per_img"], 2)} for k, v in rows.items()},
            **errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods_speed_cpu.json"))
    p.add_argument("--methods", nargs="+", default=None, help="default: every METHODS entry except rd, stfpm")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rounds-big", type=int, default=2)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--calls-big", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--train-batch", type=int, default=16, help="training img/s at this batch (0: skip)")
    p.add_argument("--memory-probe", nargs=3, metavar=("METHOD", "TEACHER", "BATCH"))
    args = p.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], args.memory_probe[1], int(args.memory_probe[2]))))
        return
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    os.environ["KDAD_BENCH_THREADS"] = str(args.threads)
    args.batches = args.batches or ([1, 16] if dev.type == "cpu" else [16, 64])
    methods = args.methods or [m for m in sorted(METHODS) if m not in PEERED]
    out_path = Path(args.out)
    result: dict[str, Any] = {"meta": metadata(
        argv=sys.argv[1:], device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(),
        weights="random (speed does not depend on them)", timing="median over interleaved rounds",
        train_heap_allocator=True,
    ), "rows": []}
    for teacher in args.teachers:
        for method in methods:
            result["rows"].append(bench(method, teacher, dev, args))
            write_json(out_path, result)
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
