"""`kdad calibrate` (issue 21.2): new thresholds from new good images, no retraining, nothing old overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.cli import main
from kdad.data.folder import FolderDataset
from kdad.evaluate import predict
from tests.fakes import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("cal"), "rd_cpu", 12, 2,
                    ["train.epochs=1", "train.val_fraction=0.5", "train.alpha=0.3"])


def _new_lighting(src: Path, dst: Path, n: int) -> Path:
    """`n` good images, darker and noisier: a new camera's view of the same part."""
    dst.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, p in enumerate(sorted(src.glob("*.png"))[:n]):
        a = np.asarray(Image.open(p).convert("RGB"), np.float32) * 0.6 + rng.normal(0, 6, (64, 64, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(dst / f"{i:03d}.png")
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibrate_replaces_thresholds_keeps_the_old_bundle_and_the_weights(run: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from kdad.export import export_onnx, read_metadata

    graph = export_onnx(run, check=False)
    before, old_bundle = _sha(run / "model.ckpt"), load_bundle(run)
    normals = _new_lighting(Path(old_bundle["config"]["data"]["root"]) / "train" / "good", tmp_path / "new", 9)
    assert main(["calibrate", str(run), "--normals", str(normals), "--alpha", "0.2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    kept = list(run.glob("model.before-calibrate-*.ckpt"))
    assert len(kept) == 1 and _sha(kept[0]) == before  # the old bundle, byte for byte
    new = load_bundle(run)
    for k, v in old_bundle["model"].items():  # no retraining
        assert torch.equal(new["model"][k], v), k
    model, cfg = model_from_bundle(new)
    scores = np.sort(predict(model, FolderDataset(normals, image_size=64), torch.device("cpu"), 8,
                             keep_maps=False).scores.astype(np.float64))
    thr = new["thresholds"]
    assert thr["alpha"] == 0.2 and thr["n_calibration"] == 9 and cfg.train.alpha == 0.2
    assert thr["image"] == pytest.approx(np.nextafter(scores[7], np.inf), rel=1e-6)  # k = ceil(10 * 0.8) = 8
    assert thr["image"] != pytest.approx(old_bundle["thresholds"]["image"], rel=1e-3)
    assert new["calibration"]["scores"] == pytest.approx(scores, rel=1e-6)
    assert new["calibration_history"][-1]["previous_image_threshold"] == old_bundle["thresholds"]["image"]
    meta = read_metadata(graph)  # the exported graph's metadata follows, its old JSON kept
    assert meta["thresholds"]["image"] == thr["image"] and meta["thresholds"]["alpha"] == 0.2
    assert meta["thresholds"]["guarantee"] == thr["guarantee"] and meta["calibration"]["n"] == 9
    assert len(list(run.glob("model.before-calibrate-*.json"))) == 1
    assert "P(false alarm) <= 0.2" in printed and "kept as" in printed


def test_calibrate_warns_when_too_few_and_out_leaves_the_run_untouched(run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    before = _sha(run / "model.ckpt")
    normals = _new_lighting(Path(load_bundle(run)["config"]["data"]["root"]) / "train" / "good", tmp_path / "n", 4)
    out = tmp_path / "recal.ckpt"
    with pytest.warns(UserWarning, match="at least 99"):
        assert main(["calibrate", str(run), "--normals", str(normals), "--out", str(out), "--alpha", "0.01",
                     "--device", "cpu"]) == 0
    assert "warning: 4 calibration images are too few" in capsys.readouterr().out
    assert _sha(run / "model.ckpt") == before and json.dumps(load_bundle(out)["thresholds"]["n_calibration"]) == "4"
    assert main(["calibrate", str(run), "--normals", str(tmp_path / "missing")]) == 2
    assert main(["calibrate", str(run), "--normals", str(normals), "--alpha", "1.5"]) == 2
