"""The FastAPI service: endpoints, limits, hostile uploads and concurrent clients on a real uvicorn server."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx
from fastapi.testclient import TestClient

from kdad.data.transforms import MAX_MEGAPIXELS, load_image
from kdad.runner import TorchRunner
from kdad.serve import Limits, create_app
from kdad.thresholds import defect_mask
from tests.deploy.fixtures import IMAGE_SIZE, REPO_ROOT, bottle_test_images, exported, live_server, tiny_run

MAX_MB = 1.0


@pytest.fixture(scope="module")
def runner() -> TorchRunner:
    return TorchRunner(tiny_run("rd"), device="cpu")


@pytest.fixture(scope="module")
def client(runner: TorchRunner) -> TestClient:
    return TestClient(create_app(runner, max_upload_mb=MAX_MB))


def _upload(path: Path) -> dict[str, Any]:
    return {"file": (path.name, path.read_bytes(), "image/png")}


def _png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_health_and_info(client: TestClient, runner: TorchRunner) -> None:
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["method"] == "rd" and info["image_size"] == IMAGE_SIZE
    assert (
        info["image_threshold"] == runner.image_threshold
        and info["pixel_threshold"] == runner.pixel_threshold
    )
    assert info["input_contract"]["range"] == [0.0, 1.0] and info["input_contract"]["color"] == "RGB"
    assert info["limits"]["max_upload_mb"] == MAX_MB
    assert client.get("/openapi.json").json()["paths"].keys() >= {
        "/predict",
        "/predict/batch",
        "/info",
        "/health",
    }
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert (
        page.status_code == 200 and "threshold" in page.text and "http" not in page.text.split("<footer")[0]
    )
    assert client.get("/static/app.js").status_code == 200


def test_predict_matches_runner(client: TestClient, runner: TorchRunner) -> None:
    path = next(p for p in bottle_test_images(1) if p.parent.name != "good")
    body = client.post("/predict", files=_upload(path), params={"mask": "true"}).json()
    maps, scores = runner(load_image(path, IMAGE_SIZE)[None])
    assert abs(body["score"] - float(scores[0])) <= 1e-6  # same decoding and forward as `kdad predict`
    assert body["threshold"] == runner.image_threshold
    assert body["decision"] == int(body["score"] >= runner.image_threshold)
    assert _png_size(body["heatmap_png_base64"]) == (IMAGE_SIZE, IMAGE_SIZE)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"]))))
    assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask > 0, defect_mask(maps[0], runner.pixel_threshold, runner.pixel_min_area))
    low = client.post("/predict", files=_upload(path), params={"threshold": 0}).json()
    high = client.post("/predict", files=_upload(path), params={"threshold": 1e9}).json()
    assert (low["decision"], high["decision"], low["threshold"]) == (1, 0, 0)
    assert "mask_png_base64" not in low


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_threshold_is_refused(client: TestClient, value: str) -> None:
    path = bottle_test_images(1)[0]
    r = client.post("/predict", files=_upload(path), params={"threshold": value})
    assert r.status_code == 422 and "threshold" in r.text
    r = client.post("/predict/batch", files=[("files", (path.name, path.read_bytes(), "image/png"))],
                    params={"threshold": value})
    assert r.status_code == 422 and "threshold" in r.text


def test_batch_with_a_bad_file(client: TestClient) -> None:
    paths = bottle_test_images(1)[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    files.append(("files", ("readme.txt", b"hello, not an image", "text/plain")))
    items = client.post("/predict/batch", files=files).json()
    assert len(items) == 4
    assert all(isinstance(it["score"], float) for it in items[:3])
    assert items[3]["status"] == 415 and "not a supported image" in items[3]["error"]
    single = client.post("/predict", files=_upload(paths[1])).json()
    assert abs(items[1]["score"] - single["score"]) <= 1e-5


def test_rejects_non_images_and_oversize(client: TestClient) -> None:
    r = client.post("/predict", files={"file": ("notes.txt", b"just some text", "text/plain")})
    assert r.status_code == 415 and "not a supported image" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 400
    big = b"\0" * int((MAX_MB + 0.5) * 2**20)
    r = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]

    def chunks() -> Any:  # valid multipart, no Content-Length: the limit applies while the body streams in
        yield b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"x" * 65536
        yield b"\r\n--bnd--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=bnd"}
    r = client.post("/predict", content=chunks(), headers=headers)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def _bomb_png(width: int, height: int) -> bytes:
    """A ~17 kB 1-bit PNG, 12000 x 12000, with its IHDR rewritten to claim width x height."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; we reject
@pytest.mark.parametrize("side", [12000, 30000])
def test_rejects_decompression_bombs(client: TestClient, side: int) -> None:
    payload = _bomb_png(side, side)
    assert len(payload) < 64 * 1024
    r = client.post("/predict", files={"file": ("bomb.png", payload, "image/png")})
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["detail"] or "megapixels" in r.json()["detail"]


