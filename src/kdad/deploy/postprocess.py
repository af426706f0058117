"""Post-processing written once: the decision rule, the pixel defect mask and the overlay display range.

The decision has three outcomes (`verdict`): ``invalid`` when the invalid-input gate (kdad.gate) says the image
is not a plausible picture of the trained product (checked first, with its reason), else ``anomalous`` iff
``score >= image_threshold`` (the conformal threshold sits just above a calibration score, so this is
"score > that score"), else ``normal``.

A `PostProcess` is built from the stored `Thresholds` (and the stored display range). Every user of a decision
(evaluation's scores.csv, the report, `kdad predict`, the web service) asks it; nothing else compares a score
with a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdad.thresholds import Thresholds, defect_mask, finite_threshold
from kdad.visualize import overlay

LABELS = ("normal", "anomalous")  # by decision(); a third label, "invalid", comes from the gate
DisplayRange = tuple[float, float, str]  # (vmin, vmax, how it was chosen)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def display_range(display: Mapping[str, Any] | None, pixel_threshold: float | None,
                  maps: np.ndarray | None = None) -> DisplayRange:
    """One fixed colour range for every overlay: the stored one; else [median pixel of `maps` (normal ones),
    2 * pixel threshold - median] (median 0 without maps); else the 1st..99.5th percentile of `maps`."""
    disp = display or {}
    if disp.get("vmin") is not None and disp.get("vmax") is not None:
        return float(disp["vmin"]), float(disp["vmax"]), "stored display range"
    pixel = _finite(pixel_threshold)
    has_maps = maps is not None and maps.size > 0
    if pixel is not None:
        vmin = float(np.median(maps)) if maps is not None and has_maps else 0.0
        return vmin, max(2 * pixel - vmin, vmin + 1e-6), "median good-image pixel .. 2 × pixel threshold − median"
    if has_maps:
        assert maps is not None
        vmin, vmax = (float(v) for v in np.percentile(maps, [1.0, 99.5]))
        return vmin, max(vmax, vmin + 1e-6), "no stored thresholds: 1st .. 99.5th percentile of test pixels"
    return 0.0, 2.0, "no stored thresholds or maps: [0, 2]"


@dataclass(frozen=True)
class PostProcess:
    """Raw (map, score) -> decision, defect mask and overlay, at the stored operating point.

    image_threshold: an image is anomalous iff ``score >= image_threshold`` (None: no decision).
    pixel_threshold, min_area: the defect mask keeps pixels ``>= pixel_threshold`` in 8-connected regions of at
    least ``min_area`` pixels (None: no mask). vmin, vmax: the fixed overlay colour range.
    """

    image_threshold: float | None = None
    pixel_threshold: float | None = None
    min_area: int = 1
    vmin: float = 0.0
    vmax: float = 2.0
    # the invalid-input gate: invalid iff gate score > gate_threshold, or the frame is flat (pixel std below
    # flat_std) or overexposed (share of saturated pixels above max_saturated); None: no gate (old bundles)
    gate_threshold: float | None = None
    flat_std: float = 0.01
    max_saturated: float = 1.0
    chroma_range: tuple[float, float] | None = None  # accepted mean chroma (kdad.gate.chroma); None: unchecked

    def __post_init__(self) -> None:
        finite_threshold(self.image_threshold, "image_threshold")  # NaN would call every image normal

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds | Mapping[str, Any] | None,
                        display: Mapping[str, Any] | None = None, image_threshold: float | None = None,
                        maps: np.ndarray | None = None, gate: Mapping[str, Any] | None = None) -> PostProcess:
        """From stored thresholds (a Thresholds or its dict, keys may be missing or None) and display range;
        `image_threshold` overrides the stored one (e.g. `--threshold`); `maps` feed the display fallback;
        `gate`: the stored gate (kdad.gate.Gate.metadata() or the bundle entry), None for no gate."""
        thr = thresholds.to_dict() if isinstance(thresholds, Thresholds) else dict(thresholds or {})
        finite_threshold(image_threshold, "image_threshold")
        image = image_threshold if image_threshold is not None else thr.get("image")
        pixel = None if thr.get("pixel") is None else float(thr["pixel"])
        vmin, vmax, _ = display_range(display, pixel, maps)
        g = dict(gate or {})
        chroma = g.get("chroma_range")  # absent from gates fitted before the colour check
        return cls(None if image is None else float(image), pixel, int(thr.get("min_area") or 1), vmin, vmax,
                   None if g.get("threshold") is None else float(g["threshold"]), float(g.get("flat_std", 0.01)),
                   float(g.get("max_saturated", 1.0)),
                   None if chroma is None else (float(chroma[0]), float(chroma[1])))

    def decision(self, score: float) -> int | None:
        """1 (anomalous) if ``score >= image_threshold``, 0 if below, None without a threshold."""
        return None if self.image_threshold is None else int(score >= self.image_threshold)

    def invalid_reason(self, gate_score: float | None = None, image01: np.ndarray | None = None) -> str | None:
        """Why the image is not a plausible picture of the trained product, or None: a flat or overexposed
        frame (from `image01`, (H, W, 3) or (3, H, W) in [0, 1]), or a gate score above the gate threshold."""
        if self.gate_threshold is None:
            return None
        if image01 is not None:
            from kdad.gate import pixel_stats

            x = np.asarray(image01)
            std, sat = pixel_stats(x if x.shape[-1] == 3 else x.transpose(1, 2, 0))
            if std[0] < self.flat_std:
                return f"flat frame (black, white or blank): pixel std {std[0]:.4f} < {self.flat_std:g}"
            if sat[0] > self.max_saturated:
                return f"overexposed: {sat[0]:.0%} of pixels saturated > {self.max_saturated:.0%}"
            if self.chroma_range is not None:
                from kdad.gate import chroma

                c, (lo, hi) = float(chroma(x if x.shape[-1] == 3 else x.transpose(1, 2, 0))[0]), self.chroma_range
                if not lo <= c <= hi:
                    return (f"colour unlike the training images (another camera?): chroma {c:.4f} outside "
                            f"[{lo:.4f}, {hi:.4f}]")
        if gate_score is not None and not gate_score <= self.gate_threshold:  # NaN is invalid too
            return (f"unlike the training images: out-of-distribution score {gate_score:.4g} > "
                    f"{self.gate_threshold:.4g}")
        return None

    def verdict(self, score: float, gate_score: float | None = None,
                image01: np.ndarray | None = None) -> tuple[str | None, str | None]:
        """(label, reason): ("invalid", why) first, else ("anomalous" | "normal", None) by :meth:`decision`,
        (None, None) without an image threshold."""
        reason = self.invalid_reason(gate_score, image01)
        if reason is not None:
            return "invalid", reason
        d = self.decision(score)
        return (None if d is None else LABELS[d]), None

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        """Boolean per score: ``score >= image_threshold`` (all False without a threshold)."""
        s = np.asarray(scores)
        return np.zeros(s.shape, bool) if self.image_threshold is None else s >= self.image_threshold

    def mask(self, amap: np.ndarray) -> np.ndarray | None:
        """Boolean defect mask of one map (H, W), or None without a pixel threshold."""
        return None if self.pixel_threshold is None else defect_mask(amap, self.pixel_threshold, self.min_area)

    def overlay(self, image01: np.ndarray, amap: np.ndarray) -> np.ndarray:
        """The map coloured in the fixed range, blended onto the image (H, W, 3) in [0, 1] -> uint8."""
        return overlay(image01, amap, self.vmin, self.vmax)


def post_of(runner: Any) -> PostProcess:
    """A runner's PostProcess (`runner.post`), or one built from its threshold and display attributes."""
    post = getattr(runner, "post", None)
    if isinstance(post, PostProcess):
        return post
    return PostProcess(runner.image_threshold, runner.pixel_threshold, int(getattr(runner, "pixel_min_area", 1)),
                       float(runner.vmin), float(runner.vmax))


def gate_scores_of(runner: Any, images01: Any) -> np.ndarray | None:
    """The runner's invalid-input gate scores (B,) for these images, or None when it has no gate (old bundles,
    tiled models, runners without one)."""
    fn = getattr(runner, "gate_scores", None)
    return None if fn is None else fn(images01)
