"""Operating thresholds taken from a validation split, never from the test set (REFERENCE §6).

With defects in the validation data the threshold maximises F1 there. With only normal data (the
usual case: LOCO and MVTec AD 2 ship defect-free validation sets) F1-max is meaningless (every
threshold gives F1 = 0 and the "best" one is the lowest score, marking everything anomalous), so
a high quantile of the normal scores is used instead: about (1 - quantile) of normal images or
pixels are then flagged.

The default image rule on normals is split-conformal (:func:`conformal_threshold`): the ceil((n+1)(1-alpha))-th
smallest of n held-out normal scores, which bounds the false-alarm probability of a new normal image by alpha
(docs/operating_point.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from kdad.errors import ConfigError
from kdad.metrics import f1_max
from kdad.metrics._core import as_bool, as_maps_and_masks, as_scores

DEFAULT_MAX_PIXELS = 20_000_000


def finite_threshold(value: float | None, name: str = "threshold") -> float | None:
    """`value` unchanged if it is None or a finite number; NaN or +-inf raise ConfigError naming `name`.

    A NaN threshold makes every `score >= threshold` false, so every image would silently be called normal.
    """
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class Thresholds:
    """Image-score and pixel-score thresholds and how they were obtained (e.g. ``f1_max+quantile``).

    ``min_area``: a defect mask keeps only connected regions of at least this many pixels (at the model's map
    size), the same rule the pixel threshold was chosen with (1 = every pixel above the threshold).
    """

    image: float
    pixel: float
    source: str
    min_area: int = 1
    alpha: float | None = None  # conformal rule: the false-alarm rate bounded; None: quantile/F1 rule (old bundles)
    n_calibration: int | None = None  # normal images the image threshold was computed on

    @property
    def guarantee(self) -> str | None:
        """The conformal guarantee in words, or None when the image threshold carries none."""
        if self.alpha is None or self.n_calibration is None:
            return None
        return conformal_guarantee(self.alpha, self.n_calibration)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Inverse of :meth:`to_dict`; raises ConfigError naming a missing or malformed key."""
        for key in ("image", "pixel", "source"):
            if key not in data:
                raise ConfigError(f"thresholds: missing key {key!r}; expected image, pixel, source")
        try:
            image, pixel = float(data["image"]), float(data["pixel"])
        except (TypeError, ValueError):
            raise ConfigError(f"thresholds: image/pixel must be numbers, got {data['image']!r}, "
                              f"{data['pixel']!r}") from None
        min_area = data.get("min_area", 1)  # bundles written before the region rule have none
        if not isinstance(min_area, int) or isinstance(min_area, bool) or min_area < 1:
            raise ConfigError(f"thresholds: min_area must be an integer >= 1, got {min_area!r}")
        alpha, n_cal = data.get("alpha"), data.get("n_calibration")  # absent before conformal thresholds
        if alpha is not None and not (isinstance(n_cal, int) and n_cal >= 1 and 0.0 < float(alpha) < 1.0):
            raise ConfigError(f"thresholds: alpha must be in (0, 1) with n_calibration >= 1, got alpha={alpha!r}, "
                              f"n_calibration={n_cal!r}")
        return cls(image, pixel, str(data["source"]), min_area, None if alpha is None else float(alpha),
                   None if alpha is None else n_cal)

    def to_metadata(self) -> dict[str, Any]:
        """:meth:`to_dict` plus the guarantee in words (what model.ckpt, the ONNX metadata and the report state)."""
        return {**self.to_dict(), "guarantee": self.guarantee}


