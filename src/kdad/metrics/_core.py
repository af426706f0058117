"""Shared machinery: input conversion, rank statistics on sorted arrays, curve integration.

Every pixel metric here works on one ascending sort of all scores plus a (small) sorted array of
the positive scores; counts above a threshold come from ``np.searchsorted``, so no float64 copy of
the maps and no int64 sort index over all pixels is ever built.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kdad.errors import ConfigError


class MetricWarning(UserWarning):
    """A metric is undefined for the given data (e.g. only one class); it returned ``nan``."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn(message: str) -> None:
    """``warnings.warn(message, MetricWarning)`` pointing at the first caller outside ``kdad/metrics``.

    The stack level is counted, not written down, so it stays right whatever helpers (or comprehension frames
    before Python 3.12) lie between the public metric and here."""
    frame, level = sys._getframe(1), 2  # level 1 = this function, 2 = its caller
    while frame.f_back is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, MetricWarning, stacklevel=level)


def undefined(metric: str, reason: str) -> float:
    """Warn that ``metric`` is undefined and return ``nan`` (never a silent NaN); the warning points at the line
    that called the public metric."""
    warn(f"{metric} is undefined: {reason}; returning nan")
    return float("nan")


def to_numpy(x: Any) -> np.ndarray:
    """Torch tensor or array-like -> numpy array, without copying CPU tensors."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_scores(x: ArrayLike, name: str) -> np.ndarray:
    """Float scores in their own precision (float16/int -> float32/float64); NaN is rejected."""
    arr = to_numpy(x)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def as_bool(x: ArrayLike, name: str) -> np.ndarray:
    """Labels / masks -> bool (nonzero = anomalous); rejects negative values."""
    arr = to_numpy(x)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be bool or numeric, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be 0/1 (or bool), found negative values")
    return arr != 0


def as_maps_and_masks(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate maps (N,H,W) or (N,1,H,W) and masks of the same shape; returns C-contiguous arrays."""
    m = as_scores(maps, "maps")
    g = as_bool(masks, "masks")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim == 2 and g.ndim == 2:
        m, g = m[None], g[None]
    if m.ndim != 3 or m.shape != g.shape:
        raise ValueError(f"maps and masks must be (N, H, W) of one shape; got {m.shape}, {g.shape}")
    return np.ascontiguousarray(m), np.ascontiguousarray(g)


def as_scores_and_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D image scores (N,) and labels (N,)."""
    s = as_scores(scores, "scores").reshape(-1)
    y = as_bool(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length; got {s.shape} and {y.shape}")
    return s, y


def check_limit(limit: float, option: str = "limit") -> float:
    """Integration limit must lie in (0, 1]."""
    value = float(limit)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ConfigError(f"{option} must be in (0, 1], got {limit!r}")
    return value


@dataclass(frozen=True)
class Ranked:
    """All scores sorted ascending (P,) and the positive scores sorted ascending (M,)."""

    all_sorted: np.ndarray
    pos_sorted: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.pos_sorted.size)

    @property
    def n_neg(self) -> int:
        return int(self.all_sorted.size - self.pos_sorted.size)


def rank(scores: np.ndarray, positive: np.ndarray) -> Ranked:
    """Sort all scores (one copy in their own dtype) and the positive ones."""
    return Ranked(np.sort(scores, axis=None), np.sort(scores[positive], axis=None))


def _distinct_desc(sorted_asc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array, descending, with their counts (int64)."""
    if sorted_asc.size == 0:
        return sorted_asc[:0], np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], sorted_asc[1:] != sorted_asc[:-1])))
    counts = np.diff(np.append(starts, sorted_asc.size)).astype(np.int64)
    return sorted_asc[starts][::-1], counts[::-1]


def count_ge(sorted_asc: np.ndarray, values: np.ndarray) -> NDArray[np.int64]:
    """Number of elements >= each value."""
    return (sorted_asc.size - np.searchsorted(sorted_asc, values, side="left")).astype(np.int64)


def count_gt(sorted_asc: np.ndarray, values: np.ndarray) -> NDArray[np.int64]:
    """Number of elements > each value."""
    return (sorted_asc.size - np.searchsorted(sorted_asc, values, side="right")).astype(np.int64)


def auroc_ranked(r: Ranked, metric: str) -> float:
    """Mann-Whitney AUROC with ties counted 1/2 (= sklearn roc_auc_score)."""
    if r.n_pos == 0 or r.n_neg == 0:
        return undefined(metric, "only one class present (need normal and anomalous samples)")
    values, counts = _distinct_desc(r.pos_sorted)
    below = np.searchsorted(r.all_sorted, values, side="left").astype(np.int64)
    at_or_below = np.searchsorted(r.all_sorted, values, side="right").astype(np.int64)
    # Twice the midrank sum of positives, in exact integers.
    twice_rank_sum = int(np.sum(counts * (below + at_or_below + 1)))
    twice_u = twice_rank_sum - r.n_pos * (r.n_pos + 1)
    return float(twice_u / (2.0 * r.n_pos * r.n_neg))


