"""The invalid-input gate (issue 21.3): the three-way verdict, and on real data (../shared) black, white and noise
frames, another product and the demo model on real bottle photos are `invalid`, test normals and defects are not."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdad.cli import main
from kdad.config import load_config
from kdad.data.demo import make_demo_dataset
from kdad.data.transforms import load_image
from kdad.deploy.postprocess import PostProcess
from kdad.deploy.runner import TorchRunner
from kdad.train import fit

FAST = ["train.progress=false", "train.max_iters=1"]  # the gate looks at the frozen teacher only


def test_verdict_checks_the_gate_first_then_the_decision_rule() -> None:
    post = PostProcess(image_threshold=1.0, gate_threshold=10.0, max_saturated=0.5)
    photo = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32) * 0.5
    assert post.verdict(2.0, 3.0, photo) == ("anomalous", None)
    assert post.verdict(0.5, 3.0, photo) == ("normal", None)
    label, reason = post.verdict(0.5, 11.0, photo)
    assert label == "invalid" and "11 > 10" in str(reason)
    assert post.verdict(0.5, math.nan, photo)[0] == "invalid"
    assert "flat frame" in str(post.verdict(0.5, 3.0, np.zeros((32, 32, 3)))[1])
    burnt = photo.copy()
    burnt[:20] = 1.0  # 20 of 32 rows saturated: 62 % > 50 %, not flat
    assert "overexposed" in str(post.verdict(0.5, 3.0, burnt.transpose(2, 0, 1))[1])
    # the colour check: a grayscale frame of a coloured product, and too colourful a frame, are another camera
    coloured = PostProcess(image_threshold=1.0, gate_threshold=10.0, chroma_range=(0.05, 0.5))
    assert coloured.verdict(0.5, 3.0, photo)[0] == "normal"  # chroma of uniform noise in [0, .5]: about 0.25
    gray = np.repeat(photo[..., :1], 3, axis=2)
    label, reason = coloured.verdict(0.5, 3.0, gray)
    assert label == "invalid" and "chroma 0.0000 outside [0.0500, 0.5000]" in str(reason)
    assert PostProcess(image_threshold=1.0, gate_threshold=10.0, chroma_range=(0.0, 0.02)).verdict(
        0.5, 3.0, photo.transpose(2, 0, 1))[0] == "invalid"
    # no stored gate (bundles before the gate): the two-way decision as before
    assert PostProcess(image_threshold=1.0).verdict(0.5, 1e9, np.zeros((8, 8, 3))) == ("normal", None)


@pytest.fixture(scope="module")
def bottle_run(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(load_config("rd_cpu", [], [f"data.root={bottle_dir}", *FAST]), tmp_path_factory.mktemp("gate") / "b")


def _images(folder: Path, n: int, size: int) -> torch.Tensor:
    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg") and "ground_truth" not in p.parts)
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)]
    return torch.stack([load_image(p, size) for p in paths])


def _invalid(runner: TorchRunner, x: torch.Tensor) -> np.ndarray:
    gates = runner.gate_scores(x)
    assert gates is not None
    return np.array([runner.post.invalid_reason(float(g), im.permute(1, 2, 0).numpy()) is not None
                     for g, im in zip(gates, x)])


def test_gate_on_real_data(bottle_run: Path, bottle_dir: Path, shared_dir: Path, tmp_path: Path) -> None:
    runner = TorchRunner(bottle_run, device="cpu")
    s = runner.image_size
    gate = runner.bundle["gate"]
    assert gate["n_calibration"] >= 10 and gate["threshold"] > 0 and gate["dims"] == gate["mean"].numel()
    good = _images(bottle_dir / "test" / "good", 20, s)
    defects = torch.cat([_images(d, 7, s) for d in sorted((bottle_dir / "test").iterdir()) if d.name != "good"])
    g = torch.Generator().manual_seed(0)
    foreign = {"black": torch.zeros(4, 3, s, s), "white": torch.ones(4, 3, s, s),
               "noise": torch.rand(4, 3, s, s, generator=g),
               "magnetic tile": _images(shared_dir / "data" / "mtd" / "magnetic_tile", 8, s),
               "dtd": _images(shared_dir / "data" / "dtd" / "images", 8, s),
               # another camera: the bottle in grayscale (its pooled features alone score just under the gate)
               "grayscale bottle": _images(bottle_dir / "test" / "good", 4, s).mean(1, keepdim=True).repeat(1, 3, 1, 1)}
    for name, x in foreign.items():
        assert _invalid(runner, x).all(), name
    # measured on the whole test set: 0 of 20 normals, 0 of 63 defects (benchmarks/results/gate_real.json)
    assert _invalid(runner, good).mean() <= 0.05
    assert _invalid(runner, defects).mean() <= 0.1

    # predict writes the third decision with its reason
    black = tmp_path / "black.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(black)
    good_path = bottle_dir / "test" / "good" / "000.png"
    assert main(["predict", str(bottle_run), str(black), str(good_path), "--out", str(tmp_path / "p")]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "p" / "predictions.csv").open())}
    assert rows["black.png"]["label"] == "invalid" and rows["black.png"]["decision"] == ""
    assert "flat frame" in rows["black.png"]["reason"]
    assert rows["000.png"]["label"] in ("normal", "anomalous") and rows["000.png"]["reason"] == ""


def test_chroma_range_from_training_normals() -> None:
    from kdad.gate import chroma, chroma_range

    x = np.zeros((2, 3, 4, 4), np.float32)
    x[0, 0] = 0.2  # red channel 0.2 above the others everywhere: chroma 0.2; image 1 is gray: chroma 0
    assert np.allclose(chroma(x), [0.2, 0.0]) and np.isclose(chroma(x[0].transpose(1, 2, 0))[0], 0.2)
    assert chroma_range(np.array([0.03, 0.04])) == pytest.approx((0.0075, 0.16))  # coloured product
    assert chroma_range(np.array([0.0, 0.001])) == pytest.approx((0.0, 0.021))  # grayscale: 0 is fine


def test_gate_onnx_matches_torch(bottle_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from kdad.deploy.runner import OnnxRunner
    from kdad.export import export_onnx, gate_path

    graph = export_onnx(bottle_run, out=tmp_path / "m.onnx")
    assert gate_path(graph).is_file()
    onnx, torch_runner = OnnxRunner(graph), TorchRunner(bottle_run, device="cpu")
    x = torch.rand(2, 3, onnx.image_size, onnx.image_size, generator=torch.Generator().manual_seed(1))
    x[1] = 0.0
    a, b = onnx.gate_scores(x), torch_runner.gate_scores(x)
    assert a is not None and b is not None
    np.testing.assert_allclose(a, b, rtol=1e-3)
    assert onnx.post.gate_threshold == pytest.approx(torch_runner.post.gate_threshold)
    assert onnx.post.verdict(0.0, float(a[1]), x[1].numpy())[0] == "invalid"


def test_demo_model_calls_real_bottle_photos_invalid(bottle_dir: Path, tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path / "d", n_train=24, n_test_good=2, n_test_bad=2, kind="object")
    # layers 2-4 (rd_cpu's): 472 pooled dimensions from 18 fit images, where a single Mahalanobis distance over the
    # concatenated layers let every photo through; the per-layer statistic catches them (docs/operating_point.md)
    over = [f"data.root={demo}", "train.val_fraction=0.25", "model.layers=[2,3,4]", *FAST]
    run = fit(load_config("rd_demo", [], over), tmp_path / "r")
    runner = TorchRunner(run, device="cpu")
    assert _invalid(runner, _images(bottle_dir / "test" / "good", 10, runner.image_size)).all()
    assert not _invalid(runner, _images(demo / "test" / "good", 2, runner.image_size)).any()


def test_block_precision_weighs_each_layer_by_its_width() -> None:
    """The gate's statistic is the mean over layers of the squared per-layer Mahalanobis distance per dimension:
    a wide layer may not swamp a narrow one (with the concatenated form, the 320-channel layer did)."""
    from sklearn.covariance import LedoitWolf

    from kdad.gate import block_precision

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 52)) * np.r_[np.full(2, 3.0), np.ones(50)]
    mean, precision = block_precision(feats, [2, 50])
    assert not precision[:2, 2:].any() and not precision[2:, :2].any()  # no cross-layer terms
    x = rng.normal(size=52)
    per_layer = []
    for block in (slice(0, 2), slice(2, 52)):
        lw = LedoitWolf().fit(feats[:, block])
        d = x[block] - lw.location_
        per_layer.append(d @ lw.precision_ @ d / (block.stop - block.start))
    d = x - mean
    assert d @ precision @ d == pytest.approx(np.mean(per_layer))
    with pytest.raises(ValueError, match="do not add up"):
        block_precision(feats, [2, 49])
