"""Run a model over a dataset, gather maps and scores, compute metrics, write metrics.json + scores.csv."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdad.align import AlignSpec, aligned_forward
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import DataConfig, TrainConfig
from kdad.data.factory import dataset_parts
from kdad.deploy import postprocess
from kdad.deploy.dataset import Predictions, predict
from kdad.errors import ConfigError
from kdad.fileio import atomic_write_text
from kdad.prediction_metrics import compute_metrics  # also its old import path (kdad.feedback, benchmarks)
from kdad.seed import resolve_device
from kdad.tiling import TileSpec


def thresholds_from_normals(model: nn.Module, ds: Dataset, device: torch.device, tc: TrainConfig,
                            tiles: TileSpec | None = None, crossfit: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> tuple[Any, dict[str, float], np.ndarray]:
    """Image and pixel thresholds from normal images only, the overlay colour range and the normal images'
    scores (N,), sorted (the calibration scores the service's drift statistic compares with). The image threshold
    follows tc.image_threshold_rule (conformal at tc.alpha, or a quantile), see :func:`thresholds_from_predictions`.
    tiles: the images are tiled and stitched (the pixel threshold is then taken over the metric-size maps, see
    docs/tiling.md).
    crossfit: the same images' (scores, maps) from kdad.train.crossfit_scores: both thresholds and the returned
    scores come from them, and the model is not run here."""
    if crossfit is None:
        pred = predict(model, ds, device, tc.eval_batch_size, keep_maps=True, tiles=tiles)
        assert pred.maps is not None
        scores, maps, note = pred.scores, pred.maps, ""
    else:
        scores, maps = crossfit
        note = (", cross-fitted (each half of the held-out normals scored with map statistics from the other half; "
                "their maps too, for the pixel threshold)")
    thr, display = thresholds_from_predictions(scores, maps, tc, note)
    return thr, display, np.sort(np.asarray(scores, dtype=np.float64))


def image_threshold_rule(scores: np.ndarray, tc: TrainConfig) -> tuple[float, str, float | None]:
    """(image threshold, its source in words, alpha or None) from normal scores (N,) under tc's rule; warns
    (UserWarning) when N is too small for tc.alpha."""
    import warnings

    from kdad.thresholds import conformal_threshold, image_threshold_from_validation

    n = len(scores)
    if tc.image_threshold_rule == "quantile":
        img = image_threshold_from_validation(scores, None, quantile=tc.threshold_quantile)
        return img, f"{tc.threshold_quantile} quantile of {n} normal scores", None
    if tc.image_threshold_rule != "conformal":
        raise ConfigError(f"train.image_threshold_rule: {tc.image_threshold_rule!r} is not 'conformal' or 'quantile'")
    conf = conformal_threshold(scores, tc.alpha)
    if conf.warning:
        warnings.warn(conf.warning, UserWarning, stacklevel=3)
    return conf.threshold, f"conformal alpha={conf.alpha:g}: score of rank {conf.rank} of {n} normal scores", conf.alpha


def thresholds_from_predictions(scores: np.ndarray, maps: np.ndarray, tc: TrainConfig,
                                image_note: str = "") -> tuple[Any, dict[str, float]]:
    """Thresholds (a kdad.thresholds.Thresholds) and display range from normal scores (N,) and maps (N, H, W);
    `image_note` is appended to the image rule's description in the source text."""
    from kdad.thresholds import (
        Thresholds,
        flagged_region_rate,
        pixel_threshold_for_region_rate,
        pixel_threshold_from_validation,
    )

    img, img_src, alpha = image_threshold_rule(scores, tc)
    img_src += image_note
    n = len(scores)
    n_cal = n if alpha is not None else None
    if tc.pixel_threshold_rule == "region":
        pix = pixel_threshold_for_region_rate(maps, tc.pixel_region_rate, tc.pixel_min_area)
        rate = flagged_region_rate(maps, pix, tc.pixel_min_area)
        thr = Thresholds(image=float(img), pixel=float(pix), min_area=tc.pixel_min_area, alpha=alpha,
                         n_calibration=n_cal, source=(
                             f"image: {img_src}; pixel: at most {tc.pixel_region_rate:g} of those images with a "
                             f"region of >= {tc.pixel_min_area} px flagged (measured {rate:.3f})"))
    elif tc.pixel_threshold_rule == "quantile":
        pix = pixel_threshold_from_validation(maps, None, quantile=tc.pixel_threshold_quantile)
        source = (f"normal-image quantiles ({tc.threshold_quantile}, {tc.pixel_threshold_quantile}) over {n} images"
                  if alpha is None else f"image: {img_src}; pixel: {tc.pixel_threshold_quantile} quantile of their "
                  "pixels")
        thr = Thresholds(image=float(img), pixel=float(pix), alpha=alpha, n_calibration=n_cal, source=source)
    else:
        raise ConfigError(f"train.pixel_threshold_rule: {tc.pixel_threshold_rule!r} is not 'region' or 'quantile'")
    return thr, display_range(float(pix), maps)


def display_range(pixel_threshold: float, maps: np.ndarray | None = None) -> dict[str, float]:
    """A fixed colour range for overlays: [median normal pixel, 2 * threshold - median] (kdad.deploy.postprocess)."""
    vmin, vmax, _ = postprocess.display_range(None, pixel_threshold, maps)
    return {"vmin": vmin, "vmax": vmax}


def write_scores_csv(path: Path, preds: dict[str, Predictions], image_threshold: float | None) -> None:
    """Per-image scores (and decisions at the stored threshold) per category as CSV, written atomically."""
    post = postprocess.PostProcess(image_threshold)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "path", "defect_type", "label", "score", "decision"])
    for cat, pred in preds.items():
        for p, t, lab, s in zip(pred.paths, pred.defect_types, pred.labels, pred.scores):
            decision = post.decision(float(s))
            w.writerow([cat, p, t, int(lab), f"{float(s):.6g}", "" if decision is None else decision])
    atomic_write_text(path, buf.getvalue())


