"""ONNX parity without ../shared: every method on random images, and `kdad test --backend onnx` on generated
data, so that export is checked even where the bottle images are absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdad.config import from_dict, load_config, method_config
from kdad.methods import METHODS, get_method

pytest.importorskip("onnxruntime")

SIZE = 64
TINY = {"backbone": "resnet18", "weights": "random"}


def _tiny_model(name: str) -> torch.nn.Module:
    spec = get_method(name)
    torch.manual_seed(0)
    model = spec.Model(from_dict(spec.Config, TINY)).eval()
    if hasattr(model, "set_support"):  # few-shot methods keep a support set of normal images
        shots = int(getattr(model.cfg, "shots", 2))
        model.set_support(torch.rand(shots, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    return model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_onnx_parity_on_random_images(name: str) -> None:
    """The exported graph matches eager PyTorch within export's tolerance, at batch sizes 1 and 3."""
    from kdad.export import PARITY_TOLERANCE, check_parity, export_model_bytes

    model = _tiny_model(name)
    graph, _ = export_model_bytes(model, SIZE)
    parity = check_parity(model, graph, SIZE)
    assert parity["max_abs_map_diff"] <= PARITY_TOLERANCE and parity["max_abs_score_diff"] <= PARITY_TOLERANCE


@pytest.mark.parametrize("residual", ["mse", "mahalanobis"])
def test_onnx_parity_of_patchst_with_its_memory_branch(residual: str) -> None:
    """PatchST's nearest-neighbour branch (a bank buffer, chunked in eager mode) exports as one matmul and matches;
    so does the student's Mahalanobis residual (a precision-matrix buffer)."""
    from torch.utils.data import DataLoader

    from kdad.export import PARITY_TOLERANCE, check_parity, export_model_bytes
    from kdad.methods import patchst

    spec = get_method("patchst")
    torch.manual_seed(0)
    model = spec.Model(from_dict(spec.Config, {**TINY, "memory": 40, "residual": residual}))
    # 16 images: more positions (1024) than channels (384), so the residual covariance is full rank, as on real data
    normals = DataLoader([{"image": x} for x in torch.rand(16, 3, SIZE, SIZE)], batch_size=4)
    patchst.prepare(model, normals, torch.device("cpu"))
    patchst.calibrate(model, normals, torch.device("cpu"))
    assert model.bank.shape[0] == 40 and model.map_mean.shape[1] == 2
    assert model.res_white.numel() == (0 if residual == "mse" else model.bank.shape[1] ** 2)
    graph, _ = export_model_bytes(model.eval(), SIZE)
    parity = check_parity(model, graph, SIZE)
    assert parity["max_abs_map_diff"] <= PARITY_TOLERANCE and parity["max_abs_score_diff"] <= PARITY_TOLERANCE


def test_onnx_parity_of_rd_with_a_calibrated_map_norm() -> None:
    """model.map_norm=position: the held-out mean map is a buffer of the graph, so export keeps the division."""
    from kdad.blocks.maps import calibrate_position_norm
    from kdad.export import PARITY_TOLERANCE, check_parity, export_model_bytes

    spec = get_method("rd")
    torch.manual_seed(0)
    model = spec.Model(from_dict(spec.Config, {**TINY, "map_norm": "position"}))
    calibrate_position_norm(model, [{"image": torch.rand(3, 3, SIZE, SIZE)}], torch.device("cpu"))
    assert model.head.norm.mean.shape == (1, 1, SIZE, SIZE)
    graph, _ = export_model_bytes(model.eval(), SIZE)
    parity = check_parity(model, graph, SIZE)
    assert parity["max_abs_map_diff"] <= PARITY_TOLERANCE and parity["max_abs_score_diff"] <= PARITY_TOLERANCE


def test_kdad_test_backend_onnx_gives_the_torch_metrics(tmp_path: Path) -> None:
    """`kdad test RUN --backend onnx` evaluates RUN/model.onnx with the same data, metrics and thresholds."""
    from kdad.checkpoint import make_bundle
    from kdad.cli import main
    from kdad.data.demo import make_demo_dataset
    from kdad.evaluate import evaluate_run
    from kdad.export import export_onnx
    from kdad.fileio import atomic_torch_save

    root = make_demo_dataset(tmp_path / "demo", n_train=2, n_test_good=4, n_test_bad=6, size=SIZE)
    cfg = load_config(None, None, ["method=rd", "model.backbone=resnet18", "model.weights=random",
                                   f"data.image_size={SIZE}", f"data.root={root}"])
    torch.manual_seed(0)
    model = get_method("rd").Model(method_config(cfg)).eval()
    run = tmp_path / "run"
    thresholds = {"image": 0.5, "pixel": 0.4, "source": "test", "min_area": 1}
    atomic_torch_save(make_bundle(model, cfg, thresholds=thresholds), run / "model.ckpt")
    export_onnx(run)
    eager = evaluate_run(run, device="cpu", out_dir=tmp_path / "torch", report=False)
    assert main(["test", str(run), "--backend", "onnx", "--out", str(tmp_path / "onnx"), "--no-report"]) == 0
    onnx = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert onnx["backend"] == "onnx" and eager["backend"] == "torch"
    assert set(onnx["metrics"]) == set(eager["metrics"])
    for key, value in eager["metrics"].items():
        assert np.isclose(onnx["metrics"][key], value, atol=1e-3, equal_nan=True), key
    torch_rows = (tmp_path / "torch" / "scores.csv").read_text().splitlines()
    onnx_rows = (tmp_path / "onnx" / "scores.csv").read_text().splitlines()
    assert [r.rsplit(",", 2)[0] for r in torch_rows] == [r.rsplit(",", 2)[0] for r in onnx_rows]
    with pytest.raises(Exception, match="model.onnx"):
        evaluate_run(_copy_without_graph(run, tmp_path), device="cpu", report=False, backend="onnx")


def _copy_without_graph(run: Path, tmp_path: Path) -> Path:
    other = tmp_path / "no_graph"
    other.mkdir()
    shutil.copy(run / "model.ckpt", other / "model.ckpt")
    return other
