"""FastAPI app for a loaded runner: JSON API, OpenAPI schema and an offline web page.

`create_app(runner)` takes any object with the runner interface (TorchRunner, OnnxRunner): a call
images01 (B, 3, S, S) -> (maps (B, S, S), scores (B,)), plus image_threshold, pixel_threshold,
image_size, vmin, vmax and info(). Nothing here imports training code. Uploads are decoded with the
same `load_image` as training and `kdad predict`, so the service sees the pixels evaluation saw.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdad import __version__
from kdad.align import runner_views
from kdad.data.transforms import (
    ImageTooLargeError,
    check_pixel_count,
    input_contract,
    load_image,
    pixel_cap,
    read_error_text,
)
from kdad.deploy.postprocess import gate_scores_of, post_of
from kdad.deploy.serve.monitor import DriftConfig, Monitor, calibration_scores
from kdad.tiling import image_loader, images_per_call
from kdad.visualize import png_bytes

STATIC_DIR = Path(__file__).parent / "static"
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file bytes


@dataclass(frozen=True)
class Limits:
    """Request limits: bytes per image file, decoded pixels per image, files per batch request."""

    max_upload_mb: float = 20.0
    max_megapixels: float = field(default_factory=pixel_cap)  # the cap of every entry point
    max_batch_files: int = 32

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def max_body_bytes(self, path: str) -> int:
        """Largest request body for a path (a batch may carry max_batch_files images)."""
        files = self.max_batch_files if path.rstrip("/").endswith("/batch") else 1
        return files * (self.max_file_bytes + MULTIPART_OVERHEAD)


class BodyLimit:
    """ASGI middleware: 413 before reading a body whose Content-Length is too big, and while streaming one
    without Content-Length (chunked) as soon as it grows past the limit."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes(scope["path"])
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = JSONResponse({"detail": _too_big_message(int(length), limit)}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI re-raises HTTPExceptions from body parsing unchanged
                    raise HTTPException(413, _too_big_message(None, limit))
            return message

        await self.app(scope, limited_receive, send)


def _too_big_message(size: int | None, limit: int) -> str:
    of = "" if size is None else f" of {size / 2**20:.1f} MB"
    return f"request body{of} exceeds the limit of {limit / 2**20:.2f} MB (--max-upload-mb per image)"


def decode_upload(data: bytes, name: str, image_size: int, limits: Limits,
                  load: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """Uploaded bytes -> (3, S, S) float32 in [0, 1]; HTTPException 413 (too big), 415 (no image), 400 (bad).
    load: how the checked bytes are decoded (default: resized to image_size; kdad.tiling.image_loader).

    The dimensions are read from the header and checked before any pixel is decoded (decompression bombs).
    """
    if len(data) > limits.max_file_bytes:
        raise HTTPException(
            413, f"{name}: file of {len(data) / 2**20:.1f} MB exceeds the {limits.max_upload_mb:g} MB limit"
        )
    if not data:
        raise HTTPException(400, f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name}: image dimensions too large ({e})") from e
    except UnidentifiedImageError as e:
        raise HTTPException(415, f"{name}: not a supported image; send PNG, JPEG, BMP or TIFF") from e
    except Exception as e:
        raise HTTPException(400, f"{name}: cannot read image header: {read_error_text(e)}") from e
    if fmt not in ACCEPTED_FORMATS:
        raise HTTPException(415, f"{name}: image format {fmt} not accepted; send PNG, JPEG, BMP or TIFF")
    try:
        check_pixel_count((w, h), name, limits.max_megapixels)
    except ImageTooLargeError as e:
        raise HTTPException(413, str(e)) from e
    try:  # PIL opens file objects too
        if load is not None:  # carries the size rule (tiling) and the pixel cap
            return load(io.BytesIO(data))
        return load_image(io.BytesIO(data), image_size, limits.max_megapixels)  # type: ignore[arg-type]
    except Exception as e:  # load_image wraps PIL's error; its cause holds what is wrong with the data
        raise HTTPException(400, f"{name}: cannot decode image (truncated or corrupt?): "
                                 f"{read_error_text(e.__cause__ or e)}") from e


def _b64png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def result_dict(
    runner: Any,
    name: str,
    score: float,
    amap: np.ndarray,
    image01: np.ndarray,
    threshold: float | None,
    mask: bool,
    gate_score: float | None = None,
) -> dict[str, Any]:
    """JSON result for one image: raw score, decision at `threshold`, overlay PNG (and mask PNG) in base64.

    label: "invalid" (with `reason`) when the invalid-input gate refuses the image, then decision is None;
    else "anomalous" / "normal" by the decision rule."""
    post = dataclasses.replace(post_of(runner), image_threshold=threshold)
    label, reason = post.verdict(score, gate_score, image01)
    decision = None if label in (None, "invalid") else int(label == "anomalous")
    out: dict[str, Any] = {
        "filename": name,
        "score": score,
        "threshold": threshold,
        "decision": decision,
        "label": label,
        "reason": reason,
        "gate_score": gate_score,
        "gate_threshold": post.gate_threshold,
        "image_threshold": runner.image_threshold,
        "heatmap_png_base64": _b64png(post.overlay(image01, amap)),
    }
    keep = post.mask(amap) if mask else None
    if keep is not None:
        out["mask_png_base64"] = _b64png((keep * 255).astype(np.uint8))
    return out


def model_info(runner: Any, limits: Limits) -> dict[str, Any]:
    """What GET /info returns: runner facts, thresholds, the input contract, display range and limits."""
    info = dict(runner.info())
    size = int(runner.image_size)
    info.setdefault("input_contract", input_contract(size))
    info.update(
        {
            "image_threshold": runner.image_threshold,
            "pixel_threshold": runner.pixel_threshold,
            "display": {"vmin": runner.vmin, "vmax": runner.vmax},
            "limits": asdict(limits),
            "accepted_formats": list(ACCEPTED_FORMATS),
            "kdad_version": __version__,
            "score": "raw image score = max of the anomaly map; decision = score >= threshold",
            "gate": "label 'invalid' (decision null, with a reason) when the image is not a plausible picture of "
                    "the trained product: gate_score > gate_threshold, or a flat or overexposed frame",
            "gate_threshold": post_of(runner).gate_threshold,
        }
    )
    return info


def create_app(
    runner: Any,
    max_upload_mb: float = 20.0,
    max_megapixels: float | None = None,
    max_batch_files: int = 32,
    chunk: int = 8,
    drift: DriftConfig | None = None,
) -> FastAPI:
    """The web app for one runner. Model calls run in the thread pool, one at a time (a lock), so
    concurrent requests never run two forwards at once; decoding runs in parallel outside the lock.
    max_megapixels None means the shared cap (kdad.data.transforms.pixel_cap). drift: the window and alarm
    level of the drift statistic on /metrics and /monitor (kdad.deploy.serve.monitor)."""
    limits = Limits(max_upload_mb, pixel_cap(max_megapixels), max_batch_files)
    lock = threading.Lock()
    runner = runner_views(runner)  # a tiled model scores whole images (stitched maps), an aligned one warps back
    load = image_loader(runner, int(runner.image_size), limits.max_megapixels)
    chunk = images_per_call(runner, chunk)
    monitor = Monitor(calibration_scores(runner), runner.image_threshold, drift)

    def locked_call(images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        with lock, torch.inference_mode():
            maps, scores = runner(images01)
            return maps, scores, gate_scores_of(runner, images01)

    async def decode(upload: UploadFile) -> torch.Tensor:
        name = upload.filename or "upload"
        data = await upload.read(limits.max_file_bytes + 1)
        return await run_in_threadpool(decode_upload, data, name, int(runner.image_size), limits, load)

    async def score(
        images: list[torch.Tensor], names: list[str], threshold: float | None, mask: bool
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for i in range(0, len(images), chunk):
            batch = torch.stack(images[i : i + chunk])
            maps, scores, gates = await run_in_threadpool(locked_call, batch)
            for j in range(len(batch)):
                image01 = batch[j].permute(1, 2, 0).numpy()
                gate = None if gates is None else float(gates[j])
                results.append(
                    await run_in_threadpool(
                        result_dict, runner, names[i + j], float(scores[j]), maps[j], image01, threshold, mask, gate
                    )
                )
                monitor.observe(float(scores[j]), results[-1]["decision"], results[-1]["label"] == "invalid")
        return results

    app = FastAPI(
        title="kdad anomaly detection",
        version=__version__,
        description="Score images with a knowledge-distillation anomaly detector. "
        "Scores are raw (max of the anomaly map); decision = score >= threshold.",
        docs_url=None,  # FastAPI's Swagger UI loads from a CDN and is blank offline; /docs below is local
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limits=limits)

    def pick_threshold(threshold: float | None) -> float | None:
        return runner.image_threshold if threshold is None else threshold

    @app.get("/health", summary="liveness")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "method": runner.info().get("method"),
            "backend": runner.info().get("backend"),
        }

    @app.get("/info", summary="model, thresholds and input contract")
    async def info() -> dict[str, Any]:
        return model_info(runner, limits)

    @app.post("/predict", summary="score one image")
    async def predict(
        file: Annotated[UploadFile, File(description="PNG, JPEG, BMP or TIFF")],
        threshold: Annotated[
            float | None, Query(description="override the stored threshold (finite)", allow_inf_nan=False)
        ] = None,
        mask: Annotated[bool, Query(description="also return a mask at the pixel threshold")] = False,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        image = await decode(file)
        out = (await score([image], [file.filename or "upload"], pick_threshold(threshold), mask))[0]
        monitor.latency.labels("/predict").observe(time.perf_counter() - start)
        return out

    @app.post("/predict/batch", summary="score several images (bad files become error items)")
    async def predict_batch(
        files: Annotated[list[UploadFile], File(description="several images")],
        threshold: Annotated[
            float | None, Query(description="override the threshold (finite)", allow_inf_nan=False)
        ] = None,
        mask: Annotated[bool, Query(description="also return binary masks")] = False,
    ) -> list[dict[str, Any]]:
        start = time.perf_counter()
        if len(files) > limits.max_batch_files:
            raise HTTPException(413, f"{len(files)} files exceed the batch limit of {limits.max_batch_files}")
        items: list[dict[str, Any] | None] = [None] * len(files)
        good: list[tuple[int, torch.Tensor]] = []
        for i, f in enumerate(files):
            try:
                good.append((i, await decode(f)))
            except HTTPException as e:
                items[i] = {"filename": f.filename, "error": e.detail, "status": e.status_code}
        scored = await score(
            [t for _, t in good],
            [files[i].filename or f"upload{i}" for i, _ in good],
            pick_threshold(threshold),
            mask,
        )
        for (i, _), res in zip(good, scored, strict=True):
            items[i] = res
        monitor.latency.labels("/predict/batch").observe(time.perf_counter() - start)
        return [it for it in items if it is not None]

    @app.get("/metrics", summary="Prometheus metrics: decisions, score and latency histograms, drift")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await run_in_threadpool(monitor.prometheus_text), media_type=CONTENT_TYPE_LATEST)

    @app.get("/monitor", summary="recent score histogram vs calibration scores and threshold, drift (JSON)")
    async def monitor_data() -> dict[str, Any]:
        return await run_in_threadpool(monitor.page_data)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
