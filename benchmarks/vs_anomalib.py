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
import contextlib
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the GPU machine runs without kdad installed

from kdad.methods import get_method
from kdad.speed import GraphedTrainStep, optimize_for_inference, prepare_training

SIZE = 256
LAYERS = (1, 2, 3)
HAVE_ANOMALIB = importlib.util.find_spec("anomalib") is not None


# ---------------------------------------------------------------- builders
def build_kdad(method: str, backbone: str, device: torch.device) -> tuple[nn.Module, Any]:
    spec = get_method(method)
    cfg = spec.Config(backbone=backbone, weights="random", layers=LAYERS)
    torch.manual_seed(0)
    return spec.Model(cfg).to(device), cfg


def build_anomalib(method: str, backbone: str, device: torch.device) -> nn.Module:
    layers = [f"layer{i}" for i in LAYERS]
    torch.manual_seed(0)
    if method == "rd":
        from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
        from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

        return ReverseDistillationModel(backbone, (SIZE, SIZE), layers, AnomalyMapGenerationMode.ADD,
                                        pre_trained=False).to(device)
    import anomalib.models.image.stfpm.torch_model as stfpm_mod

    real = stfpm_mod.TimmFeatureExtractor

    def offline(*args: Any, **kw: Any) -> Any:  # the teacher asks the hub for weights otherwise
        kw["pre_trained"] = False
        return real(*args, **kw)

    stfpm_mod.TimmFeatureExtractor = offline  # type: ignore[assignment,misc]
    try:
        return stfpm_mod.STFPMModel(layers, backbone=backbone).to(device)
    finally:
        stfpm_mod.TimmFeatureExtractor = real  # type: ignore[misc]


def engine_step_fn(method: str, model: nn.Module, cfg: Any, device: torch.device, precision: str = "fp32",
                   levers: bool = False, compile: bool = False, graph: bool = False) -> Callable[[Tensor], None]:
    """One training step of a built model as the engine runs it: levers=True is kdad.speed.prepare_training
    (channels_last + fused optimizer, the fit() defaults), compile=True adds train.compile, graph=True
    train.cuda_graph (the first two calls run eagerly, the third captures). Methods read only batch["image"]
    in training. Like fit(), the step leaves its loss on the device."""
    spec = get_method(method)
    model.train()
    opts = spec.optimizers(model, cfg)
    prepare_training(model, opts, channels_last=levers, fused=levers, compile=compile)
    gen = torch.Generator().manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def eager(batch: dict[str, Any]) -> Any:
        return spec.train_step(model, batch, opts, cfg, gen)

    run: Callable[[dict[str, Any]], Any] = GraphedTrainStep(eager, opts, device, warmup=2) if graph else eager

    def step(x: Tensor) -> None:
        if levers:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, cache_enabled=not graph) if dtype else contextlib.nullcontext():
            run({"image": x})
    step.graphed = run if graph else None  # type: ignore[attr-defined]
    return step


def kdad_train_fn(method: str, backbone: str, device: torch.device, precision: str = "fp32",
                  levers: bool = False, compile: bool = False, graph: bool = False) -> Callable[[Tensor], None]:
    """engine_step_fn for the model build_kdad makes (random weights, LAYERS)."""
    model, cfg = build_kdad(method, backbone, device)
    return engine_step_fn(method, model, cfg, device, precision, levers, compile, graph)


def anomalib_train_fn(method: str, backbone: str, device: torch.device) -> Callable[[Tensor], None]:
    model = build_anomalib(method, backbone, device)
    model.train()
    if method == "rd":
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

        loss_fn: nn.Module = ReverseDistillationLoss()
        params = list(model.decoder.parameters()) + list(model.bottleneck.parameters())
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=0.005, betas=(0.5, 0.99))
    else:
        from anomalib.models.image.stfpm.loss import STFPMLoss

        loss_fn = STFPMLoss()
        opt = torch.optim.SGD(model.student_model.parameters(), lr=0.4, momentum=0.9, weight_decay=0.001)

    def step(x: Tensor) -> None:
        feats = model(x)
        loss = loss_fn(*feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # anomalib's training_step logs loss.item() (lightning_model.py of both models): a host sync per step
        loss.item()
    return step


def infer_fn(model: nn.Module, mode: str = "inference_mode") -> Callable[[Tensor], Any]:
    model.eval()
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
           "grad": contextlib.nullcontext}[mode]

    def run(x: Tensor) -> Any:
        with ctx():
            return model(x)
    return run


def ort_fn(model: nn.Module) -> Callable[[Tensor], Any]:
    import onnxruntime as ort

    from kdad.export import export_model_bytes

    graph, _ = export_model_bytes(copy.deepcopy(model).cpu(), SIZE)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.cpu().numpy()})


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[Tensor], Any]], x: Tensor, rounds: int, device: torch.device,
                warmup: int = 1, calls: int = 1) -> dict[str, dict[str, Any]]:
    """img/s per variant: median over `rounds`, each round times every variant (rotating order)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[n](x)
            sync(device)
            times[n].append((time.perf_counter() - t0) / calls)
    b = int(x.shape[0])
    return {n: {"img_s": b / statistics.median(t), "ms_per_img": 1000 * statistics.median(t) / b,
                "samples_s": [round(v, 5) for v in t]} for n, t in times.items()}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM, MiB); unlike ru_maxrss it is not inherited from the parent across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


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


def graph_pool_mib(graph: Any) -> float | None:
    """Memory reserved by a captured CUDA graph's private pool (MiB), from the allocator's segment snapshot."""
    try:
        pool = tuple(graph.pool())
        segs = torch.cuda.memory_snapshot()
        return round(sum(s["total_size"] for s in segs if tuple(s.get("segment_pool_id", ())) == pool) / 2**20, 1)
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return None


def memory_cuda(fn: Callable[[Tensor], Any], x: Tensor) -> dict[str, Any]:
    """Peak allocation growth of one call over the resident memory. A captured training graph keeps its
    activations, gradients and temporaries in its own pool between calls, so for it the growth reported is
    that pool's size (the larger of the two)."""
    fn(x)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out: dict[str, Any] = {"allocated_before_mib": round(base / 2**20, 1), "peak_allocated_mib": round(peak / 2**20, 1),
                           "peak_growth_mib": round((peak - base) / 2**20, 1)}
    graphed = getattr(fn, "graphed", None)
    if graphed is not None and graphed.graph is not None:
        pool = graph_pool_mib(graphed.graph)
        out["graph_pool_mib"] = pool
        out["peak_growth_mib"] = max(out["peak_growth_mib"], pool) if pool is not None else None
    return out


def param_mib(model: nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)


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


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


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
    result: dict[str, Any] = {"meta": {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv[1:], "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "anomalib": __import__("anomalib").__version__ if HAVE_ANOMALIB else None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "loadavg_start": loadavg(),
        "timing": "median over interleaved rounds; img/s = batch / median seconds per call",
        "memory": ("CUDA max_memory_allocated growth over the model's resident memory" if dev.type == "cuda" else
                   "CPU: VmHWM (peak RSS) growth of a fresh process over its RSS after building the model, 2 calls"),
    }, "configs": []}

    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        result = {**old, "meta": {**old.get("meta", {}), "merged_run": result["meta"]}, "configs": old.get("configs", [])}

    def save() -> None:
        result["meta"]["loadavg_end"] = loadavg()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")

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
