"""kdad vs anomalib 2.7.0: RD and STFPM speed and memory, measured side by side in one process.

Both sides build the same network from random weights (kdad weights="random", anomalib pre_trained=False;
anomalib's STFPM teacher hard-codes pre_trained=True, so the benchmark builds it with False), the same
layers (1-3), 256 px input and batch sizes. Timings are interleaved: every round times each variant once,
in rotating order, and the medians over rounds are reported (this CPU is shared, see meta.loadavg).
anomalib's torch model takes normalised images, kdad's [0, 1] images (normalising inside).

Measured: inference img/s at batch 1 and 16 (eval forward incl. anomaly map + score, inference_mode),
training img/s at batch 16 (loss + backward + optimizer step), peak memory (CPU: RSS growth of a fresh
subprocess per config running the workload; CUDA: torch.cuda.max_memory_allocated), and the effect of each
kdad speed lever (kdad.speed) on RD, the bf16 accuracy cost on MVTec bottle images, FLOPs vs the measured
dense matmul rate.

anomalib is not a kdad dependency. Get it in a side venv that reuses the main venv's torch:
    python3 -m venv .venv-anomalib && echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > .venv-anomalib/lib/python3.11/site-packages/zz_main.pth && .venv-anomalib/bin/pip install anomalib==2.7.0
Run:  .venv-anomalib/bin/python benchmarks/vs_anomalib.py [--device cpu|cuda] [--out benchmarks/results/vs_anomalib_cpu.json]
Without anomalib the kdad rows and levers are still measured (ratios are then null).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, metadata, write_json
from _speed import (
    HAVE_ANOMALIB,
    LAYERS,
    SIZE,
    anomalib_train_fn,
    build_anomalib,
    build_kdad,
    infer_fn,
    interleaved,
    kdad_train_fn,
    memory_cuda,
    ort_fn,
    param_mib,
    peak_rss_mb,
    rss_mb,
    sync,
)
from torch import Tensor

from kdad.methods import get_method
from kdad.speed import optimize_for_inference


def memory_probe(impl: str, method: str, backbone: str, mode: str, batch: int) -> dict[str, float]:
    """Run in a fresh process: RSS growth (MiB) while running the workload twice, after building the model."""
    torch.set_num_threads(int(os.environ.get("KDAD_BENCH_THREADS", "2")))
    dev = torch.device("cpu")
    x = torch.rand(batch, 3, SIZE, SIZE)
    if mode == "train":
        fn = (anomalib_train_fn(method, backbone, dev) if impl == "anomalib" else
              kdad_train_fn(method, backbone, dev, "bf16" if impl == "kdad_bf16" else "fp32",
                            levers=impl != "kdad"))
    elif impl == "anomalib":
        fn = infer_fn(build_anomalib(method, backbone, dev))
    elif impl == "kdad":
        fn = infer_fn(build_kdad(method, backbone, dev)[0])
    else:
        fn = optimize_for_inference(build_kdad(method, backbone, dev)[0], dev,
                                    "bf16" if impl == "kdad_fast_bf16" else "fp32", inplace=True)
    base = rss_mb()
    for _ in range(2):
        fn(x)
    peak = peak_rss_mb()
    return {"rss_before_mib": round(base, 1), "peak_rss_mib": round(peak, 1), "peak_growth_mib": round(peak - base, 1)}


def memory_cpu(impl: str, method: str, backbone: str, mode: str, batch: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-probe", impl, method, backbone, mode, str(batch)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[-300:]}"}








def ratio(a: dict[str, Any], b: dict[str, Any], key: str = "img_s") -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return round(a[key] / b[key], 3)


# ---------------------------------------------------------------- sections
def bench_config(method: str, backbone: str, dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Inference (two batch sizes), training, memory of anomalib vs kdad for one method + backbone."""
    print(f"== {method} {backbone}", flush=True)
    res: dict[str, Any] = {"method": method, "backbone": backbone, "input": SIZE, "layers": list(LAYERS)}
    kdad_model = build_kdad(method, backbone, dev)[0]
    res["kdad_param_mib"] = param_mib(kdad_model)
    fns: dict[str, Callable[[Tensor], Any]] = {}
    if HAVE_ANOMALIB:
        ano = build_anomalib(method, backbone, dev)
        res["anomalib_param_mib"] = param_mib(ano)
        fns["anomalib"] = infer_fn(ano)
    fns["kdad_eager"] = infer_fn(kdad_model)
    fns["kdad_fast_fp32"] = optimize_for_inference(kdad_model, dev, "fp32")
    fns[f"kdad_fast_{args.low}"] = optimize_for_inference(kdad_model, dev, args.low)
    if args.compile:  # the warm-up call of each batch size compiles
        fns["kdad_fast_fp32_compiled"] = optimize_for_inference(kdad_model, dev, "fp32", compile=True)
        fns[f"kdad_fast_{args.low}_compiled"] = optimize_for_inference(kdad_model, dev, args.low, compile=True)
    if dev.type == "cuda":  # the warm-up call of each batch size captures its graph
        fns["kdad_fast_fp32_graph"] = optimize_for_inference(kdad_model, dev, "fp32", cuda_graph=True)
        fns[f"kdad_fast_{args.low}_graph"] = optimize_for_inference(kdad_model, dev, args.low, cuda_graph=True)
    big = backbone == "wide_resnet50_2"
    res["infer"] = {}
    for b in args.infer_batches:
        rounds = args.rounds_big if (big and b > 1) or (b > 16) else args.rounds
        x = torch.rand(b, 3, SIZE, SIZE, device=dev)
        res["infer"][f"b{b}"] = interleaved(fns, x, rounds, dev, args.warmup, args.calls if b == 1 else args.calls_big)
        print(f"   infer b{b}: " + ", ".join(f"{k} {v['img_s']:.2f}" for k, v in res["infer"][f"b{b}"].items()), flush=True)
    del fns
    tfns: dict[str, Callable[[Tensor], None]] = {}
    if HAVE_ANOMALIB:
        tfns["anomalib"] = anomalib_train_fn(method, backbone, dev)
    tfns["kdad_fp32"] = kdad_train_fn(method, backbone, dev)
    tfns["kdad_fp32_levers"] = kdad_train_fn(method, backbone, dev, levers=True)
    tfns[f"kdad_{args.low}_levers"] = kdad_train_fn(method, backbone, dev, args.low, levers=True)
    if args.compile:
        tfns["kdad_fp32_levers_compiled"] = kdad_train_fn(method, backbone, dev, levers=True, compile=True)
        tfns[f"kdad_{args.low}_levers_compiled"] = kdad_train_fn(method, backbone, dev, args.low, levers=True,
                                                                 compile=True)
    if dev.type == "cuda":
        tfns["kdad_fp32_levers_graph"] = kdad_train_fn(method, backbone, dev, levers=True, graph=True)
        tfns[f"kdad_{args.low}_levers_graph"] = kdad_train_fn(method, backbone, dev, args.low, levers=True, graph=True)
    x = torch.rand(args.train_batch, 3, SIZE, SIZE, device=dev)
    res["train"] = {f"b{args.train_batch}": interleaved(tfns, x, args.rounds_big if big else args.rounds, dev,
                                                        args.warmup, args.calls_big)}
    print("   train: " + ", ".join(f"{k} {v['img_s']:.2f}" for k, v in res["train"][f"b{args.train_batch}"].items()), flush=True)
    res["memory"] = {}
    if dev.type == "cuda":
        xb = torch.rand(args.infer_batches[-1], 3, SIZE, SIZE, device=dev)
        for name, fn in {**({"anomalib": infer_fn(build_anomalib(method, backbone, dev))} if HAVE_ANOMALIB else {}),
                         "kdad_eager": infer_fn(kdad_model),
                         "kdad_fast_fp32": optimize_for_inference(kdad_model, dev, "fp32"),
                         f"kdad_fast_{args.low}": optimize_for_inference(kdad_model, dev, args.low)}.items():
            res["memory"][f"infer_b{xb.shape[0]}_{name}"] = memory_cuda(fn, xb)
        for name, tfn in tfns.items():
            res["memory"][f"train_b{args.train_batch}_{name}"] = memory_cuda(tfn, x)
    elif not args.no_memory:
        impls = (["anomalib"] if HAVE_ANOMALIB else []) + ["kdad", "kdad_fast_fp32", "kdad_fast_bf16"]
        for impl in impls:
            res["memory"][f"infer_b16_{impl}"] = memory_cpu(impl, method, backbone, "infer", 16)
        for impl in (["anomalib"] if HAVE_ANOMALIB else []) + ["kdad", "kdad_fp32_levers", "kdad_bf16"]:
            res["memory"][f"train_b16_{impl}"] = memory_cpu(impl, method, backbone, "train", 16)
    del tfns
    res["ratios_kdad_over_anomalib"] = ratios(res, args) if HAVE_ANOMALIB else None
    return res