def good_images_flagged(pred: Predictions, thr: dict[str, Any]) -> dict[str, Any] | None:
    """On the good test images: the fraction whose defect mask at the stored pixel threshold is not empty
    (what `kdad predict --masks` would paint on good parts), next to the rate the threshold was chosen for."""
    post = postprocess.PostProcess.from_thresholds(thr)
    if pred.maps is None or post.pixel_threshold is None:
        return None
    good = np.flatnonzero(pred.labels == 0)
    area = post.min_area
    flagged = [bool(post.mask(pred.maps[i]).any()) for i in good]  # type: ignore[union-attr]
    return {"rate": float(np.mean(flagged)) if flagged else None, "n_good": int(len(good)), "min_area": area}


def false_alarms(pred: Predictions, thr: dict[str, Any]) -> dict[str, Any] | None:
    """On the good test images: how many the stored image threshold flags, the rate with its exact binomial 95 %
    interval, next to the alpha the threshold guarantees (None for a quantile threshold). None without a
    threshold or without good images."""
    from kdad.thresholds import clopper_pearson

    post = postprocess.PostProcess.from_thresholds(thr)
    good = pred.scores[pred.labels == 0]
    if post.image_threshold is None or len(good) == 0:
        return None
    k, n = int(post.flagged(good).sum()), int(len(good))
    return {"flagged": k, "n_good": n, "rate": k / n, "ci95": list(clopper_pearson(k, n)),
            "alpha": thr.get("alpha"), "n_calibration": thr.get("n_calibration")}


def invalid_decisions(post: postprocess.PostProcess, gate_scores: Any, ds: Dataset,
                      batch_size: int = 16) -> dict[str, Any]:
    """The invalid-input gate's verdict (``post.invalid_reason``) on every image of a test set: how many test
    normals and test defects it calls ``invalid`` (count, n, rate each) and how often each reason comes up.

    gate_scores: images01 (B, 3, H, W) -> gate scores (B,) (a Gate module or a runner's ``gate_scores``)."""
    from torch.utils.data import DataLoader

    counts = {0: [0, 0], 1: [0, 0]}  # label -> [invalid, n]
    reasons: dict[str, int] = {}
    with torch.inference_mode():
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
            images = batch["image"]
            g = np.asarray(torch.as_tensor(gate_scores(images)).float().cpu(), dtype=np.float64).reshape(-1)
            for j, label in enumerate(np.asarray(batch["label"]).astype(int)):
                reason = post.invalid_reason(float(g[j]), images[j].numpy())
                counts[int(label > 0)][1] += 1
                if reason is not None:
                    counts[int(label > 0)][0] += 1
                    kind = reason.split(":")[0]  # "flat frame ...", "overexposed", "unlike the training images"
                    reasons[kind] = reasons.get(kind, 0) + 1

    def share(k: int, n: int) -> dict[str, Any]:
        return {"invalid": k, "n": n, "rate": k / n if n else None}

    return {"normals": share(*counts[0]), "defects": share(*counts[1]), "reasons": reasons,
            "gate_threshold": post.gate_threshold}