def _pr_points(r: Ranked) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct positive score v (descending): v, #pos == v, TP(>=v), predicted(>=v)."""
    values, counts = _distinct_desc(r.pos_sorted)
    tp = np.cumsum(counts)
    predicted = count_ge(r.all_sorted, values)
    return values, counts, tp, predicted


def ap_ranked(r: Ranked, metric: str) -> float:
    """Average precision as sklearn's step sum: sum_k (R_k - R_{k-1}) P_k."""
    if r.n_pos == 0:
        return undefined(metric, "no anomalous samples")
    _, counts, tp, predicted = _pr_points(r)
    return float(np.sum(counts * (tp / predicted)) / r.n_pos)


def f1_max_ranked(r: Ranked, metric: str) -> tuple[float, float]:
    """Max F1 over thresholds 'score >= t' and the (lowest) threshold reaching it."""
    if r.n_pos == 0:
        return undefined(metric, "no anomalous samples"), float("nan")
    values, _, tp, predicted = _pr_points(r)
    # F1 = 2PR/(P+R) = 2TP/(predicted + n_pos); the max always sits at a positive score.
    f1 = 2.0 * tp / (predicted + r.n_pos)
    best = np.flatnonzero(f1 == f1.max())[-1]  # lowest threshold among ties, as sklearn's argmax
    return float(f1[best]), float(values[best])


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area of a curve (fpr non-decreasing) from 0 to ``limit``, interpolating at the limit,
    divided by ``limit`` (MVTec AD ``trapezoid`` + normalisation)."""
    inside = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    if inside < fpr.size and x[-1] < limit:
        x0, y0, x1, y1 = fpr[inside - 1], pro[inside - 1], fpr[inside], pro[inside]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += float((limit - x0) * (y0 + y_lim) / 2.0)
    return float(area / limit)


def top_sorted(scores: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
    """The ``k`` largest scores sorted ascending, and whether that is all of them.

    ``np.partition`` + a sort of the top part is several times faster than a full sort when only
    the low-FPR end of a curve is needed."""
    flat = scores.reshape(-1)
    if k >= flat.size:
        return np.sort(flat), True
    part = np.partition(flat, flat.size - k)
    top = np.sort(part[flat.size - k :])
    del part
    return top, False


def overlap_curve(
    all_top: np.ndarray,
    full: bool,
    union_sorted: np.ndarray,
    entry_values: np.ndarray,
    entry_weights: np.ndarray,
    n_neg: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact overlap-vs-FPR polyline (the curve of one global descending sort with tie runs merged).

    all_top: the largest scores of all pixels, ascending (all of them when ``full``).
    union_sorted: ascending scores of the pixels that are *not* negatives (regions / any channel).
    entry_values/entry_weights: ascending scores and overlap increments (e.g. 1/(|r|·R)).
    Negatives between two distinct entry values form a horizontal run; negatives tied with an entry
    value form the diagonal of that tie block. When not ``full`` the curve stops at the smallest
    score of ``all_top`` (its counts are only exact above it).
    Returns fpr, overlap (float64), starting at (0, 0); a full curve ends at (1, 1).
    """
    if entry_values.size:
        starts = np.flatnonzero(np.concatenate(([True], entry_values[1:] != entry_values[:-1])))
        values = entry_values[starts][::-1]
        weights = np.add.reduceat(entry_weights.astype(np.float64, copy=False), starts)[::-1]
    else:
        values, weights = entry_values, np.zeros(0)
    if full:
        end = n_neg
    else:
        floor = all_top[:1]
        values, weights = values[values > floor[0]], weights[values > floor[0]]
        end = int(count_gt(all_top, floor)[0] - count_gt(union_sorted, floor)[0])
    level = np.minimum(np.concatenate(([0.0], np.cumsum(weights))), 1.0)
    neg_ge = count_ge(all_top, values) - count_ge(union_sorted, values)
    neg_gt = count_gt(all_top, values) - count_gt(union_sorted, values)
    runs = np.empty(2 * values.size + 1, np.int64)
    runs[0::2] = np.append(neg_gt, end) - np.concatenate(([0], neg_ge))  # horizontal runs
    runs[1::2] = neg_ge - neg_gt  # tie blocks (diagonals), 0 = vertical step
    y_after = np.empty(runs.size, np.float64)
    y_after[0::2] = level
    y_after[1::2] = level[1:]
    fpr = np.concatenate(([0.0], np.cumsum(runs) / n_neg))
    pro = np.concatenate(([0.0], y_after))
    if full:
        fpr, pro = np.append(np.minimum(fpr, 1.0), 1.0), np.append(pro, 1.0)
    return fpr, pro
