"""model_from_bundle and the resume config check on hand-built bundles (no training)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kdad.checkpoint import model_from_bundle
from kdad.config import load_config, method_config, to_dict
from kdad.errors import ConfigError
from kdad.methods import get_method
from kdad.train import check_resume_config


def _bundle(tmp_path: Path) -> dict[str, Any]:
    """An rd_cpu bundle whose config names a teacher-weights file that no longer exists (moved after training)."""
    cfg = load_config("rd_cpu", [], ["model.weights=random"])
    model = get_method(cfg.method).Model(method_config(cfg))
    stored = to_dict(cfg)
    stored["model"]["weights"] = str(tmp_path / "gone.pt")
    return {"config": stored, "model": model.state_dict()}


def test_model_from_bundle_takes_the_teacher_from_the_state_not_the_weights_file(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    model, cfg = model_from_bundle(bundle)
    assert cfg.model["weights"] == str(tmp_path / "gone.pt") and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, bundle["model"][k]), k


def test_model_from_bundle_refuses_a_state_with_extra_or_missing_keys(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    bundle["model"]["stray.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="stray.weight"):
        model_from_bundle(bundle)
    bundle = _bundle(tmp_path)
    bundle["model"].pop(next(iter(bundle["model"])))
    with pytest.raises(RuntimeError, match="Missing key"):
        model_from_bundle(bundle)


def test_a_bad_stored_config_is_named_as_the_checkpoints(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    bundle["config"]["train"]["bogus_key"] = 1
    with pytest.raises(ConfigError, match=r"^checkpoint config\b.*bogus_key"):
        model_from_bundle(bundle)
    cfg = load_config("rd_cpu", [], [])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'run'))} config\b.*bogus_key"):
        check_resume_config(bundle["config"], cfg, tmp_path / "run")