def ratios(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b, row in res["infer"].items():
        for k in row:
            if k != "anomalib":
                out[f"infer_{b}_{k}"] = ratio(row[k], row["anomalib"])
    for b, row in res["train"].items():
        for k in row:
            if k != "anomalib":
                out[f"train_{b}_{k}"] = ratio(row[k], row["anomalib"])
    mem = res.get("memory", {})
    for key, val in mem.items():
        mode = key.split("_")[0] + "_" + key.split("_")[1]
        base = mem.get(f"{mode}_anomalib", {})
        if not key.endswith("_anomalib") and "peak_growth_mib" in val and base.get("peak_growth_mib"):
            out[f"memory_{key}"] = round(val["peak_growth_mib"] / base["peak_growth_mib"], 3)
    return out


def bench_levers(dev: torch.device, args: argparse.Namespace, backbone: str, batches: list[int]) -> dict[str, Any]:
    """Each kdad.speed lever alone, then combined, on RD (kdad eager fp32 under inference_mode = 1.0)."""
    print(f"== levers rd {backbone}", flush=True)
    model = build_kdad("rd", backbone, dev)[0]
    low = args.low
    fns: dict[str, Callable[[Tensor], Any]] = {
        "eager_grad_enabled": infer_fn(model, "grad"),
        "eager_no_grad": infer_fn(model, "no_grad"),
        "eager_inference_mode": infer_fn(model),
        "fast_head_only": optimize_for_inference(model, dev, "fp32", channels_last=False, fold_bn=False),
        "fold_bn_only": optimize_for_inference(model, dev, "fp32", channels_last=False, fast_head=False),
        "channels_last_only": optimize_for_inference(model, dev, "fp32", fold_bn=False, fast_head=False),
        f"{low}_autocast_only": optimize_for_inference(model, dev, low, channels_last=False, fold_bn=False,
                                                       fast_head=False),
        "all_fp32": optimize_for_inference(model, dev, "fp32"),
        f"all_{low}": optimize_for_inference(model, dev, low),
    }
    if args.compile:
        for prec in ("fp32", low):
            fn = optimize_for_inference(model, dev, prec, compile=True)
            t0 = time.perf_counter()
            try:
                fn(torch.rand(batches[0], 3, SIZE, SIZE, device=dev))
                fns[f"all_{prec}_compiled"] = fn
                print(f"   compile {prec}: {time.perf_counter() - t0:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                print(f"   compile {prec} failed: {type(e).__name__}: {e}", flush=True)
    if dev.type == "cuda":
        for prec in ("fp32", low):
            fns[f"all_{prec}_graph"] = optimize_for_inference(model, dev, prec, cuda_graph=True)
    if dev.type == "cpu" and args.onnx:
        try:
            fns["onnxruntime_fp32"] = ort_fn(optimize_for_inference(model, dev, "fp32", channels_last=False).module)
        except Exception as e:  # noqa: BLE001
            print(f"   onnxruntime failed: {type(e).__name__}: {e}", flush=True)
    out: dict[str, Any] = {"backbone": backbone}
    for b in batches:
        x = torch.rand(b, 3, SIZE, SIZE, device=dev)
        rows = interleaved(fns, x, args.rounds, dev, args.warmup + 1, args.calls if b == 1 else args.calls_big)
        base = rows["eager_inference_mode"]["img_s"]
        for v in rows.values():
            v["speedup_vs_eager"] = round(v["img_s"] / base, 3)
        out[f"b{b}"] = rows
        print(f"   b{b}: " + ", ".join(f"{k} {v['speedup_vs_eager']:.2f}x" for k, v in rows.items()), flush=True)
    return out


def bench_head(dev: torch.device, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """The anomaly-map head alone on RD-resnet18 feature shapes: anomalib's vs kdad's, and the blur alone."""
    import torch.nn.functional as F

    from kdad.blocks.maps import AnomalyMapHead, FastAnomalyMapHead, GaussianBlur

    print("== head", flush=True)
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(batch, c, SIZE // s, SIZE // s, generator=g).to(dev) for c, s in ((64, 4), (128, 8), (256, 16))]
    student = [t + 0.5 * torch.randn(t.shape, generator=g).to(dev) for t in teacher]
    cl = [t.contiguous(memory_format=torch.channels_last) for t in teacher]
    cls = [t.contiguous(memory_format=torch.channels_last) for t in student]
    head, fast = AnomalyMapHead("cosine", "sum", 4.0, True).to(dev), None
    fast = FastAnomalyMapHead.from_head(head)
    fns: dict[str, Callable[[Any], Any]] = {
        "kdad_head": lambda _: head(teacher, student, (SIZE, SIZE)),
        "kdad_fast_head": lambda _: fast(teacher, student, (SIZE, SIZE)),
        "kdad_fast_head_channels_last": lambda _: fast(cl, cls, (SIZE, SIZE)),
        "distance_F.cosine_similarity": lambda _: head.layer_maps(teacher, student),
        "distance_channel_sums": lambda _: fast.layer_maps(teacher, student),
        "distance_channel_sums_channels_last": lambda _: fast.layer_maps(cl, cls),
    }
    maps = head.layer_maps(teacher, student)
    blur = GaussianBlur(4.0).to(dev)
    full = torch.rand(batch, 1, SIZE, SIZE, device=dev)

    def resize_blur(_: Any) -> Tensor:
        fused = sum(F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=True) for m in maps)
        return blur(fused)  # type: ignore[arg-type]

    fns["resize_fuse_blur_interpolate_separable"] = resize_blur
    layers, _ = fast._matrices([tuple(m.shape[-2:]) for m in maps], (SIZE, SIZE), maps[0].device)
    right = torch.cat([p[1] for p in layers if p], dim=1).T
    fns["resize_fuse_blur_matmul"] = lambda _: torch.cat([p[0] @ m for p, m in zip(layers, maps) if p], -1) @ right
    fns["blur_separable"] = lambda _: blur(full)
    if HAVE_ANOMALIB:
        from anomalib.models.image.reverse_distillation import anomaly_map as ano_map

        gen = ano_map.AnomalyMapGenerator((SIZE, SIZE), mode=ano_map.AnomalyMapGenerationMode.ADD).to(dev)
        dense = ano_map.GaussianBlur2d(kernel_size=(gen.kernel_size,) * 2, sigma=(gen.sigma,) * 2).to(dev)
        fns["anomalib_head"] = lambda _: gen(teacher, student)
        fns["blur_dense_anomalib"] = lambda _: dense(full)
    with torch.inference_mode():
        rows = interleaved(fns, full, args.rounds, dev, warmup=1, calls=3)
    return {"batch": batch, "ms_per_call": {k: round(1000 * batch / v["img_s"], 3) for k, v in rows.items()}}


def bench_bf16_accuracy(dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """bf16 vs fp32 maps and image AUROC on MVTec bottle test images (RD, EfficientNet-Lite0 ImageNet teacher)."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    root = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"
    if not root.exists():
        return {"skipped": f"{root} not found"}
    print("== bf16 accuracy", flush=True)
    paths = [(p, 0) for p in sorted((root / "good").glob("*.png"))[: args.acc_images // 2]]
    paths += [(p, 1) for d in ("broken_large", "contamination") for p in sorted((root / d).glob("*.png"))[: args.acc_images // 4]]
    imgs = torch.stack([torch.from_numpy(__import__("numpy").asarray(
        Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype="float32") / 255.0).permute(2, 0, 1)
        for p, _ in paths])
    labels = [lab for _, lab in paths]
    spec = get_method("rd")
    try:
        cfg = spec.Config(backbone="efficientnet_lite0", weights="imagenet")
        model, teacher = spec.Model(cfg).to(dev), "efficientnet_lite0 imagenet"
    except Exception:  # noqa: BLE001 - weights not available: random teacher
        model, teacher = build_kdad("rd", "efficientnet_lite0", dev)[0], "efficientnet_lite0 random"
    out: dict[str, Any] = {"teacher": teacher, "decoder": "random init (untrained)", "n_images": len(paths),
                           "note": "AUROC of an untrained decoder is not a quality number; compare fp32 vs bf16 only"}
    with torch.inference_mode():
        ref = torch.cat([model.eval()(imgs[i:i + 8].to(dev)).anomaly_map.float().cpu() for i in range(0, len(imgs), 8)])
    for prec in ("fp32", args.low):
        fn = optimize_for_inference(model, dev, prec)
        amap = torch.cat([fn(imgs[i:i + 8]).anomaly_map.cpu() for i in range(0, len(imgs), 8)])
        rng = float(ref.max() - ref.min())
        out[prec] = {"max_abs_diff": float((amap - ref).abs().max()), "max_abs_diff_over_range": float((amap - ref).abs().max()) / rng,
                     "image_auroc": float(roc_auc_score(labels, amap.flatten(1).amax(1).numpy()))}
    out["fp32_eager_image_auroc"] = float(roc_auc_score(labels, ref.flatten(1).amax(1).numpy()))
    return out


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:]) / 1e9


def conv_rate(dev: torch.device, dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of one large 3x3 convolution (256 -> 256 channels, NHWC), the kernel class the models run."""
    import torch.nn.functional as F

    b, hw = (16, 32) if dev.type == "cpu" else (64, 64)
    x = torch.randn(b, 256, hw, hw, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            sync(dev)
            t0 = time.perf_counter()
            F.conv2d(x, w, padding=1)
            sync(dev)
            times.append(time.perf_counter() - t0)
    return 2 * b * 256 * 256 * 9 * hw * hw / min(times[1:]) / 1e9


def bench_roofline(dev: torch.device, configs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """kdad RD FLOPs per image vs the machine's measured dense rate (fp32 and low precision).

    The limit per dtype is the faster of a large matmul (max over sizes) and a large 3x3 convolution: on this
    AMD CPU torch's fp32 matmul reaches ~210 GFLOP/s while oneDNN's convolution reaches ~510 (the AVX-512
    peak of 2 cores), and on CUDA convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32).
    """
    from torch.utils.flop_counter import FlopCounterMode

    print("== roofline", flush=True)
    sizes = (1024, 2048, 4096) if dev.type == "cpu" else (4096, 8192)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.low]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    mm = {"fp32": max(matmul_rate(dev, torch.float32, n, 5) for n in sizes),
          args.low: max(matmul_rate(dev, low, n, 5) for n in sizes)}
    torch.backends.cuda.matmul.allow_tf32 = prev
    conv = {"fp32": conv_rate(dev, torch.float32, 5), args.low: conv_rate(dev, low, 5)}
    peak_rate = {k: max(mm[k], conv[k]) for k in mm}
    out: dict[str, Any] = {"matmul_sizes": list(sizes), "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                           "matmul_gflop_s": {k: round(v, 1) for k, v in mm.items()},
                           "conv3x3_gflop_s": {k: round(v, 1) for k, v in conv.items()},
                           "limit_gflop_s": {k: round(v, 1) for k, v in peak_rate.items()}}
    for cfg in configs:
        if cfg["method"] != "rd":
            continue
        model = build_kdad("rd", cfg["backbone"], dev)[0].eval()
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model(torch.rand(1, 3, SIZE, SIZE, device=dev))
        gflop = counter.get_total_flops() / 1e9
        row: dict[str, Any] = {"gflop_per_img": round(gflop, 2)}
        for b, vs in cfg["infer"].items():
            for k in ("kdad_eager", "kdad_fast_fp32", f"kdad_fast_{args.low}", "kdad_fast_fp32_compiled",
                      f"kdad_fast_{args.low}_compiled", "kdad_fast_fp32_graph", f"kdad_fast_{args.low}_graph"):
                if k in vs:
                    rate = gflop * vs[k]["img_s"]
                    peak = peak_rate[args.low if f"_{args.low}" in k else "fp32"]
                    row[f"{b}_{k}"] = {"gflop_s": round(rate, 1), "fraction_of_limit": round(rate / peak, 3)}
        out[f"rd_{cfg['backbone']}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_anomalib_cpu.json"))
    p.add_argument("--methods", nargs="+", default=["rd", "stfpm"])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "wide_resnet50_2"])
    p.add_argument("--infer-batches", type=int, nargs="+", default=None)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rounds-big", type=int, default=3, help="rounds for wide_resnet50_2 batches and batches > 16")
    p.add_argument("--calls", type=int, default=3, help="calls per timed sample at batch 1")
    p.add_argument("--calls-big", type=int, default=1, help="calls per timed sample at batch > 1 (GPU: 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile in the lever table")
    p.add_argument("--onnx", action="store_true", help="also time ONNX Runtime (CPU) in the lever table")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: configs levers head accuracy roofline")
    p.add_argument("--merge", action="store_true", help="keep the sections of an existing --out file that are skipped")
    p.add_argument("--acc-images", type=int, default=16)
    p.add_argument("--memory-probe", nargs=5, metavar=("IMPL", "METHOD", "BACKBONE", "MODE", "BATCH"))
    args = p.parse_args()
    if args.memory_probe:
        impl, method, backbone, mode, batch = args.memory_probe
        print(json.dumps(memory_probe(impl, method, backbone, mode, int(batch))))
        return
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads) if dev.type == "cpu" else None
    os.environ["KDAD_BENCH_THREADS"] = str(args.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # compile with frozen weights recompiles per model and input shape; this process compiles many of each
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)
    args.low = "bf16"
    args.infer_batches = args.infer_batches or ([1, 16] if dev.type == "cpu" else [16, 64])
    out_path = Path(args.out)
    result: dict[str, Any] = {"meta": metadata(
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(), anomalib=__import__("anomalib").__version__ if HAVE_ANOMALIB else None,
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        timing="median over interleaved rounds; img/s = batch / median seconds per call",
        memory=("CUDA max_memory_allocated growth over the model's resident memory" if dev.type == "cuda" else
                "CPU: VmHWM (peak RSS) growth of a fresh process over its RSS after building the model, 2 calls"),
    ), "configs": []}

    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        result = {**old, "meta": {**old.get("meta", {}), "merged_run": result["meta"]},
                  "configs": old.get("configs", [])}

    def save() -> None:
        write_json(out_path, result)

    if "levers" not in args.skip:
        result["levers"] = bench_levers(dev, args, "resnet18", args.infer_batches)
        save()
    if "head" not in args.skip:
        result["head"] = bench_head(dev, args, 16)
        save()
    if "configs" not in args.skip:
        result["configs"] = []
        for backbone in args.backbones:
            for method in args.methods:
                result["configs"].append(bench_config(method, backbone, dev, args))
                save()
    if "accuracy" not in args.skip:
        result["bf16_accuracy"] = bench_bf16_accuracy(dev, args)
        save()
    if "roofline" not in args.skip and result["configs"]:
        result["roofline"] = bench_roofline(dev, result["configs"], args)
        save()
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
