"""The method contract: what a method module supplies to the shared engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from kdad.blocks.maps import AnomalyOutput

# The signatures below are documented, not checked: each method types them with its own Model and Config
# (Callable parameters are contravariant, so a precise type here would reject every method).
# train_step(model, batch, optimizers, cfg, generator) -> scalars to log: floats, or 0-dim tensors that the
# engine reads when it logs (so a step need not wait for the device)
TrainStep = Callable[..., Mapping[str, float | torch.Tensor]]
# optimizers(model, cfg) -> {name: optimizer}
BuildOptimizers = Callable[..., dict[str, torch.optim.Optimizer]]
# calibrate(model, normal_loader, device) -> None: fit map statistics on normal images after training
Calibrate = Callable[..., None]


@runtime_checkable
class Model(Protocol):
    """What the shared code reads from a method's Model (an nn.Module), and nothing more.

    - ``forward(images)``: images in [0, 1] (B, 3, H, W) -> AnomalyOutput; the one inference path (evaluation,
      export, the fast path and the service all call it).
    - ``pairs(images)``: what the method's loss compares (teacher and student features).
    - ``teacher`` or ``encoder``: the teacher network (a kdad.blocks.teachers.Encoder, whose ``mean``/``std``
      normalisation is part of the graph); read it with :func:`teacher_of`, never by attribute name.
    """

    def __call__(self, images: Tensor) -> AnomalyOutput: ...

    def pairs(self, images: Tensor) -> Any: ...


def teacher_of(model: nn.Module) -> nn.Module | None:
    """The teacher network of a method's Model: ``model.teacher`` (URD, CFRG) or ``model.encoder`` (the others).

    Export reads its ``mean``/``std`` for the ONNX metadata; None for a model without a teacher.
    """
    for name in ("teacher", "encoder"):
        found = getattr(model, name, None)
        if isinstance(found, nn.Module):
            return found
    return None


@dataclass(frozen=True)
class MethodSpec:
    """A method: its Config dataclass, Model class, optimizer factory, train step and paper citation."""

    name: str
    Config: type
    Model: type[nn.Module]
    optimizers: BuildOptimizers
    train_step: TrainStep
    paper: str
    # the method synthesises anomalies from data.texture_dir; a function of the method's Config when only some
    # settings do (PatchST's denoise)
    needs_textures: bool | Callable[[Any], bool] = False
    calibrate: Calibrate | None = None  # e.g. DSKD's per-student map mean/std (stored as model buffers)
    # whether `calibrate` has work for a run with method config mcfg (RD's map_norm "none" has none): fit then
    # neither calls it nor cross-fits the image threshold
    calibrates: bool | Callable[[Any], bool] = True
    # prepare(model, training_loader, device): statistics the loss needs before the first step (e.g. PatchST's
    # target standardisation); run by fit on a new run only, since a resumed run restores them from its buffers
    prepare: Calibrate | None = None
    # train_step has no host sync, no data-dependent shape and a constant learning rate, and logs only tensors,
    # so train.cuda_graph may capture it whole (kdad.speed.GraphedTrainStep)
    graph_safe: bool = False
    # train_step takes batch["grad_scaler"] (fp16 autocast, train.amp_dtype=fp16): scaled backward, scaler step
    grad_scaler: bool = False


def runs_calibration(spec: MethodSpec, mcfg: Any) -> bool:
    """Whether fit calls ``spec.calibrate`` for a run with method config ``mcfg``."""
    if spec.calibrate is None:
        return False
    return bool(spec.calibrates(mcfg) if callable(spec.calibrates) else spec.calibrates)


def uses_position_norm(mcfg: Any) -> bool:
    """``calibrates`` of the methods whose head takes ``model.map_norm`` (kdad.blocks.maps.PositionNorm)."""
    return getattr(mcfg, "map_norm", "none") == "position"


def uses_textures(spec: MethodSpec, mcfg: Any) -> bool:
    """Whether a run of ``spec`` with method config ``mcfg`` needs data.texture_dir."""
    return bool(spec.needs_textures(mcfg) if callable(spec.needs_textures) else spec.needs_textures)


def backward(batch: dict[str, Any], loss: torch.Tensor) -> None:
    """``loss.backward()``, through the engine's ``batch["backward"]`` when it gives one: distributed training
    arms DDP's gradient all-reduce there (kdad.distributed). Methods call this instead of ``loss.backward()``."""
    fn = batch.get("backward")
    if fn is None:
        loss.backward()
    else:
        fn(loss)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler: Any = None,
                   backward_fn: Callable[[torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
    """zero_grad -> backward -> step for a single-optimizer method; returns {"loss": detached 0-dim tensor}.

    The loss stays on the device: reading it here would make every step wait for the GPU to finish.
    With a GradScaler (fp16 autocast, from batch["grad_scaler"]) the loss is scaled and the step skipped on
    inf/nan gradients, as torch.cuda.amp. ``backward_fn`` is the engine's batch["backward"] (see :func:`backward`).
    """
    run_backward = backward_fn or torch.Tensor.backward
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        run_backward(loss)
        opt.step()
    else:
        run_backward(scaler.scale(loss))
        scaler.step(opt)
        scaler.update()
    return {"loss": loss.detach()}


__all__ = ["AnomalyOutput", "BuildOptimizers", "MethodSpec", "Model", "TrainStep", "backward", "optimizer_step",
           "runs_calibration", "teacher_of", "uses_position_norm", "uses_textures"]
