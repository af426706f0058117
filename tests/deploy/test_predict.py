"""`kdad predict`: both backends agree on real bottle images, overlays/masks, globs, error rows, streaming."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import kdad.deploy.predict
from kdad.cli import main
from kdad.errors import ConfigError
from kdad.infer import expand_inputs, out_stems, stream_predictions
from kdad.predict import make_runner
from tests.deploy.fixtures import IMAGE_SIZE, bottle_test_images, exported, tiny_run
from tests.fakes import forged_png

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bottle test images in <defect>/ subfolders, plus one corrupt PNG and one non-image file."""
    root = tmp_path_factory.mktemp("predict_inputs")
    for p in bottle_test_images(2):
        (root / p.parent.name).mkdir(exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("not an image, ignored when scanning folders")
    return root


def _read(out: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads((out / "predictions.json").read_text())
    assert (out / "predictions.csv").read_text().splitlines()[0] == "path,score,decision,error,label,reason,gate_score"
    return {
        Path(r["path"]).name if "corrupt" in r["path"] else "/".join(Path(r["path"]).parts[-2:]): r
        for r in rows
    }


def test_torch_and_onnx_backends_agree(image_folder: Path, tmp_path: Path) -> None:
    run, graph = tiny_run("rd"), exported("rd")
    out_t, out_o = tmp_path / "torch", tmp_path / "onnx"
    assert (
        main(
            [
                "predict",
                str(run),
                str(image_folder),
                "--out",
                str(out_t),
                "--overlays",
                "--masks",
                "--batch-size",
                "3",
                "--backend",
                "torch",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(run),
                str(image_folder),
                "--out",
                str(out_o),
                "--backend",
                "onnx",
                "--workers",
                "2",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    rows_t, rows_o = _read(out_t), _read(out_o)
    assert rows_t.keys() == rows_o.keys()
    n_images = len(bottle_test_images(2))
    assert len(rows_t) == n_images + 1  # the .txt is not an image; the corrupt .png is an error row
    bad = rows_t.pop("corrupt.png"), rows_o.pop("corrupt.png")
    for r in bad:
        assert r["score"] is None and r["decision"] is None and "corrupt.png" in r["error"]
    scores_t = np.array([rows_t[k]["score"] for k in sorted(rows_t)])
    scores_o = np.array([rows_o[k]["score"] for k in sorted(rows_t)])
    assert np.abs(scores_t - scores_o).max() <= 1e-4
    assert [rows_t[k]["decision"] for k in sorted(rows_t)] == [rows_o[k]["decision"] for k in sorted(rows_t)]
    assert {r["decision"] for r in rows_t.values()} == {0, 1}  # the threshold splits the sample
    overlays = sorted((out_t / "overlays").glob("*.png"))
    assert len(overlays) == n_images and not (out_o / "overlays").exists()
    assert overlays[0].name.startswith("broken_large__")  # names relative to the common input folder
    assert Image.open(overlays[0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    masks = sorted((out_t / "masks").glob("*.png"))
    assert len(masks) == n_images and set(np.unique(np.asarray(Image.open(masks[0])))) <= {0, 255}
    assert graph.is_file()


def test_glob_and_onnx_file(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pattern = str(image_folder / "good" / "*.png")
    assert main(["predict", str(exported("rd")), pattern, "--out", str(tmp_path), "--threshold", "1e9"]) == 0
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert len(rows) == len(list((image_folder / "good").glob("*.png"))) == 2
    assert all(r["decision"] == 0 and r["error"] is None for r in rows)
    assert (
        main(["predict", str(exported("rd")), str(image_folder / "nothing*.png"), "--out", str(tmp_path)])
        == 2
    )
    assert "no image matches" in capsys.readouterr().err


def test_onnx_backend_without_export_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run("rd") / "model.ckpt", run / "model.ckpt")
    img = bottle_test_images(1)[0]
    assert main(["predict", str(run), str(img), "--backend", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "kdad export" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_threshold_is_refused(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tiny_run("rd")), str(tmp_path), f"--threshold={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--threshold" in err and "finite" in err
    with pytest.raises(ConfigError, match="--threshold must be a finite number"):  # programmatic callers too
        make_runner(tiny_run("rd"), None, "cpu", float(value))
    from kdad.runner import TorchRunner

    with pytest.raises(ConfigError, match="image_threshold must be a finite number"):  # the runner built directly
        TorchRunner(tiny_run("rd"), "cpu", image_threshold=float(value))


class _CountingRunner:
    """Fake runner recording batch sizes; score = mean pixel."""

    image_threshold, pixel_threshold, image_size, vmin, vmax = 0.5, None, 8, 0.0, 1.0

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(images01))
        return images01.mean(1).numpy(), images01.flatten(1).mean(1).numpy()


def test_streaming_is_bounded(tmp_path: Path) -> None:
    for i in range(40):
        Image.new("RGB", (8, 8), (i * 6, 0, 0)).save(tmp_path / f"{i:03d}.png")
    paths = expand_inputs([str(tmp_path)])
    runner = _CountingRunner()
    stream = stream_predictions(runner, paths, 8, batch_size=4, progress=False)
    first = next(stream)
    assert first[0].error == "" and runner.calls == [4]  # one batch decoded and scored, not the whole folder
    rest = list(stream)
    assert len(rest) == 39 and max(runner.calls) == 4 and sum(runner.calls) == 40


def test_output_stems_never_collide(tmp_path: Path) -> None:
    names = ["sub/x.png", "sub__x.png", "sub__x~2.png", "x.png", "x.jpg", "a/b/c.png", "a__b/c.png"]
    paths = [tmp_path / n for n in names]
    stems = out_stems(paths, tmp_path)
    assert len(set(stems.values())) == len(names)
    assert stems[str(paths[0])] == "sub__x" and stems[str(paths[3])] == "x"  # the first keeps its plain name
    assert stems[str(paths[1])] not in ("sub__x", "sub__x~2")  # nor takes another input's natural name


def _fake_predict(monkeypatch: pytest.MonkeyPatch, folder: Path, out: Path, *flags: str) -> int:
    """`kdad predict` over `folder` with _CountingRunner instead of a model."""
    monkeypatch.setattr("kdad.deploy.predict.make_runner", lambda *a, **k: _CountingRunner())
    run = out.parent / "fake_run"  # kdad predict checks that RUN holds a model before it loads one
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.ckpt").write_bytes(b"")
    return main(["predict", str(run), str(folder), "--out", str(out), *flags])


def test_colliding_names_keep_every_overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "in" / "sub" / "x.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "in" / "sub__x.png")
    assert _fake_predict(monkeypatch, tmp_path / "in", tmp_path / "out", "--overlays") == 0
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2


def test_non_utf8_file_name_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "plain.png")
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # \xe9 alone is not UTF-8: a surrogate escape
    Image.new("RGB", (8, 8), (200, 20, 30)).save(odd)
    assert _fake_predict(monkeypatch, folder, tmp_path / "out", "--overlays") == 0
    assert b"caf\xe9.png" in (tmp_path / "out" / "predictions.csv").read_bytes()
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {os.fsencode(r["path"]) for r in rows} == {os.fsencode(folder / "plain.png"), os.fsencode(odd)}
    assert all(r["error"] is None for r in rows)
    assert (tmp_path / "out" / "overlays" / os.fsdecode(b"caf\xe9_overlay.png")).is_file()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open; we refuse
def test_images_above_the_pixel_cap_are_error_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    forged_png(folder / "bomb.png", 13000, 13000)  # 169 MP declared in a few hundred bytes
    Image.new("RGB", (40, 40), (90, 0, 0)).save(folder / "small.png")  # 0.0016 MP
    assert _fake_predict(monkeypatch, folder, tmp_path / "out") == 0
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    assert "169.0 megapixels, above the 50 MP limit" in rows["bomb.png"]["error"]
    assert rows["small.png"]["error"] is None and rows["small.png"]["score"] is not None
    assert _fake_predict(monkeypatch, folder, tmp_path / "out2", "--max-megapixels", "0.001") == 0
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "out2" / "predictions.json").read_text())}
    assert "above the 0.001 MP limit" in rows["small.png"]["error"]


def test_results_are_kept_when_writing_an_overlay_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    real_write, calls = kdad.deploy.predict.atomic_write_bytes, []

    def failing_write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr("kdad.deploy.predict.atomic_write_bytes", failing_write)
    assert _fake_predict(monkeypatch, tmp_path, tmp_path / "out", "--overlays", "--batch-size", "2") == 2
    assert "No space left" in capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(rows) == 3 and all(r["score"] is not None for r in rows)  # the scores computed are kept


def test_fast_fp32_precision_matches_exact() -> None:
    """`--precision fp32` (kdad.speed's fast path) gives the exact path's scores within 1e-4."""
    from kdad.runner import TorchRunner

    run = tiny_run("rd")
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    exact_maps, exact_scores = TorchRunner(run, device="cpu")(images)
    fast = TorchRunner(run, device="cpu", precision="fp32")
    fast_maps, fast_scores = fast(images)
    assert fast.info()["precision"] == "fp32"
    assert abs(fast_maps - exact_maps).max() < 1e-4
    assert abs(fast_scores - exact_scores).max() < 1e-4


def test_compiled_fast_path_matches_exact() -> None:
    """`--precision fp32 --compile` (torch.compile of the fast path) keeps the exact path's maps."""
    from kdad.runner import TorchRunner

    run = tiny_run("rd")
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    exact_maps, exact_scores = TorchRunner(run, device="cpu")(images)
    fast = TorchRunner(run, device="cpu", precision="fp32", compile=True)
    fast_maps, fast_scores = fast(images)
    assert fast.info()["compile"] is True
    assert abs(fast_maps - exact_maps).max() < 1e-4
    assert abs(fast_scores - exact_scores).max() < 1e-4


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "--compile need the fast path"),
    (["--cuda-graph", "--precision", "fp32", "--device", "cpu"], "cuda_graph=True needs a CUDA device"),
    (["--compile", "--precision", "fp32", "--backend", "onnx"], "torch backend only"),
])
def test_speed_flags_are_checked(flags: list[str], message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_run("rd")
    code = main(["predict", str(run), str(tmp_path), "--out", str(tmp_path / "o"), *flags])
    assert code != 0 and message in capsys.readouterr().err


class _BlobRunner(_CountingRunner):
    """Fake runner whose map holds a 5x5 blob (25 px) and one hot pixel, both above its pixel threshold."""

    pixel_threshold, pixel_min_area, image_size = 0.5, 16, 16

    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = np.zeros((len(images01), 16, 16), np.float32)
        maps[:, 2:7, 2:7] = 1.0
        maps[:, 12, 12] = 1.0
        return maps, maps.reshape(len(maps), -1).max(1)


def test_masks_keep_only_regions_of_the_stored_min_area(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict --masks applies the threshold's min_area (the region rule), not a bare per-pixel comparison."""
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), (50, 50, 50)).save(tmp_path / "in" / "a.png")
    monkeypatch.setattr("kdad.deploy.predict.make_runner", lambda *a, **k: _BlobRunner())
    run = tmp_path / "fake_run"
    run.mkdir()
    (run / "model.ckpt").write_bytes(b"")
    assert main(["predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--masks"]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "a_mask.png")) > 0
    assert mask.sum() == 25 and mask[4, 4] and not mask[12, 12]
