"""Self-contained HTML reports: one evaluated run (`write_report`) and a side-by-side comparison
(`compare_runs`).

Everything is inline (CSS, PNG figures as base64 data URIs, no scripts or web fonts), so a report opens
offline and survives being mailed. Figures use matplotlib's Agg canvas directly, never pyplot, so no
global figure state is touched. Table values come from metrics.json (exact); the plotted pixel curves
are drawn from a seeded pixel sample to stay fast on large test sets, and the report says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdad.checkpoint import atomic_write_text
from kdad.errors import KdadError
from kdad.evaluate import Predictions
from kdad.visualize import contour, overlay, png_bytes

METRIC_LABELS: dict[str, str] = {
    "image_auroc": "Image AUROC", "image_ap": "Image AP", "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC", "pixel_ap": "Pixel AP", "pixel_f1_max": "Pixel F1-max",
    "au_pro": "AU-PRO (FPR ≤ 0.3)",
}
CHART_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "au_pro")
MAX_CURVE_PIXELS = 2_000_000  # pixels drawn for the pixel ROC / PR curves
MAX_PRO_PIXELS = 20_000_000  # above this the PRO curve uses a seeded subset of whole images
SAMPLE_SEED = 0
PRO_LIMIT = 0.3
THUMB_SIDE = 256  # gallery images are shown at most this large

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{background:#f7f7e8;font-style:italic}.na{color:#999}.note{color:#555;font-size:.9em}
figure{display:inline-block;margin:4px 8px 4px 0}figcaption{font-size:.85em;color:#444;max-width:256px;
word-break:break-all}img{max-width:100%}.row{display:flex;gap:6px;align-items:flex-start;margin-bottom:10px}
"""


# ----------------------------------------------------------------------------------------- formatting
def _esc(value: Any) -> str:
    return html.escape(str(value))


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _fmt(value: Any, digits: int = 4) -> str:
    """Numbers to text; NaN / None become a grey 'n/a'."""
    if _is_nan(value):
        return '<span class="na">n/a</span>'
    if isinstance(value, (bool, np.bool_)):
        return _esc(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if abs(value) < 1e5 else f"{float(value):.4g}"
    return _esc(value)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    """Rows are already-formatted HTML cells; `classes` gives an optional class per row."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def _new_figure(ncols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- curve helpers
def _curves(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """ROC (fpr, tpr) and PR (recall, precision) points at every distinct score; None if one class."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")[::-1]
    s, y = scores[order], positive[order]
    last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)  # end of each tie run
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = last + 1 - tps
    fpr, tpr = np.append(0.0, fps / n_neg), np.append(0.0, tps / n_pos)
    recall, precision = np.append(0.0, tps / n_pos), np.append(1.0, tps / (tps + fps))
    return fpr, tpr, recall, precision