def _gate_scorer(bundle: dict[str, Any], model: nn.Module, forward: Any, device: torch.device) -> Any:
    """What scores the gate for evaluate_run: the ONNX runner's gate graph, or the bundle's Gate on the model;
    None when the run has no gate."""
    if hasattr(forward, "gate_scores"):  # an ONNX runner: its gate graph (None when exported without one)
        return forward.gate_scores if getattr(forward, "gate_session", None) is not None else None
    if bundle.get("gate") is None:
        return None
    from kdad.gate import Gate

    module = Gate.from_bundle(bundle["gate"]).module(model).to(device).eval()
    return lambda images01: module(images01.to(device).float())


def _mean_metrics(per_category: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric over categories (NaN-aware: a category without the metric is left out)."""
    keys = sorted({k for r in per_category.values() for k in r["metrics"]})
    out = {}
    for k in keys:
        vals = [r["metrics"].get(k) for r in per_category.values()]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and not np.isnan(v)]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def loco_metrics(pred: Predictions, ds: Any) -> dict[str, float]:
    """MVTec LOCO AD protocol (REFERENCE §5) on gathered predictions of a dataset with per-defect channels.

    AU-sPRO at LOCO's limits for structural and logical anomalies, each with all good images, and their mean
    (keys ``au_spro_<subset>@<limit>``); image AUROC per subset and mean (``image_auroc_<subset>``). Channels
    come from ``ds.spro_channels(i, map size)`` by index, in the order ``predict`` used.
    """
    from kdad.metrics import image_auroc, loco_spro_subsets
    from kdad.metrics.spro import LOCO_LIMITS, LOCO_SUBSETS

    assert pred.maps is not None
    kinds = list(ds.loco_kinds)
    if len(kinds) != len(pred.scores):
        raise ValueError(f"LOCO dataset has {len(kinds)} items but predictions cover {len(pred.scores)}")
    size = (int(pred.maps.shape[1]), int(pred.maps.shape[2]))
    channels = [ds.spro_channels(i, size) for i in range(len(kinds))]
    out: dict[str, float] = {}
    for subset, values in loco_spro_subsets(pred.maps, channels, kinds, LOCO_LIMITS).items():
        out.update({f"au_spro_{subset}@{limit:g}": float(v) for limit, v in values.items()})
    aurocs = []
    for subset in LOCO_SUBSETS:
        keep = np.array([k in ("good", subset) for k in kinds])
        aurocs.append(float(image_auroc(pred.scores[keep], pred.labels[keep])))
        out[f"image_auroc_{subset.split('_')[0]}"] = aurocs[-1]
    out["image_auroc_mean"] = float(np.mean(aurocs))
    return out


def evaluate_run(run_dir: str | Path, data: DataConfig | None = None, device: str = "auto",
                 out_dir: str | Path | None = None, batch_size: int = 16, report: bool = True,
                 checkpoint: str | Path | None = None, backend: str = "torch") -> dict[str, Any]:
    """Test a trained run: metrics.json, scores.csv and report.html in out_dir (default run_dir).

    backend "onnx": the run's exported graph (RUN/model.onnx, or X.onnx beside checkpoint X.ckpt) runs in ONNX
    Runtime instead of the checkpoint in PyTorch, with the same data, metrics and thresholds, so export parity
    is read on the metrics a user reads.

    Multi-class runs (data.categories) are evaluated per category; `metrics` is then the mean over
    categories, `per_category` holds each one, and report_<category>.html is written per category.
    """
    run_dir = Path(run_dir)
    bundle = load_bundle(checkpoint or run_dir / "model.ckpt")
    model, cfg = model_from_bundle(bundle)
    data = data or cfg.data
    dev = resolve_device(device)
    model.to(dev)
    forward: Any = model
    if backend == "onnx":
        from kdad.deploy.runner import OnnxRunner
        from kdad.export import default_onnx_path

        graph = default_onnx_path(checkpoint or run_dir)
        if not graph.is_file():
            raise ConfigError(f"no exported graph {graph}; run `kdad export {checkpoint or run_dir}` first")
        forward = OnnxRunner(graph)
    elif backend != "torch":
        raise ConfigError(f"backend {backend!r} is not one of ['torch', 'onnx']")
    thr = bundle.get("thresholds") or {}
    tiles = TileSpec.from_data(data)
    align = AlignSpec.from_data(cfg.data)  # the model's own: it was trained on aligned images
    forward = aligned_forward(forward, align)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "method": cfg.method, "image_size": data.image_size, "thresholds": thr, "display": bundle.get("display"),
        "protocol": "maps and masks at image_size (masks bilinear-resized, binarised at 0.5); AU-PRO official "
                    "dataset-level @0.3; image label from folder; last/held-out-selected checkpoint",
        "train_info": bundle.get("train_info", {}), "backend": backend,
    }
    if tiles is not None:
        base["protocol"] = ("tiled: image_size tiles of the full image, maps stitched (mean over overlaps), score = "
                            "max of the full-size stitched map; pixel metrics on maps area-pooled and masks "
                            "max-pooled to metric_map_size when the long side exceeds tile_metric_size; AU-PRO "
                            "official dataset-level @0.3")
    if align is not None:
        base["align"] = align.to_dict()
        base["protocol"] += ("; pose-aligned: the model sees each image turned to the part's axis, its map is "
                             "warped back onto the image, so masks and pixel metrics are in the image's own frame")
        if align.region == "part":
            base["protocol"] += ("; map and image score kept on the part's envelope (data.align_region=part): "
                                 "positions off it hold the map's minimum")
    per_category: dict[str, dict[str, Any]] = {}
    preds: dict[str, Predictions] = {}
    parts = dataset_parts(data, "test")
    gate_scorer = None if tiles is not None else _gate_scorer(bundle, model, forward, dev)
    post = forward.post if backend == "onnx" else postprocess.PostProcess.from_thresholds(thr, gate=bundle.get("gate"))
    for name, ds in parts:
        pred = predict(forward, ds, dev, batch_size, keep_maps=True, progress=cfg.train.progress, tiles=tiles)
        per_category[name] = {"n_images": int(len(pred.scores)), "metrics": compute_metrics(pred)}
        per_category[name]["good_images_flagged"] = good_images_flagged(pred, thr)
        per_category[name]["false_alarms"] = false_alarms(pred, thr)
        if gate_scorer is not None:  # the gate's third decision: test images it would refuse as `invalid`
            per_category[name]["invalid"] = invalid_decisions(post, gate_scorer, ds, batch_size)
        if tiles is not None:  # what the pixel metrics were computed at
            per_category[name]["tiling"] = pred.extra["tiling"]
        inner = getattr(ds, "ds", ds)  # dataset_parts tags items; LOCO channels live on the inner dataset
        if callable(getattr(inner, "spro_channels", None)):  # MVTec LOCO AD: AU-sPRO per subset
            per_category[name]["metrics"].update(loco_metrics(pred, inner))
        preds[name] = pred
        if report:
            from kdad.report import write_report

            fname = "report.html" if len(parts) == 1 else f"report_{name}.html"
            write_report(out / fname, {**base, "category": name, **per_category[name]}, pred)
    if len(parts) == 1:
        name = parts[0][0]
        result = {**base, "category": name, **per_category[name]}
    else:
        result = {**base, "category": "+".join(per_category),
                  "n_images": sum(r["n_images"] for r in per_category.values()),
                  "metrics": _mean_metrics(per_category), "per_category": per_category,
                  "multi_class": "one model over all categories; metrics = mean over categories"}
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    write_scores_csv(out / "scores.csv", preds, thr.get("image"))
    return result
