"""Metrics on gathered predictions (kdad.deploy.dataset.Predictions): the official image and pixel metrics, and
the same per defect type. One home for `kdad test`, its report, `kdad feedback` and the benchmarks."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from kdad.deploy.dataset import Predictions


def compute_metrics(pred: Predictions, pro_limit: float = 0.3) -> dict[str, float]:
    """Official image/pixel metrics on gathered predictions (images lacking a mask skip pixel metrics)."""
    from kdad.metrics import evaluate_maps

    assert pred.maps is not None and pred.masks is not None
    from kdad.metrics import image_ap, image_auroc, image_f1_max

    keep = pred.has_mask if pred.has_mask is not None else np.ones(len(pred.scores), bool)
    if keep.all():
        metrics = evaluate_maps(pred.maps, pred.masks, pred.scores, pred.labels, pro_limit=pro_limit)
    elif keep.any():  # pixel metrics only over images that have ground truth; image metrics over all
        metrics = evaluate_maps(pred.maps[keep], pred.masks[keep], pred.scores[keep], pred.labels[keep], pro_limit)
        metrics.update(image_auroc=image_auroc(pred.scores, pred.labels), image_ap=image_ap(pred.scores, pred.labels),
                       image_f1_max=image_f1_max(pred.scores, pred.labels)[0])
    else:
        metrics = {"image_auroc": image_auroc(pred.scores, pred.labels), "image_ap": image_ap(pred.scores, pred.labels),
                   "image_f1_max": image_f1_max(pred.scores, pred.labels)[0]}
    return {k: float(v) if isinstance(v, (int, float, np.floating)) else v for k, v in metrics.items()}


def select(pred: Predictions, idx: Sequence[int] | np.ndarray) -> Predictions:
    """The predictions of the images at `idx` (maps and masks too, when kept)."""
    idx = np.asarray(idx, dtype=np.int64)

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[idx]

    return Predictions(scores=pred.scores[idx], labels=pred.labels[idx], paths=[pred.paths[i] for i in idx],
                       defect_types=[pred.defect_types[i] for i in idx], map_means=pred.map_means[idx],
                       maps=pick(pred.maps), masks=pick(pred.masks), has_mask=pick(pred.has_mask))


_BY_TYPE_KEYS = ("image_auroc", "pixel_auroc", "au_pro")


def metrics_by_defect_type(pred: Predictions, pro_limit: float = 0.3) -> dict[str, dict[str, float | int]]:
    """Per defect type: image AUROC, pixel AUROC and AU-PRO of that type's images against all good images (the
    pixel metrics only where maps and masks are kept), and its image count. Tells which defects a model
    finds and which it only flags; the overall numbers mix them by the test set's proportions."""
    from kdad.metrics import MetricWarning, image_auroc

    types = np.asarray(pred.defect_types, dtype=object)
    good = np.flatnonzero(pred.labels == 0)
    out: dict[str, dict[str, float | int]] = {}
    for t in sorted({d for d, lab in zip(pred.defect_types, pred.labels) if lab != 0}):
        idx = np.concatenate([good, np.flatnonzero((types == t) & (pred.labels != 0))])
        sub = select(pred, idx)
        with warnings.catch_warnings():  # no good images: nan, the caller shows it as undefined
            warnings.simplefilter("ignore", MetricWarning)
            if sub.maps is None or sub.masks is None:
                m: dict[str, float] = {"image_auroc": float(image_auroc(sub.scores, sub.labels))}
            else:
                m = compute_metrics(sub, pro_limit)
        out[str(t)] = {**{k: m[k] for k in _BY_TYPE_KEYS if k in m}, "n": int(len(idx) - len(good))}
    return out
