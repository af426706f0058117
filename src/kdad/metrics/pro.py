"""AU-PRO exactly as the MVTec AD evaluation script, and RD4AD's legacy per-image PRO.

Official definition (REFERENCE §5): regions are 8-connected components of each mask; FPR counts the
normal pixels of *all* images; PRO averages the overlap over all regions with equal weight; one
global descending sort, tie runs collapsed to their last point, (0,0) prepended and (1,1) appended,
trapezoid up to the limit with linear interpolation at the limit, divided by the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from kdad.metrics._core import (
    Ranked,
    area_to_limit,
    as_maps_and_masks,
    check_limit,
    overlap_curve,
    top_sorted,
    undefined,
    warn,
)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class RegionPixels:
    """Region pixels of all masks: scores ascending (M,) and PRO increments 1/(|r|·R) aligned (M,)."""

    values: np.ndarray
    weights: np.ndarray
    n_regions: int


def region_pixels(maps: np.ndarray, masks: np.ndarray) -> RegionPixels:
    """Label 8-connected regions per image and sort the region pixels by score."""
    inv_sizes = []
    n_regions = 0
    for i in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        labels, count = ndimage.label(masks[i], structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel())
        inv_sizes.append(1.0 / sizes[labels[masks[i]]])
        n_regions += int(count)
    values = maps[masks]  # same row-major order as the per-image loop above
    if n_regions == 0:
        return RegionPixels(values, np.zeros(0), 0)
    order = np.argsort(values, kind="stable")
    weights = np.concatenate(inv_sizes)[order] / n_regions
    return RegionPixels(values[order], weights, n_regions)


def _pro_curve_from(
    maps: np.ndarray, regions: RegionPixels, all_sorted: np.ndarray | None, limit: float
) -> tuple[np.ndarray, np.ndarray]:
    n_neg = maps.size - regions.values.size
    if all_sorted is not None:
        top, full = all_sorted, True
    else:
        k = math.ceil(limit * n_neg) + regions.values.size + 1
        top, full = top_sorted(maps, k)
    fpr, pro = overlap_curve(top, full, regions.values, regions.values, regions.weights, n_neg)
    if not full and fpr[-1] < limit:  # ties at the partition boundary: fall back to a full sort
        return _pro_curve_from(maps, regions, np.sort(maps, axis=None), limit)
    return fpr, pro


def au_pro_prepared(
    maps: np.ndarray, regions: RegionPixels, limit: float, ranked: Ranked | None = None
) -> float:
    """AU-PRO from validated maps (N,H,W) and precomputed regions; reuses a full sort if given."""
    if regions.n_regions == 0:
        return undefined("au_pro", "no mask has an anomalous pixel")
    if maps.size == regions.values.size:
        return undefined("au_pro", "no normal pixel, so the FPR is undefined")
    fpr, pro = _pro_curve_from(maps, regions, None if ranked is None else ranked.all_sorted, limit)
    return area_to_limit(fpr, pro, limit)


def au_pro(maps: ArrayLike, masks: ArrayLike, limit: float = 0.3) -> float:
    """Area under the PRO curve up to FPR ``limit``, divided by ``limit`` (MVTec AD definition).

    maps: (N, H, W) or (N, 1, H, W) real scores (numpy or torch); masks: same shape, nonzero = defect.
    limit: any value in (0, 1]. Returns a value in [0, 1]; ``nan`` with a MetricWarning when no mask
    has a defect pixel. Exact: no threshold grid. Memory: one sorted copy of the maps in their dtype.
    """
    limit = check_limit(limit, "limit")
    m, g = as_maps_and_masks(maps, masks)
    return au_pro_prepared(m, region_pixels(m, g), limit)


def pro_curve(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve (for plots): fpr (K,), pro (K,) float64, from (0, 0) to (1, 1).

    Same inputs as :func:`au_pro`; ``au_pro`` integrates this curve. K <= 2·(#distinct region
    scores) + 3. Raises ValueError if the masks have no defect pixel or no normal pixel.
    """
    m, g = as_maps_and_masks(maps, masks)
    regions = region_pixels(m, g)
    if regions.n_regions == 0 or m.size == regions.values.size:
        raise ValueError("pro_curve needs both defect pixels and normal pixels in masks")
    return _pro_curve_from(m, regions, np.sort(m, axis=None), 1.0)


def _legacy_one_image(amap: np.ndarray, mask: np.ndarray, steps: int, max_fpr: float) -> float:
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel())
    region_vals = amap[mask]
    order = np.argsort(region_vals, kind="stable")
    region_vals = region_vals[order]
    # PRO(th) = mean over regions of |{p in r: s_p > th}| / |r|: suffix sums of 1/(|r|·count).
    tail = np.cumsum((1.0 / sizes[labels[mask]][order] / count)[::-1])[::-1]
    tail = np.append(tail, 0.0)
    normal_vals = np.sort(amap[~mask])
    lo, hi = float(amap.min()), float(amap.max())
    thresholds = np.arange(lo, hi, (hi - lo) / steps)  # as RD4AD: min .. max - delta
    pro = tail[np.searchsorted(region_vals, thresholds, side="right")]
    fpr = (normal_vals.size - np.searchsorted(normal_vals, thresholds, side="right")) / normal_vals.size
    keep = fpr < max_fpr
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size == 0 or fpr.max() == 0:
        return float("nan")
    fpr = fpr / fpr.max()  # RD4AD's normalisation by the largest kept FPR (not by max_fpr)
    return float(-np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)  # fpr decreases with th


def legacy_rd4ad_pro(maps: ArrayLike, masks: ArrayLike, steps: int = 200, max_fpr: float = 0.3) -> float:
    """LEGACY RD4AD per-image PRO (hq-deng/RD4AD ``compute_pro``), for reproducing old tables only.

    Per anomalous image: ``steps`` thresholds from its min to its max, binarise ``score > th``, FPR
    over that image's normal pixels, keep FPR < ``max_fpr``, divide FPR by the largest kept FPR,
    trapezoid; then the mean over images. Normal images are ignored. This is NOT AU-PRO (§3.9).
    Images where the value is undefined (constant map, no kept FPR > 0, no normal pixel) are skipped
    with a MetricWarning; ``nan`` (with a warning) if none is left.
    """
    m, g = as_maps_and_masks(maps, masks)
    values = []
    for i in np.flatnonzero(g.reshape(g.shape[0], -1).any(axis=1)):
        if g[i].all() or m[i].min() == m[i].max():
            value = float("nan")
        else:
            value = _legacy_one_image(m[i], g[i], steps, max_fpr)
        if math.isnan(value):
            warn(f"legacy_rd4ad_pro: image {i} gives no usable curve; skipped")
        else:
            values.append(value)
    if not values:
        return undefined("legacy_rd4ad_pro", "no anomalous image with a usable curve")
    return float(np.mean(values))
