"""Tiling end to end on a generated folder of 256x192 images: fit -> test -> predict (torch and ONNX) -> serve.

A tiny RD (random ResNet-18, two steps) on 64-px tiles: the assertions are about plumbing (native-size
maps, stitched scores, the same stitching for both backends, metadata), not accuracy; tests/test_tiling.py
shows what tiling finds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.cli import main
from kdad.config import load_config
from kdad.train import fit

H, W, TILE = 192, 256, 64


def _image(seed: int, dot: tuple[int, int] | None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((3, 4)).astype(np.float32)
    base = np.asarray(Image.fromarray(coarse).resize((W, H), Image.Resampling.BICUBIC))
    image = 0.5 + 0.15 * (base - base.mean()) + rng.normal(0, 0.02, (H, W))
    if dot is not None:
        image[dot[0] : dot[0] + 3, dot[1] : dot[1] + 3] = 0.0
    return (np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiling_data")
    for sub in ("good", "test_good", "bad", "masks"):
        (root / sub).mkdir()
    for i in range(4):
        Image.fromarray(_image(i, None)).save(root / "good" / f"{i}.png")
    Image.fromarray(_image(10, None)).save(root / "test_good" / "g.png")
    for i, dot in enumerate(((25, 200), (150, 45))):
        Image.fromarray(_image(20 + i, dot)).save(root / "bad" / f"b{i}.png")
        mask = np.zeros((H, W), np.uint8)
        mask[dot[0] : dot[0] + 3, dot[1] : dot[1] + 3] = 255
        Image.fromarray(mask).save(root / "masks" / f"b{i}_mask.png")
    return root


@pytest.fixture(scope="module")
def run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("rd_cpu", None, [
        "data.format=folder", f"data.good_dir={folder / 'good'}", f"data.test_good_dir={folder / 'test_good'}",
        f"data.bad_dir={folder / 'bad'}", f"data.mask_dir={folder / 'masks'}", f"data.image_size={TILE}",
        "data.tiling=true", "data.tile_overlap=0.25", "model.backbone=resnet18", "model.weights=random",
        "train.max_iters=2", "train.batch_size=8", "train.val_fraction=0.25", "train.progress=false",
        "train.device=cpu"])
    return fit(cfg, tmp_path_factory.mktemp("tiling_run") / "run")


def test_fit_and_test_stitch_full_size_maps(run: Path, tmp_path: Path) -> None:
    import dataclasses

    from kdad.checkpoint import load_bundle, model_from_bundle
    from kdad.evaluate import evaluate_run

    info = json.loads((run / "train_info.json").read_text())
    assert info["threshold_source"] == "held-out normals"
    assert info["tiling"]["tile"] == TILE
    result = evaluate_run(run, device="cpu", report=False)
    assert result["n_images"] == 3 and "tiled" in result["protocol"]
    assert result["tiling"]["tile"] == TILE and result["tiling"]["metric_map_size"] == [H, W]
    assert {"image_auroc", "pixel_auroc", "au_pro"} <= set(result["metrics"])
    data = dataclasses.replace(model_from_bundle(load_bundle(run))[1].data, tile_metric_size=W // 2)
    pooled = evaluate_run(run, data=data, device="cpu", out_dir=tmp_path, report=False)
    assert pooled["tiling"]["metric_map_size"] == [H // 2, W // 2]  # pixel metrics on pooled maps, said so
    scores = lambda p: (p / "scores.csv").read_text().splitlines()  # noqa: E731
    assert scores(tmp_path) == scores(run)  # image scores always come from the full-size map


def test_predict_torch_and_onnx_stitch_alike_at_native_size(run: Path, folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out_t, out_o = tmp_path / "torch", tmp_path / "onnx"
    assert main(["predict", str(run), str(folder / "bad"), "--out", str(out_t), "--overlays", "--masks",
                 "--device", "cpu", "--backend", "torch"]) == 0
    assert main(["export", str(run), "--no-check"]) == 0  # parity here is the stitched scores below
    meta = json.loads((run / "model.json").read_text())
    assert meta["image_size"] == TILE and meta["tiling"]["tile"] == TILE and meta["tiling"]["overlap"] == 0.25
    assert meta["tiling"]["score_top"] == 0.0 and meta["tiling"]["score"] == "max of the stitched map"
    assert main(["predict", str(run), str(folder / "bad"), "--out", str(out_o), "--backend", "onnx"]) == 0
    rows_t = json.loads((out_t / "predictions.json").read_text())
    rows_o = json.loads((out_o / "predictions.json").read_text())
    assert [r["path"] for r in rows_t] == [r["path"] for r in rows_o] and len(rows_t) == 2
    np.testing.assert_allclose([r["score"] for r in rows_t], [r["score"] for r in rows_o], atol=1e-4)
    for name in ("b0_overlay.png", "b1_overlay.png"):
        assert Image.open(out_t / "overlays" / name).size == (W, H)  # native resolution, not the tile
    assert Image.open(out_t / "masks" / "b0_mask.png").size == (W, H)


def test_serve_returns_native_size_heatmaps(run: Path, folder: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import base64

    from fastapi.testclient import TestClient

    from kdad.predict import make_runner
    from kdad.serve import create_app

    runner = make_runner(run, "torch", "cpu")
    client = TestClient(create_app(runner))
    info = client.get("/info").json()
    assert info["tiling"]["tile"] == TILE
    files = [("files", (f"b{i}.png", (folder / "bad" / f"b{i}.png").read_bytes(), "image/png")) for i in range(2)]
    items = client.post("/predict/batch", files=files).json()
    assert len(items) == 2
    for i, item in enumerate(items):
        heat = Image.open(io.BytesIO(base64.b64decode(item["heatmap_png_base64"])))
        assert heat.size == (W, H)
        maps, scores = runner(torch.stack([runner_image(runner, folder / "bad" / f"b{i}.png")]))
        assert abs(item["score"] - float(scores[0])) < 1e-5 and maps.shape == (1, H, W)


def runner_image(runner: object, path: Path) -> torch.Tensor:
    from kdad.tiling import image_loader

    return image_loader(runner, TILE)(path)