def _thin(x: np.ndarray, y: np.ndarray, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~n points of a polyline for plotting (ends kept)."""
    if x.size <= n:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, n).round().astype(np.int64))
    return x[idx], y[idx]


def _mask_rows(pred: Predictions) -> np.ndarray:
    """Indices of images whose ground-truth mask is known."""
    if pred.maps is None or pred.masks is None:
        return np.zeros(0, np.int64)
    has = pred.has_mask if pred.has_mask is not None else np.ones(len(pred.scores), bool)
    return np.flatnonzero(np.asarray(has, bool))


def _pixel_sample(pred: Predictions, max_pixels: int, seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pixel scores and truths of masked images: all of them, or a seeded uniform sample of `max_pixels`.
    Returns scores, positive, n_drawn, n_total."""
    rows = _mask_rows(pred)
    if rows.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, bool), 0, 0
    assert pred.maps is not None and pred.masks is not None
    maps = pred.maps.reshape(len(pred.maps), -1)
    masks = pred.masks.reshape(len(pred.masks), -1)
    per_image, total = maps.shape[1], rows.size * maps.shape[1]
    if total <= max_pixels:
        return maps[rows].ravel(), masks[rows].ravel().astype(bool), total, total
    flat = np.sort(np.random.default_rng(seed).integers(0, total, size=max_pixels))  # with replacement
    img, pix = rows[flat // per_image], flat % per_image
    return maps[img, pix], masks[img, pix].astype(bool), max_pixels, total


def _pro_points(pred: Predictions, max_pixels: int, seed: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Exact PRO curve (kdad.metrics.pro_curve) over masked images, on a seeded subset of whole images
    when they hold more than `max_pixels` pixels; None when undefined."""
    from kdad.metrics import MetricWarning, pro_curve

    rows = _mask_rows(pred)
    if rows.size == 0:
        return None
    assert pred.maps is not None and pred.masks is not None
    per_image = int(pred.maps[0].size)
    note = f"all {rows.size} images with masks"
    if rows.size * per_image > max_pixels:
        keep = max(1, max_pixels // per_image)
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=keep, replace=False))
        note = f"a seeded subset of {keep} of the images with masks (seed {seed})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            fpr, pro = pro_curve(pred.maps[rows], pred.masks[rows])
    except ValueError:
        return None
    return fpr, pro, note


# ------------------------------------------------------------------------------------------- figures
def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="#777")


def _curves_figure(pred: Predictions, metrics: dict[str, Any]) -> tuple[bytes, str]:
    """ROC, PR and PRO panels as one PNG, plus a note on the pixel sampling."""
    fig, (roc, pr, pro) = _new_figure(3, 15, 4.6)
    image = _curves(pred.scores.astype(np.float64), pred.labels > 0)
    px_scores, px_pos, drawn, total = _pixel_sample(pred, MAX_CURVE_PIXELS, SAMPLE_SEED)
    pixel = _curves(px_scores, px_pos) if drawn else None
    for name, c, key in (("image", image, "image"), ("pixel", pixel, "pixel")):
        if c is None:
            continue
        roc.plot(*_thin(c[0], c[1]), label=f"{name} (AUROC {_plain(metrics.get(key + '_auroc'))})")
        pr.plot(*_thin(c[2], c[3]), label=f"{name} (AP {_plain(metrics.get(key + '_ap'))})")
    roc.plot([0, 1], [0, 1], ":", color="#999", lw=1)
    roc.set(title="ROC", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    pr.set(title="Precision-recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (roc, pr):
        if image is None and pixel is None:
            _no_data(ax, "undefined: needs good and defective samples")
        else:
            ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=8)
    pro_note = _draw_pro(pro, pred, metrics)
    note = ("Pixel ROC/PR curves: no image has both a mask and a defect pixel." if pixel is None else
            f"Pixel ROC/PR curves drawn from {drawn:,} of {total:,} pixels" +
            (f" (seeded uniform sample, seed {SAMPLE_SEED}, to stay fast)" if drawn < total else " (all)"))
    note += f" PRO curve over {pro_note}. Table values are exact, computed over all pixels."
    return _figure_png(fig), note


def _plain(value: Any) -> str:
    return "n/a" if _is_nan(value) else f"{float(value):.3f}"


def _draw_pro(ax: Any, pred: Predictions, metrics: dict[str, Any]) -> str:
    points = _pro_points(pred, MAX_PRO_PIXELS, SAMPLE_SEED)
    ax.set(title="PRO", xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 1), ylim=(0, 1.01))
    ax.axvline(PRO_LIMIT, color="red", ls="--", lw=1, label=f"FPR limit {PRO_LIMIT}")
    if points is None:
        _no_data(ax, "undefined: no defect region in the masks")
        return "no image (undefined)"
    fpr, pro, note = points
    x, y = _thin(fpr, pro)
    ax.plot(x, y, label=f"PRO (AU-PRO@{PRO_LIMIT} {_plain(metrics.get('au_pro'))})")
    inside = x <= PRO_LIMIT
    ax.fill_between(x[inside], y[inside], alpha=0.2)
    ax.legend(loc="lower right", fontsize=8)
    return note


def _histogram_png(pred: Predictions, image_threshold: float | None) -> bytes:
    fig, (ax,) = _new_figure(1, 8, 3.6)
    scores = pred.scores.astype(np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
    for label, name, color in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        sel = scores[pred.labels == label]
        if sel.size:
            ax.hist(sel, bins=bins, alpha=0.55, color=color, label=f"{name} ({sel.size})")
    if image_threshold is not None and math.isfinite(image_threshold):
        ax.axvline(image_threshold, color="black", ls="--", lw=1.2, label=f"image threshold {image_threshold:.4g}")
    ax.set(title="Image scores", xlabel="anomaly score", ylabel="images")
    ax.legend(fontsize=8)
    return _figure_png(fig)


# ------------------------------------------------------------------------------------------- gallery
def _display_range(result: dict[str, Any], pred: Predictions) -> tuple[float, float, str]:
    """One fixed colour range for every overlay: stored, else from the pixel threshold, else percentiles."""
    thr = result.get("thresholds") or {}
    disp = result.get("display") or thr.get("display") or {}
    if "vmin" in disp and "vmax" in disp:
        return float(disp["vmin"]), float(disp["vmax"]), "stored display range"
    assert pred.maps is not None
    good = pred.maps[pred.labels == 0]
    ref = good if good.size else pred.maps
    pixel = thr.get("pixel")
    if not _is_nan(pixel) and math.isfinite(float(pixel)):
        vmin = float(np.median(ref))
        vmax = max(2 * float(pixel) - vmin, vmin + 1e-6)
        return vmin, vmax, "median good-image pixel .. 2 × pixel threshold − median"
    vmin, vmax = (float(v) for v in np.percentile(ref, [1.0, 99.5]))
    return vmin, max(vmax, vmin + 1e-6), "no stored thresholds: 1st .. 99.5th percentile of test pixels"


def _thumb(rgb: np.ndarray) -> bytes:
    from PIL import Image

    h, w = rgb.shape[:2]
    if max(h, w) > THUMB_SIDE:
        scale = THUMB_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    return png_bytes(rgb)


def _load_rgb(path: str, hw: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(H, W, 3) float image in [0, 1] at the map size; a grey placeholder and a note if unreadable."""
    from kdad.data.transforms import load_image

    try:
        return load_image(path, hw).numpy().transpose(1, 2, 0), ""
    except (KdadError, OSError, ValueError) as e:
        return np.full((*hw, 3), 0.5, np.float32), f" (image not loaded: {e})"


def _gallery_row(pred: Predictions, i: int, vmin: float, vmax: float, thr: float | None) -> str:
    assert pred.maps is not None
    amap = pred.maps[i]
    image, load_note = _load_rgb(pred.paths[i], amap.shape)
    heat = overlay(image, amap, vmin, vmax)
    has_mask = pred.masks is not None and (pred.has_mask is None or bool(pred.has_mask[i]))
    if not has_mask:
        truth, truth_note = heat, "no ground-truth mask"
    elif pred.masks is not None and pred.masks[i].any():
        truth, truth_note = contour(heat, pred.masks[i]), "ground truth outlined in white"
    else:
        truth, truth_note = heat, "ground truth: no defect pixel"
    score = float(pred.scores[i])
    decision = "" if thr is None else (" ≥ threshold (flagged)" if score >= thr else " < threshold (passed)")
    name = "/".join(Path(pred.paths[i]).parts[-3:])
    caption = f"{_esc(name)}<br>{_esc(pred.defect_types[i])}, score {score:.4g}{_esc(decision)}{_esc(load_note)}"
    panels = ((image * 255).astype(np.uint8), heat, truth)
    captions = (caption, f"heatmap, fixed range [{vmin:.3g}, {vmax:.3g}]", _esc(truth_note))
    figs = "".join(f"<figure>{_img(_thumb(p), c)}<figcaption>{c}</figcaption></figure>"
                   for p, c in zip(panels, captions))
    return f'<div class="row">{figs}</div>'


def _gallery(pred: Predictions, result: dict[str, Any], max_gallery: int) -> str:
    if pred.maps is None:
        return '<p class="note">No anomaly maps were kept, so there is no gallery.</p>'
    vmin, vmax, source = _display_range(result, pred)
    thr = (result.get("thresholds") or {}).get("image")
    thr = None if _is_nan(thr) else float(thr)
    good, bad = np.flatnonzero(pred.labels == 0), np.flatnonzero(pred.labels != 0)
    worst_fp = good[np.argsort(-pred.scores[good], kind="stable")][:max_gallery]
    worst_fn = bad[np.argsort(pred.scores[bad], kind="stable")][:max_gallery]
    out = [f'<p class="note">Overlay colour range [{vmin:.4g}, {vmax:.4g}] ({_esc(source)}), the same for '
           "every image: not normalised per image.</p>"]
    for title, idx, empty in (("Worst false positives: good images with the highest scores", worst_fp,
                               "no good images in the test set"),
                              ("Worst false negatives: defective images with the lowest scores", worst_fn,
                               "no defective images in the test set")):
        out.append(f"<h3>{_esc(title)}</h3>")
        rows = [_gallery_row(pred, int(i), vmin, vmax, thr) for i in idx]
        out.append("".join(rows) if rows else f'<p class="note">{_esc(empty)}.</p>')
    return '<div class="gallery">' + "".join(out) + "</div>"
