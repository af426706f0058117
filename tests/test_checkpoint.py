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


class _Payload:
    """Not a tensor, container or number: torch.load(weights_only=True) must refuse to unpickle it."""


def test_load_bundle_refuses_arbitrary_pickles_and_names_what_is_wrong(tmp_path: Path) -> None:
    from kdad.checkpoint import FORMAT, load_bundle
    from kdad.errors import KdadError

    hostile = tmp_path / "hostile.ckpt"
    torch.save({"format": FORMAT, "model": {}, "x": _Payload()}, hostile)
    with pytest.raises(KdadError, match=rf"^cannot read checkpoint {re.escape(str(hostile))}: "):
        load_bundle(hostile)  # weights_only: a checkpoint from elsewhere cannot run code while loading
    for name, obj in (("list.ckpt", [1, 2]), ("other.ckpt", {"format": FORMAT + 1}), ("none.ckpt", {})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(KdadError) as err:
            load_bundle(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name} is not a kdad checkpoint (format {FORMAT})"
    with pytest.raises(KdadError) as err:
        load_bundle(tmp_path / "missing")
    assert str(err.value) == f"checkpoint not found: {tmp_path / 'missing'}"


def test_make_bundle_records_format_version_method_and_config(tmp_path: Path) -> None:
    from kdad import __version__
    from kdad.checkpoint import FORMAT, make_bundle

    cfg = load_config("rd_cpu", [], ["model.weights=random"])
    model = get_method(cfg.method).Model(method_config(cfg))
    b = make_bundle(model, cfg, thresholds={"image": 1.0})
    assert (b["format"], b["kdad_version"], b["method"], b["thresholds"]) == (FORMAT, __version__, "rd",
                                                                              {"image": 1.0})
    assert b["config"] == to_dict(cfg) and set(b["model"]) == set(model.state_dict())


def test_resume_refusal_lists_the_changes_and_says_how_to_resume(tmp_path: Path) -> None:
    stored = to_dict(load_config("rd_cpu", [], []))
    cfg = load_config("rd_cpu", [], ["model.lr=0.5", "train.epochs=99"])  # lr is refused, epochs may change
    where = tmp_path / "run" / "last.ckpt"
    with pytest.raises(ConfigError) as err:
        check_resume_config(stored, cfg, where)
    assert str(err.value) == (
        f"cannot resume {where}: the config differs from the one it was trained with (model.lr: "
        f"{stored['model']['lr']!r} -> 0.5). --resume continues the saved run unchanged: the method, model "
        "(architecture and optimizer settings such as lr, which the saved optimizer state keeps), data, seed, "
        "split, batch size and selection must match; it may change only the budget, device, speed levers and "
        "bookkeeping (kdad.train.RESUMABLE_KEYS, docs/design.md). Resume with the run's own config "
        f"(-c {tmp_path / 'run' / 'config.yaml'}) or train into a new --out")


def test_resume_without_training_state_names_the_file(tmp_path: Path) -> None:
    from kdad.checkpoint import FORMAT
    from kdad.errors import KdadError
    from kdad.train import _load_resume

    run = tmp_path / "run"
    run.mkdir()
    assert _load_resume(run, load_config("rd_cpu", [], [])) is None  # nothing to resume
    torch.save({"format": FORMAT, "config": to_dict(load_config("rd_cpu", [], []))}, run / "last.ckpt")
    with pytest.raises(KdadError) as err:
        _load_resume(run, load_config("rd_cpu", [], []))
    assert str(err.value) == f"{run / 'last.ckpt'} has no training state to resume from"


def test_training_state_keeps_the_grad_scaler_only_when_there_is_one() -> None:
    from kdad.train import _state

    class Scaler:
        def state_dict(self) -> dict[str, float]:
            return {"scale": 1024.0}

    gen = torch.Generator().manual_seed(0)
    with_scaler = _state({}, 2, 7, {"x": 1}, gen, Scaler())
    assert with_scaler["grad_scaler"] == {"scale": 1024.0}
    assert (with_scaler["epoch"], with_scaler["iters"], with_scaler["best"]) == (2, 7, {"x": 1})
    assert "grad_scaler" not in _state({}, 2, 7, {}, gen)


def test_trim_log_keeps_epochs_up_to_the_checkpoint_and_skips_only_broken_lines(tmp_path: Path) -> None:
    import json

    from kdad.train import trim_log

    log = tmp_path / "train_log.jsonl"
    trim_log(log, 3)  # no log yet: nothing happens
    assert not log.exists()
    lines = [json.dumps({"epoch": 1}), '{"epoch": 2, "lo', json.dumps({"note": "no epoch"}), json.dumps({"epoch": 2}),
             json.dumps({"epoch": 3}), json.dumps({"epoch": 4})]
    log.write_text("\n".join(lines) + "\n")
    trim_log(log, 3)
    assert log.read_text() == "".join(line + "\n" for line in (lines[0], lines[3], lines[4]))
    before = log.stat().st_mtime_ns
    trim_log(log, 3)  # already trimmed: not rewritten
    assert log.stat().st_mtime_ns == before and log.read_text().count("\n") == 3
