"""The inference fast path: one call turns a trained model into a fast inference callable.

``optimize_for_inference(model, device, precision)`` returns ``FastInference``: images in [0, 1],
(B, 3, H, W) -> ``AnomalyOutput`` (float32 map (B, 1, H, W), score (B,)), the same contract as
``model.forward``. Levers, each measured in benchmarks/vs_anomalib.py (docs/benchmarks.md):

- ``torch.inference_mode`` (no autograd bookkeeping);
- eval BatchNorm folded into the preceding convolution (exact up to fp32 rounding; each fold is checked
  on its layer and the whole map once more, and each replaced weight is freed at once, so folding needs
  no second copy of the weights);
- ``FastAnomalyMapHead``: distances from channel sums, resize + fuse + Gaussian blur as small matrix
  products (mathematically the same map);
- channels_last memory format (oneDNN / cuDNN NHWC kernels);
- precision "bf16" (or "fp16" on CUDA): autocast for the network; the anomaly-map head stays fp32;
- ``compile=True``: ``torch.compile`` of the result (first calls compile), with inductor's weight freezing
  (``freeze=True``): the copy's weights become constants of the compiled graph, folded and prepacked for
  oneDNN / cuDNN (on this CPU batch-1 calls ran 1.3-1.6x faster than with compile alone);
- ``cuda_graph=True`` (CUDA only): each input shape is captured once as a CUDA graph and replayed, which
  removes the per-kernel launch cost that dominates small batches (outputs are copied out of the graph).

With precision="fp32" maps equal eager ``model(images)`` within 1e-5 (tests/test_speed.py). bf16 maps
differ by up to ~1e-2 of a map's range; tests/test_speed.py bounds that, and benchmarks record the
image AUROC cost. The default inference path (``model.forward`` in eager fp32) is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdad.blocks.maps import AnomalyMapHead, AnomalyOutput, FastAnomalyMapHead
from kdad.errors import ConfigError, KdadError
from kdad.hardware import release_heap, warn_if_slow_cpu_bf16

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


class FoldError(KdadError):
    """Folding BatchNorm into the convolutions changed the anomaly map beyond the tolerance."""


def _fold_into(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Scale conv's output channels and shift its bias so that conv' = bn(conv) (bn in eval mode)."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale + (bn.bias.double() if bn.bias is not None else 0.0)
    weight: Tensor = conv.weight.double()
    if isinstance(conv, nn.ConvTranspose2d):  # (in, out / groups, kh, kw); only groups == 1 reaches here
        weight = weight * scale.view(1, -1, 1, 1)
    else:  # (out, in / groups, kh, kw)
        weight = weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)


def _bn_replacement(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded BN: nothing, or timm BatchNormAct2d's dropout + activation."""
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[nn.Module, str, nn.BatchNorm2d, tuple[int, ...]]]:
    """(conv, bn name, bn, conv input shape without batch) where every call of bn reads the output of the
    same conv."""
    # Weak references: keeping every conv output alive cost the whole forward's activations at once (+660
    # MiB RSS for RD-WRN50 at 256). A reused id is harmless: its weak reference is then dead or another object.
    produced: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
    seen: dict[str, set[str]] = {}
    in_shape: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def conv_hook(mod: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            produced[id(out)] = (names[mod], weakref.ref(out))
            if inp and isinstance(inp[0], Tensor):
                in_shape[names[mod]] = tuple(inp[0].shape[1:])

    def bn_hook(mod: nn.Module, inp: Any) -> None:
        src = produced.get(id(inp[0])) if inp and isinstance(inp[0], Tensor) else None
        seen.setdefault(names[mod], set()).add(src[0] if src is not None and src[1]() is inp[0] else "")

    for mod in model.modules():
        if isinstance(mod, _CONVS):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.BatchNorm2d):
            handles.append(mod.register_forward_pre_hook(bn_hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    by_conv: dict[str, list[str]] = {}
    for bn_name, sources in seen.items():
        if len(sources) == 1 and "" not in sources:
            by_conv.setdefault(next(iter(sources)), []).append(bn_name)
    pairs = []
    for conv_name, bns in by_conv.items():
        conv, bn = modules[conv_name], modules[bns[0]]
        groups = getattr(conv, "groups", 1)
        if len(bns) == 1 and bn.track_running_stats and not (isinstance(conv, nn.ConvTranspose2d) and groups != 1):
            pairs.append((conv, bns[0], bn, in_shape[conv_name]))  # type: ignore[arg-type]
    return pairs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _fold_pair(conv: nn.Module, bn: nn.BatchNorm2d, in_shape: tuple[int, ...], atol: float,
               gen: torch.Generator) -> nn.Module | None:
    """Fold bn into conv if that keeps bn(conv(z)) within atol (relative to its range) on a random z of the
    conv's input shape; returns what replaces bn, or None (conv unchanged). Checking pair by pair lets each
    old weight go at once: holding them all for a model-wide undo doubled the weights' memory."""
    z = torch.randn((1, *in_shape), generator=gen).to(conv.weight.device, conv.weight.dtype)  # type: ignore[union-attr,arg-type]
    with torch.inference_mode():
        ref = bn(conv(z))
    weight, bias = conv.weight, conv.bias
    _fold_into(conv, bn)  # type: ignore[arg-type]
    replacement = _bn_replacement(bn)
    with torch.inference_mode():
        new = replacement(conv(z))
    scale = float(ref.abs().max().clamp_min(1e-6))
    if torch.allclose(new.float(), ref.float(), atol=atol * scale, rtol=0.0):
        return replacement
    conv.weight, conv.bias = weight, bias  # type: ignore[assignment]
    return None


def fold_batchnorm(model: nn.Module, example: Tensor, atol: float = 1e-4) -> int:
    """Fold eval-mode BatchNorm2d layers into the convolution that feeds them, in place; returns the count.

    Pairs are found by running `example` (B, 3, H, W) in [0, 1] once. Each fold is kept only if that layer's
    output still matches within `atol` relative to its range, and at the end the anomaly map must match
    within `atol` relative to the map's range, else KdadError (the folds are not undone: that would need
    every old weight kept; optimize_for_inference then starts again from an unfolded copy).
    Only for inference: folded BNs are gone, so the state dict no longer fits a checkpoint.
    """
    model.eval()
    with torch.inference_mode():
        ref = model(example).anomaly_map.float()
    gen = torch.Generator().manual_seed(0)
    folded = 0
    for conv, bn_name, bn, in_shape in _conv_bn_pairs(model, example):
        replacement = _fold_pair(conv, bn, in_shape, atol, gen)
        if replacement is not None:
            _set_submodule(model, bn_name, replacement)
            folded += 1
    if folded:
        with torch.inference_mode():
            new = model(example).anomaly_map.float()
        err = float((new - ref).abs().max()) / float(ref.abs().max().clamp_min(1e-6))
        if not err <= atol:
            raise FoldError(f"folding {folded} BatchNorm layers changed the anomaly map by {err:.2e} of its "
                            f"range (> atol {atol:g}); use fold_bn=False")
    return folded


_MATMUL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store conv / linear weights in `dtype` once, outside the anomaly-map heads; returns the layer count.

    Under autocast these are the layers whose weights would otherwise be cast again on every call (autocast's
    cache lives for one context only): for WRN50-2 that is ~270 MB read per forward. Autocast stays on, so
    layers that receive float32 inputs still run in `dtype`; BatchNorm and the heads keep float32.
    """
    heads = {id(m) for h in model.modules() if isinstance(h, AnomalyMapHead | FastAnomalyMapHead) for m in h.modules()}
    count = 0
    for mod in model.modules():
        if isinstance(mod, _MATMUL_LAYERS) and id(mod) not in heads:
            mod.to(dtype)
            count += 1
    return count


def use_fast_heads(model: nn.Module) -> int:
    """Replace every AnomalyMapHead submodule by an equivalent FastAnomalyMapHead, in place; returns the count."""
    names = [n for n, m in model.named_modules() if type(m) is AnomalyMapHead and n]
    for name in names:
        _set_submodule(model, name, FastAnomalyMapHead.from_head(model.get_submodule(name)))  # type: ignore[arg-type]
    return len(names)


@contextlib.contextmanager
def side_stream(stream: Any, device: torch.device) -> Iterator[None]:
    """Run the block on `stream`, ordered after and before the device's current stream. Warm-up work before a
    CUDA graph capture must run off the current stream (cuDNN autotuning, lazy allocations)."""
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class FastInference:
    """Callable images01 (B, 3, H, W) in [0, 1] -> AnomalyOutput with float32 map and score."""

    def __init__(self, module: nn.Module, device: torch.device, precision: str, channels_last: bool,
                 compiled: Any = None, cuda_graph: bool = False, freeze: bool = False) -> None:
        self.module = module
        self.freeze = freeze and compiled is not None
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self._fn = compiled if compiled is not None else module
        self._graphs: dict[tuple[Any, ...], tuple[Any, Tensor, AnomalyOutput]] = {}
        self._pool: Any = None
        self._lock = threading.Lock()
        self.info: dict[str, Any] = {}

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.freeze:  # dynamo reads it while it traces a call: weights become graph constants
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
            if self.precision != "fp32":  # a captured graph must not reuse autocast's weight-cast cache
                stack.enter_context(torch.autocast(self.device.type, dtype=_DTYPES[self.precision],
                                                   cache_enabled=not self.cuda_graph))
            yield

    def _replay(self, x: Tensor) -> AnomalyOutput:
        """Run x through the CUDA graph captured for its shape (captured on first sight of the shape)."""
        key = (tuple(x.shape), x.dtype, self.channels_last)
        if key not in self._graphs:
            static_in = x.clone()
            with side_stream(torch.cuda.Stream(self.device), self.device):
                for _ in range(2):
                    self._fn(static_in)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool shared by all captured shapes
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._fn(static_in)
                    static_out = AnomalyOutput(out.anomaly_map.float(), out.score.float())
            except RuntimeError as e:  # a model that syncs with the host cannot be captured: run it eagerly
                warnings.warn(f"CUDA graph capture failed, running eagerly: {e}", RuntimeWarning, stacklevel=3)
                self.cuda_graph = False
                out = self._fn(x)
                return AnomalyOutput(out.anomaly_map.float(), out.score.float())
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return AnomalyOutput(static_out.anomaly_map.clone(), static_out.score.clone())

    def __call__(self, images01: Tensor) -> AnomalyOutput:
        with self._context():
            x = images01.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.cuda_graph:
                with self._lock:  # the captured graph reads and writes fixed buffers: one replay at a time
                    return self._replay(x)
            out = self._fn(x)
            return AnomalyOutput(out.anomaly_map.float(), out.score.float())


def optimize_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    fold_bn: bool = True,
    fast_head: bool = True,
    inplace: bool = False,
    image_size: int = 256,
    cuda_graph: bool = False,
    freeze: bool = True,
) -> FastInference:
    """A fast inference callable for a kdad model (any METHODS entry).

    precision: "fp32" (maps within 1e-5 of eager), "bf16" (autocast; CPU with AVX-512 BF16/AMX, or CUDA)
    or "fp16" (CUDA autocast). inplace=False works on a deep copy, so `model` stays trainable and
    checkpointable; inplace=True saves the copy's memory but folds BatchNorm inside `model`.
    image_size: side of the example used to find conv->BN pairs. cuda_graph: replay captured CUDA graphs
    (CUDA only; one capture per input shape, so serve fixed batch sizes). freeze (with compile): compile the
    weights in as constants; they are a snapshot, so with inplace=True do not train `model` afterwards.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"precision 'fp16' needs a CUDA device, got {dev}; use 'bf16' or 'fp32' on {dev.type}")
    if cuda_graph and dev.type != "cuda":
        raise ConfigError(f"cuda_graph=True needs a CUDA device, got {dev}")
    if precision == "bf16" and dev.type == "cpu":
        warn_if_slow_cpu_bf16("precision 'bf16'")
    net = model if inplace else copy.deepcopy(model)
    net.eval().to(dev)
    info: dict[str, Any] = {"precision": precision, "channels_last": channels_last, "compile": compile,
                            "freeze": compile and freeze, "cuda_graph": cuda_graph}
    if fold_bn:
        example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(dev)
        try:
            info["folded_bn"] = fold_batchnorm(net, example)
        except FoldError as e:
            if inplace:  # `model` itself is partly folded now: say so and how to avoid it
                raise FoldError(f"{e} (the model passed with inplace=True is partly folded; load it again)") from e
            net = copy.deepcopy(model).eval().to(dev)  # start again from the caller's model, unfolded
            info["folded_bn"], info["fold_error"] = 0, str(e)
    if fast_head:  # after the fold, so that starting again from an unfolded copy needs no second swap
        info["fast_heads"] = use_fast_heads(net)
    if channels_last:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if precision in _DTYPES:
        info["low_precision_weights"] = cast_matmul_weights(net, _DTYPES[precision])
    net.requires_grad_(False)
    release_heap()  # the example passes and the replaced weights leave freed memory in glibc's heap
    compiled = torch.compile(net, dynamic=False) if compile else None
    fast = FastInference(net, dev, precision, channels_last, compiled, cuda_graph, freeze)
    fast.info = info
    return fast


__all__ = ["PRECISIONS", "FastInference", "FoldError", "Precision", "cast_matmul_weights", "fold_batchnorm",
           "optimize_for_inference", "use_fast_heads"]
