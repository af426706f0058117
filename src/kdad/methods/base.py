"""The method contract: what a method module supplies to the shared engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kdad.blocks.maps import AnomalyOutput

# train_step(model, batch, optimizers, cfg, generator) -> scalars to log
TrainStep = Callable[[nn.Module, dict[str, Any], dict[str, torch.optim.Optimizer], Any, torch.Generator], dict[str, float]]
BuildOptimizers = Callable[[nn.Module, Any], dict[str, torch.optim.Optimizer]]
# calibrate(model, normal_loader, device) -> None: fit map statistics on normal images after training
Calibrate = Callable[[nn.Module, Any, torch.device], None]


@dataclass(frozen=True)
class MethodSpec:
    """A method: its Config dataclass, Model class, optimizer factory, train step and paper citation."""

    name: str
    Config: type
    Model: type[nn.Module]
    optimizers: BuildOptimizers
    train_step: TrainStep
    paper: str
    needs_textures: bool = False
    calibrate: Calibrate | None = None  # e.g. DSKD's per-student map mean/std (stored as model buffers)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> dict[str, float]:
    """zero_grad -> backward -> step for a single-optimizer method; returns {"loss": value}."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach())}


__all__ = ["AnomalyOutput", "MethodSpec", "TrainStep", "BuildOptimizers", "optimizer_step"]
