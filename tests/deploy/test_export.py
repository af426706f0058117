"""ONNX export: every method exports, and onnxruntime matches eager PyTorch on real bottle images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdad.checkpoint import load_bundle
from kdad.data.transforms import images_to_batch
from kdad.deploy.runner import OnnxRunner, TorchRunner
from kdad.errors import KdadError
from kdad.export import export_model_bytes, read_metadata, sha256_file
from kdad.methods import METHODS
from tests.deploy.fixtures import IMAGE_SIZE, bottle_test_images, exported, tiny_run

pytest.importorskip("onnxruntime")

MAP_TOLERANCE = 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_onnx_parity_on_bottle_images(method: str) -> None:
    paths = bottle_test_images(1)  # good + one of each defect type
    assert len(paths) >= 4
    onnx_path = exported(method)
    torch_runner = TorchRunner(tiny_run(method), device="cpu")
    onnx_runner = OnnxRunner(onnx_path)
    assert onnx_runner.image_threshold == torch_runner.image_threshold
    images = images_to_batch(paths, IMAGE_SIZE)
    worst_map = worst_score = 0.0
    for batch in (images[:3], images[3:4]):  # dynamic batch axis: 3 then 1
        t_maps, t_scores = torch_runner(batch)
        o_maps, o_scores = onnx_runner(batch)
        assert o_maps.shape == t_maps.shape == (len(batch), IMAGE_SIZE, IMAGE_SIZE)
        assert o_scores.shape == (len(batch),)
        worst_map = max(worst_map, float(np.abs(o_maps - t_maps).max()))
        worst_score = max(worst_score, float(np.abs(o_scores - t_scores).max()))
        thr = torch_runner.image_threshold
        assert list(o_scores >= thr) == list(t_scores >= thr)
    print(
        f"\n{method}: max |map diff| {worst_map:.3e}, max |score diff| {worst_score:.3e}, {len(paths)} images"
    )
    assert worst_map <= MAP_TOLERANCE
    assert worst_score <= MAP_TOLERANCE


@pytest.mark.parametrize("method", sorted(METHODS))
def test_metadata_contents(method: str) -> None:
    onnx_path = exported(method)
    meta = read_metadata(onnx_path)
    bundle = load_bundle(tiny_run(method))
    assert meta["method"] == method
    assert meta["image_size"] == IMAGE_SIZE
    assert meta["input"]["range"] == [0.0, 1.0] and meta["input"]["color"] == "RGB"
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["dtype"] == "float32"
    assert meta["thresholds"]["image"] == bundle["thresholds"]["image"]
    assert meta["thresholds"]["pixel"] == bundle["thresholds"]["pixel"]
    assert meta["exporter"] in ("torchscript", "dynamo")
    assert meta["opset"] == 17
    assert meta["source_checkpoint"]["sha256"] == sha256_file(tiny_run(method) / "model.ckpt")
    assert meta["graph_sha256"] == sha256_file(onnx_path)
    if method == "rd":  # the others are exported with --no-check
        assert meta["parity_check"]["max_abs_map_diff"] <= MAP_TOLERANCE
        assert meta["parity_check"]["batches"] == [1, 3]
    import onnx

    graph = onnx.load(str(onnx_path))
    assert [o.name for o in graph.graph.output] == ["anomaly_map", "score"]
    assert not any("threshold" in p.key for p in graph.metadata_props)  # thresholds are not in the graph


def test_runner_errors_name_the_file(tmp_path: Path) -> None:
    src = exported("rd")
    lone = tmp_path / "lone.onnx"
    shutil.copy(src, lone)
    with pytest.raises(KdadError, match="lone.json"):
        OnnxRunner(lone)
    shutil.copy(src.with_suffix(".json"), tmp_path / "lone.json")
    runner = OnnxRunner(lone, image_threshold=0.5)
    assert runner.image_threshold == 0.5
    with pytest.raises(KdadError, match=rf"\(B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}\)"):
        runner(torch.rand(1, 3, 64, 64))
    meta = json.loads((tmp_path / "lone.json").read_text())
    meta["graph_sha256"] = "0" * 64
    (tmp_path / "lone.json").write_text(json.dumps(meta))
    with pytest.raises(KdadError, match="graph_sha256"):
        OnnxRunner(lone)


class _Spectrum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(x).abs()  # no ONNX symbolic in the TorchScript exporter


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 1, 1)
        self.head = nn.Sequential(nn.ReLU(), _Spectrum())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.head(self.encoder(x))
        return amap, amap.flatten(1).amax(1)


def test_export_failure_names_the_component() -> None:
    with pytest.raises(KdadError, match=r"component 'head\.1' \(_Spectrum\).*fft"):
        export_model_bytes(_Toy(), 8, exporter="torchscript")


def test_cli_export_custom_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdad.cli import main

    out = tmp_path / "deploy" / "bottle_rd.onnx"
    assert main(["export", str(tiny_run("rd")), "--out", str(out), "--no-check"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert "parity_check" not in read_metadata(out)
    assert not list(out.parent.glob(".*tmp"))  # atomic writes leave no temporaries
    assert main(["export", str(tiny_run("rd")), "--out", str(tmp_path / "x.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_missing_onnx_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # what a base install (no [onnx] extra) looks like
    with pytest.raises(KdadError, match=r'ONNX export needs onnx.*pip install "kdad\[onnx\]"'):
        export_model_bytes(_Toy(), 8, exporter="torchscript")
