"""Peak tensor memory of kdad vs anomalib, counted on the CPU: what a GPU's max_memory_allocated would see.

CPU RSS (vs_anomalib.py) mixes the allocator's habits with what the model needs; a GPU's caching allocator
reports live tensor bytes instead. This counts those on any machine: the profiler's allocation events of
one call (after a warm-up call) are summed in order, and the largest running total is the call's peak
growth; the resident part is the unique storages of parameters, buffers, gradients and optimizer state.
Not counted: cuDNN/oneDNN workspaces and the caching allocator's 512-byte rounding, so a GPU number can be
a little higher. Usage (anomalib importable, e.g. from .venv-anomalib):

    python benchmarks/alloc_peak.py --out benchmarks/results/alloc_peak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from _common import metadata, write_json
from _speed import (
    HAVE_ANOMALIB,
    SIZE,
    anomalib_train_fn,
    build_anomalib,
    build_kdad,
    engine_step_fn,
    infer_fn,
)
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from kdad.speed import optimize_for_inference

MiB = 2**20


def peak_growth_bytes(fn: Callable[[Tensor], Any], x: Tensor) -> int:
    """Largest running sum of allocated minus freed tensor bytes during one call of fn (after a warm-up)."""
    fn(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x)
    # Each allocation counts in its innermost operator's self memory (net of what that operator freed), a
    # free outside any operator is a "[memory]" event: in start order their running sum is the live total.
    run = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        run += e.self_cpu_memory_usage
        peak = max(peak, run)
    return peak


def resident_bytes(*objs: Any) -> int:
    """Bytes of the unique storages held by modules (parameters, buffers, gradients) and optimizers."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
                add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                for v in state.values():
                    add(v)
    return sum(seen.values())


def row(fn: Callable[[Tensor], Any], x: Tensor, *owners: Any) -> dict[str, float]:
    growth = peak_growth_bytes(fn, x)
    base = resident_bytes(*owners)  # after the calls: gradients and optimizer state exist by then
    return {"resident_mib": round(base / MiB, 1), "peak_growth_mib": round(growth / MiB, 1),
            "peak_total_mib": round((base + growth) / MiB, 1)}


def measure(method: str, backbone: str, batch: int, train_batch: int) -> dict[str, Any]:
    dev = torch.device("cpu")
    x = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    xt = torch.rand(train_batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    res: dict[str, Any] = {"method": method, "backbone": backbone, "batch": batch, "train_batch": train_batch}
    ano = build_anomalib(method, backbone, dev)
    inner = infer_fn(ano)
    res[f"infer_b{batch}_anomalib"] = row(inner, x, ano)
    # kdad models take images in [0, 1] and normalise inside; anomalib's inner model is handed a normalised
    # batch by its pre-processor, whose copy its full forward() (pre-processor -> model) also holds
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    res[f"infer_b{batch}_anomalib_with_normalize"] = row(lambda v: inner((v - mean) / std), x, ano)
    kd, cfg = build_kdad(method, backbone, dev)
    res[f"infer_b{batch}_kdad_eager"] = row(infer_fn(kd), x, kd)
    for precision in ("fp32", "bf16"):
        net, _ = build_kdad(method, backbone, dev)
        fast = optimize_for_inference(net, dev, precision, inplace=True)
        res[f"infer_b{batch}_kdad_fast_{precision}"] = row(fast, x, net)
    tfn = anomalib_train_fn(method, backbone, dev)
    res[f"train_b{train_batch}_anomalib"] = {"peak_growth_mib": round(peak_growth_bytes(tfn, xt) / MiB, 1)}
    for name, precision, levers in (("kdad_fp32", "fp32", False), ("kdad_fp32_levers", "fp32", True),
                                    ("kdad_bf16_levers", "bf16", True)):
        model, cfg = build_kdad(method, backbone, dev)
        step = engine_step_fn(method, model, cfg, dev, precision, levers=levers)
        # fit() moves each batch to the device straight into the layout the levers want, so that layout is
        # the resident input here (engine_step_fn's own conversion is then a no-op)
        xin = xt.contiguous(memory_format=torch.channels_last) if levers else xt
        res[f"train_b{train_batch}_{name}"] = {"peak_growth_mib": round(peak_growth_bytes(step, xin) / MiB, 1)}
    for k, v in list(res.items()):
        if isinstance(v, dict) and "_kdad" in k:
            ref = res[k.rsplit("_kdad", 1)[0] + "_anomalib"]
            v["growth_over_anomalib"] = round(v["peak_growth_mib"] / ref["peak_growth_mib"], 3)
            if "peak_total_mib" in v:
                v["total_over_anomalib"] = round(v["peak_total_mib"] / ref["peak_total_mib"], 3)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["rd:resnet18", "stfpm:resnet18"],
                   help="method:backbone pairs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not HAVE_ANOMALIB:
        sys.exit("anomalib is not importable here; see docs/benchmarks.md for the side venv")
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "meta": metadata(argv=sys.argv[1:],
                         memory="live tensor bytes from torch.profiler allocation events (CPU): peak growth of one "
                                "call after a warm-up; total = resident parameters, buffers, gradients and "
                                "optimizer state + growth (inference rows only). Workspaces are not counted."),
        "configs": [],
    }
    for spec in args.configs:
        method, backbone = spec.split(":")
        print(f"== {method} {backbone}", flush=True)
        out["configs"].append(measure(method, backbone, args.batch, args.train_batch))
        print(json.dumps(out["configs"][-1], indent=1), flush=True)
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
