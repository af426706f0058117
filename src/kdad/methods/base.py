"""The method contract: what a method module supplies to the shared engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kdad.blocks.maps import AnomalyOutput

# train_step(model, batch, optimizers, cfg, generator) -> scalars to log: floats, or 0-dim tensors that the
# engine reads when it logs (so a step need not wait for the device)
TrainStep = Callable[[nn.Module, dict[str, Any], dict[str, torch.optim.Optimizer], Any, torch.Generator],
                     dict[str, float | torch.Tensor]]
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
    # prepare(model, training_loader, device): statistics the loss needs before the first step (e.g. PatchST's
    # target standardisation); run by fit on a new run only, since a resumed run restores them from its buffers
    prepare: Calibrate | None = None
    # train_step has no host sync, no data-dependent shape and a constant learning rate, and logs only tensors,
    # so train.cuda_graph may capture it whole (kdad.speed.GraphedTrainStep)
    graph_safe: bool = False
    # train_step takes batch["grad_scaler"] (fp16 autocast, train.amp_dtype=fp16): scaled backward, scaler step
    grad_scaler: bool = False


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler: Any = None) -> dict[str, torch.Tensor]:
    """zero_grad -> backward -> step for a single-optimizer method; returns {"loss": detached 0-dim tensor}.

    The loss stays on the device: reading it here would make every step wait for the GPU to finish.
    With a GradScaler (fp16 autocast, from batch["grad_scaler"]) the loss is scaled and the step skipped on
    inf/nan gradients, as torch.cuda.amp.
    """
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return {"loss": loss.detach()}


__all__ = ["AnomalyOutput", "MethodSpec", "TrainStep", "BuildOptimizers", "optimizer_step"]
