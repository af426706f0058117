"""Every registered method: build -> train_step -> forward on a tiny CPU config."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from kdad.config import from_dict
from kdad.methods import METHODS, get_method

TINY = {"backbone": "resnet18", "weights": "random"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_train_step_and_forward(name: str) -> None:
    spec = get_method(name)
    cfg = from_dict(spec.Config, TINY)
    torch.manual_seed(0)
    model = spec.Model(cfg)
    opts = spec.optimizers(model, cfg)
    model.train()
    images = torch.rand(2, 3, 64, 64)
    logs = spec.train_step(model, {"image": images, "mask": torch.zeros(2, 1, 64, 64)}, opts, cfg,
                           torch.Generator().manual_seed(0))
    assert logs and all(math.isfinite(float(v)) for v in logs.values())
    model.eval()
    with torch.inference_mode():
        out = model(images)
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    assert out.score.shape == (2,)
    assert torch.allclose(out.score, out.anomaly_map.flatten(1).amax(1))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_train_step_moves_every_optimizer(name: str, tiny_batch: dict[str, torch.Tensor]) -> None:
    """One optimizer step changes trainable parameters of each of the method's optimizers (RD++ steps every
    `accumulate` batches, so it runs with accumulate=1 here)."""
    spec = get_method(name)
    overrides = {"accumulate": 1} if "accumulate" in {f.name for f in dataclasses.fields(spec.Config)} else {}
    cfg = from_dict(spec.Config, {**TINY, **overrides})
    torch.manual_seed(0)
    model = spec.Model(cfg)
    opts = spec.optimizers(model, cfg)
    model.train()
    before = {id(p): p.detach().clone() for p in model.parameters() if p.requires_grad}
    spec.train_step(model, tiny_batch, opts, cfg, torch.Generator().manual_seed(0))
    moved = {id(p) for p in model.parameters() if id(p) in before and not torch.equal(before[id(p)], p.detach())}
    for opt_name, opt in opts.items():
        owned = {id(p) for group in opt.param_groups for p in group["params"]}
        assert owned <= set(before), f"{name}/{opt_name} optimizes a frozen parameter"
        assert owned & moved, f"{name}/{opt_name}: no parameter moved after one step"
    assert len(moved) > len(before) / 2, f"{name}: only {len(moved)} of {len(before)} trainable parameters moved"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_same_map(name: str) -> None:
    spec = get_method(name)
    cfg = from_dict(spec.Config, TINY)
    maps = []
    for _ in range(2):
        torch.manual_seed(3)
        model = spec.Model(cfg)
        opts = spec.optimizers(model, cfg)
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        batch = {"image": x, "mask": torch.zeros(2, 1, 64, 64)}
        spec.train_step(model, batch, opts, cfg, torch.Generator().manual_seed(0))
        model.eval()
        with torch.inference_mode():
            maps.append(model(x).anomaly_map)
    assert torch.equal(maps[0], maps[1])


def test_teacher_stays_frozen_during_training() -> None:
    spec = get_method("rd")
    cfg = from_dict(spec.Config, TINY)
    model = spec.Model(cfg)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opts = spec.optimizers(model, cfg)
    model.train()
    spec.train_step(model, {"image": torch.rand(2, 3, 64, 64)}, opts, cfg, torch.Generator())
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(before[k], v), k


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_reads_the_teacher_normalisation(name: str) -> None:
    """URD and CFRG call their teacher `teacher`, the others `encoder`: the ONNX contract finds both."""
    from kdad.export import input_contract
    from kdad.methods.base import Model, teacher_of

    spec = get_method(name)
    model = spec.Model(from_dict(spec.Config, TINY))
    assert isinstance(model, Model)
    teacher = teacher_of(model)
    assert teacher is not None
    assert input_contract(64, model)["normalization_in_graph"] == {"mean": list(teacher.mean),
                                                                   "std": list(teacher.std)}


def test_methods_backpropagate_through_the_engine_hook() -> None:
    """A bare `loss.backward()` in a method would skip DDP's all-reduce under torchrun and let the ranks drift
    apart: methods call kdad.methods.base.backward (or optimizer_step), which runs the engine's batch["backward"]."""
    import kdad.methods

    for path in sorted(Path(kdad.methods.__file__).parent.glob("*.py")):
        if path.name != "base.py":
            assert ".backward()" not in path.read_text(), path.name
