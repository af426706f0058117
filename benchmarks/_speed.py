"""Timing and memory helpers shared by the speed benchmarks (vs_anomalib, methods_speed, train_profile,
alloc_peak): model builders for kdad and anomalib on the same layers and input, train/infer step closures,
interleaved timing rounds and memory probes.

anomalib is optional (``HAVE_ANOMALIB``); its builders import it only when called.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdad.methods import get_method
from kdad.speed import GraphedTrainStep, prepare_training

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
