"""One call for the standard report: image and pixel AUROC / AP / F1-max and AU-PRO."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from kdad.metrics._core import (
    Ranked,
    ap_ranked,
    as_maps_and_masks,
    as_scores_and_labels,
    auroc_ranked,
    check_limit,
    f1_max_ranked,
    rank,
    warn,
)
from kdad.metrics.pro import au_pro_prepared, region_pixels

PIXEL_KEYS: tuple[str, ...] = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "au_pro")


def evaluate_maps(
    maps: ArrayLike,
    masks: ArrayLike,
    scores: ArrayLike | None,
    labels: ArrayLike,
    pro_limit: float = 0.3,
) -> dict[str, float]:
    """Standard metrics of one category.

    maps: (N, H, W) or (N, 1, H, W) anomaly maps; masks: same shape, nonzero = defect;
    scores: (N,) image scores, or None for the official max of each map; labels: (N,) from the
    dataset (not from the masks, REFERENCE §3.9). Keys: image_auroc, image_ap, image_f1_max,
    pixel_auroc, pixel_ap, pixel_f1_max, au_pro. If no mask has a defect pixel the pixel metrics
    are skipped: they are ``nan`` and one MetricWarning says so. F1-max values are oracle scores.
    """
    limit = check_limit(pro_limit, "pro_limit")
    m, g = as_maps_and_masks(maps, masks)
    image_scores = m.reshape(m.shape[0], -1).max(axis=1) if scores is None else scores
    s, y = as_scores_and_labels(image_scores, labels)
    if s.size != m.shape[0]:
        raise ValueError(f"{s.size} image scores/labels for {m.shape[0]} maps")
    images = rank(s, y)
    out = {
        "image_auroc": auroc_ranked(images, "image_auroc"),
        "image_ap": ap_ranked(images, "image_ap"),
        "image_f1_max": f1_max_ranked(images, "image_f1_max")[0],
    }
    if not g.any():
        warn("no mask has a defect pixel: pixel metrics skipped (nan)")
        return out | {key: float("nan") for key in PIXEL_KEYS}
    regions = region_pixels(m, g)
    pixels = Ranked(np.sort(m, axis=None), regions.values)  # region pixels = all positive pixels
    out["pixel_auroc"] = auroc_ranked(pixels, "pixel_auroc")
    out["pixel_ap"] = ap_ranked(pixels, "pixel_ap")
    out["pixel_f1_max"] = f1_max_ranked(pixels, "pixel_f1_max")[0]
    out["au_pro"] = au_pro_prepared(m, regions, limit, pixels)
    return out
