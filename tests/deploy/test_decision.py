"""`kdad predict`'s image decision: a score exactly on the threshold is anomalous (s >= thr, as the masks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdad.checkpoint import atomic_torch_save, make_bundle
from kdad.cli import main
from kdad.config import load_config, method_config
from kdad.methods import get_method


def _tiny_run(tmp_path: Path) -> Path:
    cfg = load_config(None, None, ["method=rd", "model.backbone=resnet18", "model.weights=random",
                                   "data.image_size=32"])
    torch.manual_seed(0)
    model = get_method("rd").Model(method_config(cfg)).eval()
    run = tmp_path / "run"
    atomic_torch_save(make_bundle(model, cfg), run / "model.ckpt")  # no stored thresholds
    return run


def _predict(run: Path, images: Path, out: Path, *extra: str) -> dict[str, dict]:
    assert main(["predict", str(run), str(images), "--out", str(out), "--batch-size", "4", *extra]) == 0
    return {Path(r["path"]).name: r for r in json.loads((out / "predictions.json").read_text())}


def test_score_exactly_on_the_threshold_is_anomalous(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = _tiny_run(tmp_path)
    first = _predict(run, images, tmp_path / "p0")
    assert all(r["decision"] is None for r in first.values())  # no threshold stored: no decision
    scores = sorted(r["score"] for r in first.values())
    assert len(set(scores)) == 4
    thr = scores[1]  # the second-lowest score, exactly (JSON and argparse round-trip a float's repr)
    rows = _predict(run, images, tmp_path / "p1", "--threshold", repr(thr))
    decisions = {r["score"]: r["decision"] for r in rows.values()}
    assert decisions == {scores[0]: 0, scores[1]: 1, scores[2]: 1, scores[3]: 1}