def check_alpha(alpha: float) -> float:
    """`alpha` as a float in (0, 1), else ConfigError."""
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ConfigError(f"alpha (the false-alarm rate) must be in (0, 1), got {alpha!r}")
    return a


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n+1)(1-alpha)): the rank (1-based, ascending) of the conformal threshold among n scores.

    k > n when n < 1/alpha - 1: then no order statistic bounds the false-alarm rate by alpha.
    """
    if n < 1:
        raise ValueError("a conformal threshold needs at least one calibration score")
    return math.ceil((n + 1) * (1.0 - check_alpha(alpha)) - 1e-9)  # 1e-9: (n+1)(1-alpha) is often an integer


def images_needed(alpha: float) -> int:
    """The fewest calibration images for which the conformal rank is at most n (n >= 1/alpha - 1)."""
    return max(1, math.ceil(1.0 / check_alpha(alpha) - 1.0 - 1e-9))


def conformal_guarantee(alpha: float, n: int) -> str:
    """The split-conformal guarantee for a threshold at rank min(k, n) of n normal scores, in words."""
    k = conformal_rank(n, alpha)
    bound = alpha if k <= n else 1.0 / (n + 1)
    text = (f"P(false alarm) <= {bound:.4g} for a new normal image exchangeable with the {n} calibration images "
            f"(split-conformal, threshold = score of rank {min(k, n)} of {n})")
    if k > n:
        text += f"; alpha={alpha:g} needs at least {images_needed(alpha)} calibration images"
    return text


@dataclass(frozen=True)
class Conformal:
    """A split-conformal image threshold: ``threshold`` is the ``rank``-th smallest of ``n`` normal scores.

    ``enough``: n >= 1/alpha - 1, so the false-alarm bound is alpha; otherwise the threshold is the highest
    score (rank n) and the bound only 1/(n+1), and ``warning`` says how many images are needed.
    """

    threshold: float
    alpha: float
    n: int
    rank: int
    enough: bool

    @property
    def warning(self) -> str | None:
        """A sentence for the user when n is too small for alpha, else None."""
        if self.enough:
            return None
        return (f"{self.n} calibration images are too few for a false-alarm rate alpha={self.alpha:g}: at least "
                f"{images_needed(self.alpha)} are needed (n >= 1/alpha - 1); the threshold is their highest score "
                f"and only bounds the false-alarm rate by 1/(n+1) = {1 / (self.n + 1):.3g}")


def conformal_threshold(scores: ArrayLike, alpha: float = 0.01) -> Conformal:
    """Split-conformal threshold of normal scores (N,): the ceil((N+1)(1-alpha))-th smallest score.

    For a new normal image whose score is exchangeable with these, P(score >= threshold) <= alpha
    (exactly, for any N and any score distribution, assuming no ties). When N < 1/alpha - 1 the rank
    exceeds N: the highest score is returned with ``enough=False`` (see :class:`Conformal`).
    """
    s = np.sort(as_scores(scores, "scores").reshape(-1).astype(np.float64))
    k = conformal_rank(len(s), alpha)
    # anomalous iff score >= threshold, so the threshold sits just above the k-th score: a normal image
    # ties with it (same score) only with probability zero for continuous scores
    thr = float(np.nextafter(s[min(k, len(s)) - 1], np.inf))
    return Conformal(thr, float(alpha), len(s), min(k, len(s)), k <= len(s))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided binomial confidence interval for a rate of k events in n trials."""
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    tail = (1.0 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return lo, hi


def calibration_record(scores: ArrayLike, source: str) -> dict[str, Any]:
    """The bundle's ``calibration`` entry: the calibration normals' image scores, sorted, and where they came from
    (the service compares recent scores with these to measure drift)."""
    s = np.sort(as_scores(scores, "scores").reshape(-1).astype(np.float64))
    return {"scores": [float(v) for v in s], "n": int(s.size), "source": source}


def _check_quantile(quantile: float) -> float:
    q = float(quantile)
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ConfigError(f"quantile must be in [0, 1], got {quantile!r}")
    return q


def image_threshold_from_validation(
    scores: ArrayLike, labels: ArrayLike | None = None, quantile: float = 0.99
) -> float:
    """Image threshold from validation scores (N,): F1-max threshold if ``labels`` (N,) contain a
    defect, else the ``quantile`` of the (all normal) scores. Anomalous means ``score >= threshold``."""
    return _image_threshold(scores, labels, quantile)[0]


def _image_threshold(scores: ArrayLike, labels: ArrayLike | None, quantile: float) -> tuple[float, str]:
    q = _check_quantile(quantile)
    s = as_scores(scores, "scores").reshape(-1)
    if s.size == 0:
        raise ValueError("image_threshold_from_validation needs at least one score")
    y = np.zeros(s.shape, bool) if labels is None else as_bool(labels, "labels").reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"scores and labels must have the same length; got {s.shape} and {y.shape}")
    if y.any():
        return f1_max(s, y)[1], "f1_max"
    return float(np.quantile(s, q)), f"quantile:{q}"