def test_pixel_cap_is_the_shared_one(runner: TorchRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from kdad.cli import main

    assert Limits().max_megapixels == MAX_MEGAPIXELS  # one default for the server, predict and training
    path = bottle_test_images(1)[0]
    r = TestClient(create_app(runner, max_megapixels=0.01)).post("/predict", files=_upload(path))
    assert r.status_code == 413 and "above the 0.01 MP limit" in r.json()["detail"]
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert main(["serve", str(tiny_run("rd")), "--max-megapixels", "0.5", "--device", "cpu"]) == 0
    assert TestClient(seen["app"]).get("/info").json()["limits"]["max_megapixels"] == 0.5


def test_onnx_app_agrees(client: TestClient) -> None:
    from kdad.deploy.runner import OnnxRunner

    onnx_client = TestClient(create_app(OnnxRunner(exported("rd"))))
    path = bottle_test_images(1)[0]
    a = client.post("/predict", files=_upload(path)).json()
    b = onnx_client.post("/predict", files=_upload(path)).json()
    assert abs(a["score"] - b["score"]) <= 1e-4 and a["decision"] == b["decision"]
    assert onnx_client.get("/info").json()["backend"] == "onnxruntime"


def test_parallel_clients_on_live_server(runner: TorchRunner) -> None:
    paths = bottle_test_images(1)
    payloads = [(f"{p.parent.name}_{p.name}", p.read_bytes()) for p in paths]  # unique names
    n_clients = 32
    with live_server(create_app(runner, max_upload_mb=MAX_MB)) as url:

        def one(i: int) -> tuple[int, float, str]:
            name, data = payloads[i % len(payloads)]
            with httpx.Client(base_url=url, timeout=120) as http:
                if i % 8 == 7:
                    return http.get("/health").status_code, 0.0, name
                r = http.post("/predict", files={"file": (name, data, "image/png")})
                return r.status_code, r.json()["score"], name

        with ThreadPoolExecutor(max_workers=n_clients) as pool:
            results = list(pool.map(one, range(n_clients)))
    assert [status for status, _, _ in results] == [200] * n_clients
    by_name: dict[str, set[float]] = {}
    for _, score, name in results:
        if score:
            by_name.setdefault(name, set()).add(round(score, 5))
    assert len(by_name) == len(paths) and all(len(v) == 1 for v in by_name.values())  # results don't mix up


def test_app_module_imports_no_training_code() -> None:
    code = (
        "import sys, kdad.serve.app; bad = [m for m in ('kdad.train', 'kdad.methods', 'kdad.checkpoint', "
        "'kdad.evaluate', 'kdad.config') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_serve_wires_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from kdad.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert (
        main(["serve", str(tiny_run("rd")), "--port", "8123", "--max-upload-mb", "5", "--device", "cpu"]) == 0
    )
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert TestClient(seen["app"]).get("/info").json()["limits"]["max_upload_mb"] == 5.0


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_serve_refuses_non_finite_threshold(value: str, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from kdad.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)  # never block on a real server
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tiny_run("rd")), "--threshold", value])
    assert exit_info.value.code == 2
    assert "--threshold" in capsys.readouterr().err


def test_missing_serve_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from kdad.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # a base install without the [serve] extra
    for name in ("kdad.serve", "kdad.serve.app"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "model.ckpt").write_bytes(b"")
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "kdad[serve]"' in err and "fastapi" in err and "Traceback" not in err


def test_truncated_png_error_names_the_file_not_a_memory_object(client: TestClient) -> None:
    data = bottle_test_images(1)[0].read_bytes()
    r = client.post("/predict", files={"file": ("cut.png", data[: len(data) // 2], "image/png")})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail.startswith("cut.png: cannot decode image") and "truncated" in detail
    assert "BytesIO" not in detail and "0x" not in detail


def test_docs_page_works_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "/static/docs.js" in page.text
    for asset in ("/docs", "/static/docs.js", "/static/docs.html", "/", "/static/app.js"):
        text = client.get(asset).text
        assert "https://" not in text and "http://" not in text, asset  # nothing loaded from outside
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_page_status_counts_failures_and_labels_uploads() -> None:
    import json
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not found")
    app_js = Path(__import__("kdad.serve.app", fromlist=["STATIC_DIR"]).STATIC_DIR) / "app.js"
    code = (f"const m = require({json.dumps(str(app_js))}); console.log(JSON.stringify([m.statusText(2, 3), "
            "m.statusText(4, 0), m.uploadLabel(1, 2048, new Date(0)), m.uploadLabel(2, 2048, new Date(0))]))")
    out = json.loads(subprocess.run([node, "-e", code], capture_output=True, text=True, check=True).stdout)
    assert out[0] == "2 of 5 image(s) scored, 3 failed (red cards say why)"
    assert out[1] == "4 of 4 image(s) scored"
    assert out[2].startswith("upload #1 · 2.0 kB") and out[3].startswith("upload #2")  # same name, told apart
    css = (app_js.parent / "style.css").read_text()
    assert "align-items: start" in css and ".card.failed" in css  # error cards do not stretch to image height


class _BlobRunner:
    """Fake runner: every map holds a 5x5 blob (25 px) and one hot pixel, both above the pixel threshold."""

    image_threshold, pixel_threshold, pixel_min_area, image_size, vmin, vmax = 0.5, 0.5, 16, 16, 0.0, 1.0

    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = np.zeros((len(images01), 16, 16), np.float32)
        maps[:, 2:7, 2:7] = 1.0
        maps[:, 12, 12] = 1.0
        return maps, maps.reshape(len(maps), -1).max(1)

    def info(self) -> dict[str, object]:
        return {"method": "fake", "image_size": self.image_size}


def test_served_masks_keep_only_regions_of_the_stored_min_area() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (50, 50, 50)).save(buf, format="PNG")
    body = TestClient(create_app(_BlobRunner())).post(
        "/predict", files={"file": ("a.png", buf.getvalue(), "image/png")}, params={"mask": "true"}).json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"])))) > 0
    assert mask.sum() == 25 and mask[4, 4] and not mask[12, 12]
