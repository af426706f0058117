"""What `kdad serve` counts for Prometheus (GET /metrics) and the web page (GET /monitor).

Decision counts, image-score and latency histograms, and a drift statistic: the two-sample Kolmogorov-Smirnov
test between the last `window` image scores and the calibration normals' scores stored with the model
(docs/operating_point.md). Metrics live in one CollectorRegistry per app, never in prometheus-client's global one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# undecided: no image threshold stored or given; invalid: the invalid-input gate refused the image (kdad.gate)
DECISIONS = ("normal", "anomalous", "undecided", "invalid")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
THRESHOLD_MULTIPLES = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


@dataclass(frozen=True)
class DriftConfig:
    """window: recent image scores compared; min_images: fewer give no statistic; alarm_p: the alarm fires when
    the KS p-value falls below it (0.001: about 1 in 1000 windows of unshifted normal images alarms)."""

    window: int = 200
    min_images: int = 50
    alarm_p: float = 0.001


def calibration_scores(runner: Any) -> np.ndarray | None:
    """The calibration normals' image scores stored with the model (bundle or ONNX metadata), or None."""
    for obj in (runner, getattr(runner, "runner", None)):  # a TiledRunner wraps the loaded runner
        for holder in (getattr(obj, "bundle", None), getattr(obj, "meta", None)):
            cal = holder.get("calibration") if isinstance(holder, Mapping) else None
            if isinstance(cal, Mapping) and cal.get("scores"):
                return np.asarray(cal["scores"], dtype=np.float64)
    return None


def score_buckets(threshold: float | None) -> tuple[float, ...]:
    """Score histogram bucket bounds: multiples of the image threshold (scores are in the model's raw units)."""
    if threshold is None or threshold <= 0:
        return (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    return tuple(float(threshold) * m for m in THRESHOLD_MULTIPLES)


class Monitor:
    """Thread-safe counters for one app; `observe` after every scored image, `latency` after every request."""

    def __init__(self, calibration: np.ndarray | None, threshold: float | None,
                 drift: DriftConfig | None = None) -> None:
        self.calibration = None if calibration is None else np.sort(np.asarray(calibration, np.float64))
        self.threshold = threshold
        self.cfg = drift or DriftConfig()
        self.recent: deque[float] = deque(maxlen=self.cfg.window)
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter("kdad_decisions", "images decided, by decision", ["decision"], registry=r)
        for d in DECISIONS:
            self.decisions.labels(d)
        self.scores = Histogram("kdad_image_score", "raw image scores (max of the anomaly map)",
                                buckets=score_buckets(threshold), registry=r)
        self.latency = Histogram("kdad_request_latency_seconds", "request handling time", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ks = Gauge("kdad_drift_ks_statistic", "two-sample KS statistic, recent vs calibration scores "
                        "(NaN until min_images scores)", registry=r)
        self.ks_p = Gauge("kdad_drift_ks_pvalue", "p-value of that KS test (NaN until min_images scores)", registry=r)
        self.alarm = Gauge("kdad_drift_alarm", f"1 when the KS p-value < {self.cfg.alarm_p:g}", registry=r)
        self.window_n = Gauge("kdad_drift_window_images", "recent scores in the drift window", registry=r)
        self.info = Gauge("kdad_operating_point", "image threshold and calibration set size",
                          ["quantity"], registry=r)
        self.info.labels("image_threshold").set(float("nan") if threshold is None else threshold)
        self.info.labels("calibration_images").set(0 if self.calibration is None else len(self.calibration))
        self.info.labels("drift_alarm_p").set(self.cfg.alarm_p)

    def observe(self, score: float, decision: int | None, invalid: bool = False) -> None:
        """Count one scored image (decision 1 anomalous, 0 normal, None undecided; `invalid`: refused by the
        gate, counted as such and kept out of the score histogram and the drift window)."""
        name = "invalid" if invalid else DECISIONS[2] if decision is None else DECISIONS[int(decision)]
        self.decisions.labels(name).inc()
        if invalid:
            return
        self.scores.observe(score)
        with self.lock:
            self.recent.append(float(score))

    def drift(self) -> dict[str, Any]:
        """KS statistic, p-value and alarm over the window (None and no alarm below min_images or without
        calibration scores, with the reason)."""
        from scipy.stats import ks_2samp

        with self.lock:
            recent = np.asarray(self.recent, np.float64)
        out: dict[str, Any] = {"window_images": int(recent.size), "window": self.cfg.window,
                               "min_images": self.cfg.min_images, "alarm_p": self.cfg.alarm_p,
                               "ks_statistic": None, "ks_pvalue": None, "alarm": False}
        if self.calibration is None:
            out["reason"] = "no calibration scores stored with the model"
        elif recent.size < self.cfg.min_images:
            out["reason"] = f"fewer than {self.cfg.min_images} recent images"
        else:
            res = ks_2samp(recent, self.calibration)
            out.update(ks_statistic=float(res.statistic), ks_pvalue=float(res.pvalue),
                       alarm=bool(res.pvalue < self.cfg.alarm_p))
        return out

    def prometheus_text(self) -> bytes:
        """The registry in Prometheus text format, drift gauges refreshed first."""
        d = self.drift()
        self.ks.set(float("nan") if d["ks_statistic"] is None else d["ks_statistic"])
        self.ks_p.set(float("nan") if d["ks_pvalue"] is None else d["ks_pvalue"])
        self.alarm.set(int(d["alarm"]))
        self.window_n.set(d["window_images"])
        return generate_latest(self.registry)

    def page_data(self, bins: int = 20) -> dict[str, Any]:
        """For the web page: shares of recent and calibration scores over common bins, the threshold, drift."""
        with self.lock:
            recent = np.asarray(self.recent, np.float64)
        pool = [a for a in (recent, self.calibration) if a is not None and a.size]
        hist: dict[str, Any] = {"edges": [], "recent": [], "calibration": []}
        if pool:
            lo = min(float(a.min()) for a in pool)
            hi = max([float(a.max()) for a in pool] + ([self.threshold] if self.threshold is not None else []))
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)

            def shares(a: np.ndarray | None) -> list[float]:
                if a is None or not a.size:
                    return []
                return (np.histogram(np.clip(a, edges[0], edges[-1]), edges)[0] / a.size).tolist()

            hist = {"edges": edges.tolist(), "recent": shares(recent), "calibration": shares(self.calibration)}
        return {"threshold": self.threshold, "histogram": hist, "drift": self.drift()}
