"""Image- and pixel-level AUROC, AP and F1-max (equal to scikit-learn's, computed from one sort).

Undefined cases (a single class) return ``nan`` and emit a :class:`MetricWarning` naming the metric.
"""

from __future__ import annotations

from numpy.typing import ArrayLike

from kdad.metrics._core import (
    Ranked,
    ap_ranked,
    as_maps_and_masks,
    as_scores_and_labels,
    auroc_ranked,
    f1_max_ranked,
    rank,
)


def _rank_images(scores: ArrayLike, labels: ArrayLike) -> Ranked:
    s, y = as_scores_and_labels(scores, labels)
    return rank(s, y)


def _rank_pixels(maps: ArrayLike, masks: ArrayLike) -> Ranked:
    m, g = as_maps_and_masks(maps, masks)
    return rank(m, g)


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """AUROC of image scores (N,) against labels (N,) in {0,1}; ties count 1/2 (= sklearn).

    Constant scores give 0.5; a single class gives ``nan`` with a MetricWarning.
    """
    return auroc_ranked(_rank_images(scores, labels), "image_auroc")


def image_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision (sklearn step sum) of image scores (N,); ``nan`` + warning if no positive."""
    return ap_ranked(_rank_images(scores, labels), "image_ap")


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Best F1 over thresholds ``score >= t`` and that threshold (any shape, flattened).

    As sklearn's precision_recall_curve: the final (P=1, R=0) point is skipped and 0/0 counts as 0;
    among equal F1 values the lowest threshold is returned. This picks the threshold on the labels
    it is scored on (an oracle, REFERENCE §6). ``(nan, nan)`` + warning if there is no positive.
    """
    return f1_max_ranked(_rank_images(scores, labels), "f1_max")


def image_f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """:func:`f1_max` on image scores (N,) -> (f1, threshold)."""
    return f1_max_ranked(_rank_images(scores, labels), "image_f1_max")


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """AUROC over all pixels of maps (N,H,W) vs masks (N,H,W), normal images included (= sklearn)."""
    return auroc_ranked(_rank_pixels(maps, masks), "pixel_auroc")


def pixel_ap(maps: ArrayLike, masks: ArrayLike) -> float:
    """Average precision over all pixels of maps (N,H,W) vs masks (N,H,W) (= sklearn)."""
    return ap_ranked(_rank_pixels(maps, masks), "pixel_ap")


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> tuple[float, float]:
    """Best pixel F1 over thresholds ``score >= t`` and that threshold (oracle, see :func:`f1_max`)."""
    return f1_max_ranked(_rank_pixels(maps, masks), "pixel_f1_max")
