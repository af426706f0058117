"""GET /metrics (Prometheus text) and /monitor (issue 21.5): decision counts, score and latency histograms, and
the KS drift alarm, read with a real HTTP client from a running uvicorn server."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kdad.deploy.serve.monitor import DriftConfig, Monitor
from kdad.serve import create_app
from kdad.thresholds import conformal_threshold
from tests.deploy.fixtures import live_server

LEVELS = np.arange(77, 128)  # calibration normals: grey levels 77..127, score = level / 255


class _BrightnessRunner:
    """Fake runner: the map is the image's mean over channels, the score its maximum (a solid image's level);
    the bundle holds 150 calibration scores drawn from LEVELS and the conformal threshold at alpha = 0.05."""

    pixel_threshold, pixel_min_area, image_size, vmin, vmax = None, 1, 16, 0.0, 1.0

    def __init__(self) -> None:
        cal = _score(np.random.default_rng(0).choice(LEVELS, 150))
        self.bundle = {"calibration": {"scores": sorted(cal.tolist()), "n": 150, "source": "test"}}
        self.image_threshold = conformal_threshold(cal, 0.05).threshold

    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = images01.mean(1).numpy()
        return maps, maps.reshape(len(maps), -1).max(1)

    def info(self) -> dict[str, object]:
        return {"method": "fake", "image_size": self.image_size}


def _score(levels: np.ndarray) -> np.ndarray:
    """What the runner scores a solid image of these grey levels (float32, as a model's scores are)."""
    return (levels / np.float32(255)).astype(np.float32).astype(np.float64)


def _png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (level, level, level)).save(buf, format="PNG")
    return buf.getvalue()


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def _send(client: httpx.Client, levels: np.ndarray) -> None:
    for i in range(0, len(levels), 25):
        files = [("files", (f"{j}.png", _png(int(v)), "image/png")) for j, v in enumerate(levels[i:i + 25])]
        assert client.post("/predict/batch", files=files).status_code == 200


def test_metrics_count_decisions_and_alarm_on_drift_over_http() -> None:
    runner = _BrightnessRunner()
    rng = np.random.default_rng(1)
    with live_server(create_app(runner, drift=DriftConfig(window=100, min_images=50))) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        m = _metrics(client)
        assert m[("kdad_decisions_total", (("decision", "normal"),))] == 0
        assert np.isnan(m[("kdad_drift_ks_statistic", ())]) and m[("kdad_drift_alarm", ())] == 0
        assert m[("kdad_operating_point", (("quantity", "calibration_images"),))] == 150

        same = rng.choice(LEVELS, 100)  # the calibration distribution: no alarm
        _send(client, same)
        m = _metrics(client)
        flagged = int((_score(same) >= runner.image_threshold).sum())  # ties with the k-th score are normal
        assert m[("kdad_decisions_total", (("decision", "anomalous"),))] == flagged
        assert m[("kdad_decisions_total", (("decision", "normal"),))] == 100 - flagged
        assert m[("kdad_image_score_count", ())] == 100
        assert m[("kdad_request_latency_seconds_count", (("endpoint", "/predict/batch"),))] == 4
        assert m[("kdad_drift_window_images", ())] == 100 and m[("kdad_drift_alarm", ())] == 0
        assert m[("kdad_drift_ks_pvalue", ())] > 0.001

        _send(client, rng.choice(LEVELS, 50) + 20)  # brighter light: half the window shifted
        m = _metrics(client)
        assert m[("kdad_drift_alarm", ())] == 1 and m[("kdad_drift_ks_pvalue", ())] < 0.001
        assert m[("kdad_drift_ks_statistic", ())] > 0.2
        page = client.get("/monitor").json()
        assert page["drift"]["alarm"] is True and page["threshold"] == runner.image_threshold
        hist = page["histogram"]
        assert len(hist["edges"]) == 21 and sum(hist["recent"]) == pytest.approx(1.0)
        assert sum(hist["calibration"]) == pytest.approx(1.0)
        assert 'id="score-histogram"' in client.get("/").text and "loadMonitor" in client.get("/static/app.js").text


def test_monitor_without_calibration_scores_says_why() -> None:
    mon = Monitor(None, 1.0, DriftConfig(min_images=2))
    for s in (0.5, 2.0, 0.7):
        mon.observe(s, int(s >= 1.0))
    d = mon.drift()
    assert d["ks_statistic"] is None and not d["alarm"] and "no calibration" in d["reason"]
    text = mon.prometheus_text().decode()
    assert 'kdad_decisions_total{decision="anomalous"} 1.0' in text and "kdad_drift_ks_statistic NaN" in text
    assert 'kdad_image_score_bucket{le="1.0"} 2.0' in text  # buckets are multiples of the threshold