def _subsample(m: np.ndarray, g: np.ndarray, max_pixels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random pixel subset (with replacement) when the maps exceed ``max_pixels``."""
    flat_m, flat_g = m.reshape(-1), g.reshape(-1)
    if flat_m.size <= max_pixels:
        return flat_m, flat_g
    idx = np.random.default_rng(seed).integers(0, flat_m.size, size=max_pixels)
    return flat_m[idx], flat_g[idx]


def pixel_threshold_from_validation(
    maps: ArrayLike,
    masks: ArrayLike | None = None,
    quantile: float = 0.999,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
) -> float:
    """Pixel threshold from validation maps (N,H,W): F1-max threshold if ``masks`` (N,H,W) contain a
    defect pixel, else the ``quantile`` of the normal pixel scores.

    Above ``max_pixels`` pixels a seeded uniform subsample of ``max_pixels`` pixels is used, so
    memory stays bounded whatever the validation set size.
    """
    return _pixel_threshold(maps, masks, quantile, max_pixels, seed)[0]


def _pixel_threshold(
    maps: ArrayLike, masks: ArrayLike | None, quantile: float, max_pixels: int, seed: int
) -> tuple[float, str]:
    q = _check_quantile(quantile)
    if max_pixels < 1:
        raise ConfigError(f"max_pixels must be >= 1, got {max_pixels}")
    raw = as_scores(maps, "maps")
    m, g = as_maps_and_masks(raw, np.zeros(raw.shape, bool) if masks is None else masks)
    vals, pos = _subsample(m, g, max_pixels, seed)
    if pos.any():
        return f1_max(vals, pos)[1], "f1_max"
    return float(np.quantile(vals, q)), f"quantile:{q}"


def thresholds_from_validation(
    scores: ArrayLike,
    maps: ArrayLike,
    labels: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
) -> Thresholds:
    """Both thresholds from one validation split; ``source`` records the rule used for each."""
    image, image_src = _image_threshold(scores, labels, image_quantile)
    pixel, pixel_src = _pixel_threshold(maps, masks, pixel_quantile, DEFAULT_MAX_PIXELS, 0)
    return Thresholds(image, pixel, f"validation image={image_src} pixel={pixel_src}")


def region_peak(amap: np.ndarray, min_area: int, iters: int = 32) -> float:
    """The highest threshold t at which ``amap > t`` still has a connected region (8-connected) of at least
    ``min_area`` pixels: the image is flagged at any pixel threshold below this value and clean at or above.

    Found by bisection between the map's minimum and maximum (the property is monotone in t); ``iters``
    halvings leave an error below (max - min) / 2**iters.
    """
    from scipy import ndimage

    m = np.asarray(amap, dtype=np.float64)
    if min_area <= 1:
        return float(m.max())
    if m.size < min_area:
        return float(m.min()) - 1.0  # no region can be that large: never flagged
    structure = np.ones((3, 3), bool)

    def has_region(t: float) -> bool:
        lab, n = ndimage.label(m > t, structure=structure)
        return n > 0 and int(np.bincount(lab.ravel())[1:].max()) >= min_area

    lo, hi = float(m.min()), float(m.max())
    if not has_region(lo):  # only pixels above the minimum form regions: none is large enough
        return lo - 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if has_region(mid):
            lo = mid
        else:
            hi = mid
    return hi


def pixel_threshold_for_region_rate(maps: ArrayLike, rate: float = 0.05, min_area: int = 16) -> float:
    """Pixel threshold at which at most a fraction ``rate`` of these (normal) maps (N, H, W) has any flagged
    region of ``min_area`` pixels or more: the (1 - rate) quantile, upper, of the per-image region peaks.

    A per-pixel quantile controls how many pixels are flagged, not on how many good parts a spurious defect
    is painted: at the 0.999 pixel quantile most good images can still have one flagged spot.
    """
    r = _check_quantile(rate)
    m = as_scores(maps, "maps")
    if m.ndim != 3 or m.shape[0] == 0:
        raise ValueError(f"maps must be (N, H, W) with N >= 1, got shape {m.shape}")
    if min_area < 1:
        raise ConfigError(f"min_area must be >= 1 pixel, got {min_area}")
    peaks = np.sort([region_peak(a, min_area) for a in m])
    # flagged iff peak > t; choose the smallest t with #(peak > t) <= floor(rate * N)
    allowed = int(math.floor(r * len(peaks) + 1e-9))
    return float(peaks[len(peaks) - 1 - allowed]) if allowed < len(peaks) else float(peaks[0]) - 1.0


def flagged_region_rate(maps: ArrayLike, threshold: float, min_area: int = 16) -> float:
    """Fraction of maps (N, H, W) with a connected region of at least ``min_area`` pixels above ``threshold``."""
    m = as_scores(maps, "maps")
    if m.shape[0] == 0:
        return float("nan")
    return float(np.mean([region_peak(a, min_area) > threshold for a in m]))


def defect_mask(amap: np.ndarray, threshold: float, min_area: int = 1) -> np.ndarray:
    """Boolean defect mask of one map (H, W): pixels >= ``threshold`` in connected regions (8-connected) of at
    least ``min_area`` pixels. The one rule behind predict's masks, the service's masks and the threshold."""
    from scipy import ndimage

    above = np.asarray(amap) >= threshold
    if min_area <= 1 or not above.any():
        return above
    lab, _ = ndimage.label(above, structure=np.ones((3, 3), bool))
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[lab]
