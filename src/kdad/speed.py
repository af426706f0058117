"""Training speed levers: the engine's memory-format, fused-optimizer and torch.compile levers
(``prepare_training``) and CUDA-graph replay of a training step (``GraphedTrainStep``).

The inference fast path (``optimize_for_inference``) lives in kdad.deploy.fast and the machine facts
(hardware bf16, glibc's heap) in kdad.hardware; both are re-exported here, their old home.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdad.deploy.fast import (  # noqa: F401  (re-exported: their old home)
    PRECISIONS,
    FastInference,
    FoldError,
    Precision,
    cast_matmul_weights,
    fold_batchnorm,
    optimize_for_inference,
    side_stream,
    use_fast_heads,
)
from kdad.errors import ConfigError, KdadError
from kdad.hardware import cpu_has_fast_bf16, heap_allocator, warn_if_slow_cpu_bf16  # noqa: F401


def _fused_supported(opt: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether this optimizer class has a fused kernel for `device` (asked through its public constructor)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        type(opt)([probe], lr=1e-3, fused=True)  # type: ignore[call-arg]
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


def use_fused_optimizers(opts: dict[str, torch.optim.Optimizer]) -> int:
    """Switch each optimizer to its fused kernel (one kernel per step, not one per tensor) where torch has one.

    Same update rule (Adam/AdamW/SGD); tests/test_speed.py compares it with the default path. Must run before
    the first step or a state load; returns how many optimizers were switched.
    """
    switched = 0
    for opt in opts.values():
        params = [p for g in opt.param_groups for p in g["params"]]
        if not params or opt.state or "fused" not in opt.defaults:
            continue
        if any(not p.is_floating_point() for p in params) or len({p.device for p in params}) != 1:
            continue
        if opt.defaults.get("differentiable", False):  # fused kernels do not support it
            continue
        if not _fused_supported(opt, params[0].device):
            continue
        for group in [opt.defaults, *opt.param_groups]:
            group["fused"], group["foreach"] = True, False
        switched += 1
    return switched


def prepare_training(model: nn.Module, opts: dict[str, torch.optim.Optimizer], channels_last: bool,
                     fused: bool, compile: bool = False) -> dict[str, Any]:
    """Training levers, in place: NHWC weights (the engine also feeds NHWC batches), fused optimizers and
    ``torch.compile`` of each top-level submodule (``Module.compile`` keeps state-dict names, so checkpoints
    are unchanged; the first steps pay the compile time). Measured in benchmarks/vs_anomalib.py.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    compiled = 0
    if compile:
        for child in model.children():
            child.compile()
            compiled += 1
    return {"channels_last": channels_last, "fused_optimizers": use_fused_optimizers(opts) if fused else 0,
            "compiled_modules": compiled}


def _tensor_signature(batch: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...], torch.dtype, bool], ...]:
    return tuple((k, tuple(v.shape), v.dtype, v.is_contiguous(memory_format=torch.channels_last))
                 for k, v in sorted(batch.items()) if isinstance(v, Tensor))


class GraphedTrainStep:
    """A method's whole training step (forward, backward, optimizer steps) replayed as one CUDA graph.

    ``step(batch) -> logs`` must be graph-safe (``MethodSpec.graph_safe``): no host sync, fixed shapes, a
    constant learning rate, tensor logs. The first ``warmup`` calls run eagerly on a side stream: they are real
    steps on real batches, where cuDNN autotuning and the optimizers' lazy state happen. The next call
    captures the step and replays it once for its own batch, so training takes exactly the steps eager
    training takes. Later calls copy their batch into the captured input buffers and replay; a batch with
    other shapes or keys runs eagerly (fit() drops the last partial batch, so none does). Adam-like
    optimizers are switched to ``capturable=True`` (their step counters already live on the device when
    fused). Autocast around the call must have ``cache_enabled=False``: a cast cached at capture would be
    stale at replay. Returned logs are copies, valid after the next replay.
    """

    def __init__(self, step: Callable[[dict[str, Any]], dict[str, Any]], opts: dict[str, torch.optim.Optimizer],
                 device: torch.device, warmup: int = 3) -> None:
        if device.type != "cuda":
            raise ConfigError(f"train.cuda_graph needs a CUDA device, got {device}")
        if warmup < 1:  # optimizers create their state on the first step, which a capture cannot do
            raise ConfigError(f"GraphedTrainStep needs warmup >= 1 eager step, got {warmup}")
        self.step, self.device, self.warmup = step, device, warmup
        self._stream = torch.cuda.Stream(device)  # warm-up and capture share one stream (per-stream BLAS state)
        for opt in opts.values():
            if "capturable" in opt.defaults:
                for group in [opt.defaults, *opt.param_groups]:
                    group["capturable"] = True
                for state in opt.state.values():  # resumed unfused state keeps its step counter on the host
                    if isinstance(state.get("step"), Tensor):
                        state["step"] = state["step"].to(device)
        self.graph: Any = None
        self.captures = 0
        self.eager_calls = 0  # before the capture, these are the warm-up steps
        self._sig: Any = None
        self._static: dict[str, Tensor] = {}
        self._logs: dict[str, Tensor] = {}

    def _eager(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.eager_calls += 1
        with warnings.catch_warnings(), side_stream(self._stream, self.device):
            warnings.filterwarnings("ignore", message=".*capturable=True.*")  # eager steps of a captured run
            return self.step(batch)

    def _capture(self, batch: dict[str, Any]) -> dict[str, Any]:
        self._static = {k: v.clone() for k, v in batch.items() if isinstance(v, Tensor)}
        graph = torch.cuda.CUDAGraph()
        # thread_local: DataLoader's pin-memory thread may allocate pinned memory while this thread captures
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            logs = self.step({**batch, **self._static})
        bad = [k for k, v in logs.items() if not isinstance(v, Tensor)]
        if bad:
            raise KdadError(f"train step logs {bad} as host values, which a CUDA graph would freeze: "
                            "it is not graph-safe (set train.cuda_graph=false)")
        self.graph, self._logs, self.captures = graph, logs, self.captures + 1
        return self._replay(batch)

    def _replay(self, batch: dict[str, Any]) -> dict[str, Any]:
        for k, buf in self._static.items():
            buf.copy_(batch[k], non_blocking=True)
        self.graph.replay()
        return {k: v.clone() for k, v in self._logs.items()}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        sig = _tensor_signature(batch)
        if self.graph is not None:
            return self._replay(batch) if sig == self._sig else self._eager(batch)
        if self.eager_calls < self.warmup:
            return self._eager(batch)
        self._sig = sig
        try:
            return self._capture(batch)
        except RuntimeError as e:  # an op that syncs with the host, or another capture limit
            raise KdadError(f"CUDA graph capture of the training step failed ({e}); set train.cuda_graph=false") from e


__all__ = ["PRECISIONS", "FastInference", "GraphedTrainStep", "Precision", "fold_batchnorm", "heap_allocator",
           "optimize_for_inference", "prepare_training", "use_fast_heads", "use_fused_optimizers"]
