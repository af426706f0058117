"""Multi-GPU data parallelism under torchrun, without the engine branching on the method.

Methods own their backward and optimizer steps, so instead of wrapping the model in DDP's forward hook the
engine wraps each optimizer: before `step()` the gradients of its parameters are averaged across ranks
(all-reduce), which is what DDP computes. Parameters start identical because every rank builds the model
from the same seed, and the initial state is broadcast from rank 0 to be sure.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> bool:
    """Initialise the process group when WORLD_SIZE > 1; return whether distributed is active."""
    _, _, size = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


class AllReduceOptimizer:
    """Wraps an optimizer: averages grads across ranks before each step (DDP's gradient semantics)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self, *args: Any, **kwargs: Any) -> Any:
        size = dist.get_world_size()
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(size)
        return self.opt.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.opt, name)
