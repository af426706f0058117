"""Checkpoint bundles: weights + resolved config + thresholds + kdad version, written atomically.

Bundles hold only tensors and plain Python values, so they load with `torch.load(weights_only=True)`.
The full model state (frozen teacher included) is stored, so a bundle is self-contained: serving or
exporting it never needs the teacher's ImageNet file again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdad import __version__
from kdad.config import RunConfig, build_config, method_config, to_dict
from kdad.errors import KdadError
from kdad.fileio import (  # noqa: F401  (re-exported: their old home)
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
)

FORMAT = 1


def make_bundle(model: nn.Module, cfg: RunConfig, **extra: Any) -> dict[str, Any]:
    """The dict written to disk: format, version, method, config, model state and extras."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "kdad_version": __version__, "method": cfg.method, "config": to_dict(cfg),
            "model": state, **extra}


def load_bundle(path: str | Path) -> dict[str, Any]:
    """Read a bundle with weights_only=True; errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.ckpt"
    if not p.is_file():
        raise KdadError(f"checkpoint not found: {p}")
    try:
        bundle = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise KdadError(f"cannot read checkpoint {p}: {e}") from e
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise KdadError(f"{p} is not a kdad checkpoint (format {FORMAT})")
    return bundle


def model_from_bundle(bundle: dict[str, Any]) -> tuple[nn.Module, RunConfig]:
    """Rebuild the model (teacher built without weights, then the stored state loaded) in eval mode."""
    from kdad.methods import get_method

    cfg = build_config(bundle["config"], where="checkpoint config")
    spec = get_method(cfg.method)
    mcfg = method_config(cfg)
    if hasattr(mcfg, "weights"):
        mcfg = dataclasses.replace(mcfg, weights="random")  # the state loaded below holds the teacher
    model = spec.Model(mcfg)
    model.load_state_dict(bundle["model"], strict=True)
    model.eval()
    return model, cfg
