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
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdad.deploy.dataset import Predictions
from kdad.deploy.postprocess import PostProcess, display_range
from kdad.errors import KdadError
from kdad.fileio import atomic_write_text
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
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;margin:24px;color:#222;
max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{background:#f7f7e8;font-style:italic}.na{color:#999}.note{color:#555;font-size:.9em}
figure{margin:0}figcaption{font-size:.85em;color:#444;overflow-wrap:break-word}img{max-width:100%}
.row{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px;margin-bottom:12px}.row img{width:100%}
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
        return f"{float(value):.{digits}f}" if abs(float(value)) < 1e5 else f"{float(value):.4g}"
    return _esc(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _path_html(path: str) -> str:
    """A path that wraps at its slashes, never inside a name."""
    return "/<wbr>".join(_esc(part) for part in path.split("/"))


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
        roc.plot(*_thin(c[0], c[1]), label=name + _plain(" AUROC", metrics.get(key + "_auroc")))
        pr.plot(*_thin(c[2], c[3]), label=name + _plain(" AP", metrics.get(key + "_ap")))
    roc.plot([0, 1], [0, 1], ":", color="#999", lw=1)
    roc.set(title="ROC", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
            ylim=(0, 1.01))
    pr.set(title="Precision-recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (roc, pr):
        if image is None and pixel is None:
            _no_data(ax, "undefined: needs good and defective samples")
        else:
            ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=8)
    pro_note = _draw_pro(pro, pred, metrics)
    note = ("Pixel ROC/PR curves omitted: the masked images lack defect or normal pixels (or no masks)."
            if pixel is None else f"Pixel ROC/PR curves drawn from {drawn:,} of {total:,} pixels" +
            (f" (seeded uniform sample, seed {SAMPLE_SEED}, to stay fast)" if drawn < total else " (all)"))
    note += f" PRO curve over {pro_note}. Table values are exact, computed over all pixels."
    return _figure_png(fig), note


def _plain(prefix: str, value: Any) -> str:
    """Legend suffix ' (prefix value)', empty when the value is unknown."""
    return "" if _is_nan(value) or not isinstance(value, (int, float)) else f" ({prefix.strip()} {value:.3f})"


def _draw_pro(ax: Any, pred: Predictions, metrics: dict[str, Any]) -> str:
    points = _pro_points(pred, MAX_PRO_PIXELS, SAMPLE_SEED)
    ax.set(title="PRO", xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.axvline(PRO_LIMIT, color="red", ls="--", lw=1, label=f"FPR limit {PRO_LIMIT}")
    if points is None:
        _no_data(ax, "undefined: no defect region in the masks")
        return "no image (undefined)"
    fpr, pro, note = points
    x, y = _thin(fpr, pro)
    ax.plot(x, y, label="PRO" + _plain(f"AU-PRO@{PRO_LIMIT}", metrics.get("au_pro")))
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
        ax.axvline(image_threshold, color="black", ls="--", lw=1.2,
                   label=f"image threshold {image_threshold:.4g}")
    ax.set(title="Image scores", xlabel="anomaly score", ylabel="images")
    ax.legend(fontsize=8)
    return _figure_png(fig)


# ------------------------------------------------------------------------------------------- gallery
def _display_range(result: dict[str, Any], pred: Predictions) -> tuple[float, float, str]:
    """One fixed colour range for every overlay: stored, else from the pixel threshold, else percentiles."""
    thr = result.get("thresholds") or {}
    assert pred.maps is not None
    good = pred.maps[pred.labels == 0]
    ref = good if good.size else pred.maps
    return display_range(result.get("display") or thr.get("display"), thr.get("pixel"), ref)


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
    image, load_note = _load_rgb(pred.paths[i], (int(amap.shape[0]), int(amap.shape[1])))
    heat = overlay(image, amap, vmin, vmax)
    has_mask = pred.masks is not None and (pred.has_mask is None or bool(pred.has_mask[i]))
    if not has_mask:
        truth, truth_note = heat, "no ground-truth mask"
    elif pred.masks is not None and pred.masks[i].any():
        truth, truth_note = contour(heat, pred.masks[i]), "ground truth outlined in white"
    else:
        truth, truth_note = heat, "ground truth: no defect pixel"
    score = float(pred.scores[i])
    flagged = PostProcess(thr).decision(score)
    decision = "" if flagged is None else (" ≥ threshold (flagged)" if flagged else " < threshold")
    name = "/".join(Path(pred.paths[i]).parts[-3:])
    caption = _esc(f"{pred.defect_types[i]}, score {score:.4g}{decision}{load_note}")
    caption = f"{_path_html(name)}<br>{caption}"
    panels = ((image * 255).astype(np.uint8), heat, truth)
    captions = (caption, f"heatmap, fixed range [{vmin:.3g}, {vmax:.3g}]", _esc(truth_note))
    alts = (f"input {name}", f"heatmap {name}", f"ground truth {name}")
    figs = "".join(f"<figure>{_img(_thumb(p), a)}<figcaption>{c}</figcaption></figure>"
                   for p, a, c in zip(panels, alts, captions))
    return f'<div class="row">{figs}</div>'


def _gallery_sections(pred: Predictions, thr: float | None, max_gallery: int) -> list[tuple[str, np.ndarray, str]]:
    """(title, image indices, text when empty) per gallery section. The real false positives / negatives at
    the stored threshold come first, each titled by what it is; the remaining rows show the good images
    closest to a false alarm and the defects closest to a miss."""
    good, bad = np.flatnonzero(pred.labels == 0), np.flatnonzero(pred.labels != 0)
    good = good[np.argsort(-pred.scores[good], kind="stable")]  # most suspicious good image first
    bad = bad[np.argsort(pred.scores[bad], kind="stable")]  # least suspicious defect first
    if thr is None:
        return [("Good images with the highest scores (no stored threshold)", good[:max_gallery],
                 "no good images in the test set"),
                ("Defective images with the lowest scores (no stored threshold)", bad[:max_gallery],
                 "no defective images in the test set")]
    post = PostProcess(thr)
    fp, passed = good[post.flagged(pred.scores[good])], good[~post.flagged(pred.scores[good])]
    fn, caught = bad[~post.flagged(pred.scores[bad])], bad[post.flagged(pred.scores[bad])]
    n_fp, n_fn = min(len(fp), max_gallery), min(len(fn), max_gallery)
    return [
        (f"False positives at the image threshold {thr:.4g}: {len(fp)} of {_plural(len(good), 'good image')} "
         f"scored at or above it" + (f" (showing {n_fp})" if n_fp < len(fp) else ""), fp[:n_fp],
         "none: no good image is flagged"),
        ("Good images closest to a false alarm (highest scores below the threshold)", passed[:max_gallery - n_fp],
         ""),
        (f"False negatives at the image threshold {thr:.4g}: {len(fn)} of {_plural(len(bad), 'defective image')} "
         f"scored below it" + (f" (showing {n_fn})" if n_fn < len(fn) else ""), fn[:n_fn],
         "none: every defective image is flagged" if len(bad) else "no defective images in the test set"),
        ("Defective images closest to a miss (lowest scores at or above the threshold)",
         caught[:max_gallery - n_fn], ""),
    ]


def _gallery(pred: Predictions, result: dict[str, Any], max_gallery: int) -> str:
    if pred.maps is None:
        return '<p class="note">No anomaly maps were kept, so there is no gallery.</p>'
    vmin, vmax, source = _display_range(result, pred)
    thr = (result.get("thresholds") or {}).get("image")
    thr = None if thr is None or _is_nan(thr) else float(thr)
    out = [f'<p class="note">Overlay colour range [{vmin:.4g}, {vmax:.4g}] ({_esc(source)}), the same for '
           "every image: not normalised per image.</p>"]
    for title, idx, empty in _gallery_sections(pred, thr, max_gallery):
        if not len(idx) and not empty:
            continue  # a filler section with nothing left to show
        out.append(f"<h3>{_esc(title)}</h3>")
        rows = [_gallery_row(pred, int(i), vmin, vmax, thr) for i in idx]
        out.append("".join(rows) if rows else f'<p class="note">{_esc(empty)}.</p>')
    return '<div class="gallery">' + "".join(out) + "</div>"


# ------------------------------------------------------------------------------------------- tables
def _nan_reason(key: str, pred: Predictions) -> str:
    """Why a metric is undefined, inferred from the predictions."""
    n_bad = int((pred.labels != 0).sum())
    if key.startswith("image"):
        if n_bad == 0:
            return "no defective test images"
        return "no good test images" if n_bad == len(pred.labels) else "undefined for these scores"
    rows = _mask_rows(pred)
    if rows.size == 0:
        return "no ground-truth masks" if pred.maps is not None else "anomaly maps were not kept"
    assert pred.masks is not None
    if not pred.masks[rows].any():
        return "no mask has a defect pixel"
    if pred.masks[rows].all():
        return "no normal pixel in the masks"
    return "undefined (see the evaluation warnings)"


def _metrics_table(result: dict[str, Any], pred: Predictions) -> str:
    metrics: dict[str, Any] = result.get("metrics") or {}
    notes: dict[str, Any] = result.get("metric_notes") or {}
    keys = list(METRIC_LABELS) + [k for k in metrics if k not in METRIC_LABELS]
    rows = []
    for key in keys:
        value, note = metrics.get(key), str(notes.get(key) or "")
        if key not in metrics:
            cell, note = _fmt(None), note or "not computed"
        elif _is_nan(value):
            cell, note = _fmt(None), note or _nan_reason(key, pred)
        else:
            cell = _fmt(float(value)) if isinstance(value, (int, float)) else _esc(value)
        rows.append([_esc(METRIC_LABELS.get(key, key)), cell, _esc(note)])
    return _table(["metric", "value", "note"], rows)


def _defect_table(pred: Predictions, image_threshold: float | None) -> str:
    """Per defect type: count, mean / std score, image AUROC and AU-PRO against the good images (AU-PRO where
    maps and masks are kept), share flagged."""
    from kdad.prediction_metrics import metrics_by_defect_type

    types = np.asarray(pred.defect_types, dtype=object)
    by_type = metrics_by_defect_type(pred)
    pixel = pred.maps is not None and pred.masks is not None
    order = sorted(set(pred.defect_types), key=lambda t: (t != "good", t))
    rows = []
    for t in order:
        sel = types == t
        s = pred.scores[sel].astype(np.float64)
        m = by_type.get(t, {})
        flagged = None if image_threshold is None else float(PostProcess(image_threshold).flagged(s).mean())
        cells = [_esc(t), _fmt(int(sel.sum())), _fmt(float(s.mean())), _fmt(float(s.std())),
                 _fmt(m["image_auroc"]) if "image_auroc" in m else "—"]
        if pixel:
            cells.append(_fmt(m["au_pro"]) if "au_pro" in m else "—")
        rows.append([*cells, _fmt(flagged, 3)])
    header = ["defect type", "images", "mean score", "std score", "image AUROC vs good",
              *(["AU-PRO vs good"] if pixel else []), "share flagged at image threshold"]
    return _table(header, rows)


# train_info keys a report reader needs; the speed levers (fused optimizers, heap allocator, ...) are
# internals, kept in train_info.json
TRAIN_FACTS: tuple[tuple[str, str], ...] = (
    ("train_seconds", "training time (s)"), ("train_images_per_s", "training images/s"),
    ("iters", "training steps"), ("selected_epoch", "weights from epoch"), ("device", "trained on"),
    ("cpu_threads", "CPU threads"),
)
_QUANTILE_SOURCE = re.compile(r"normal-image quantiles \(([\d.]+), ([\d.]+)\) over (\d+) images")


def _percentile(q: str) -> str:
    return f"{float(q) * 100:g}th percentile"


def threshold_meaning(source: str, normals: str = "") -> str:
    """The stored threshold source in plain words (what a quantile threshold means for normal images)."""
    m = _QUANTILE_SOURCE.fullmatch(source.strip())
    if not m:
        return source
    q_img, q_pix, n = m.groups()
    share = 1.0 - float(q_img)
    where = f" ({normals})" if normals else ""
    text = (f"computed on {n} normal images{where}: the image threshold is the {_percentile(q_img)} of their "
            f"scores, aiming at {share:.0%} false alarms on normal images; the pixel threshold is the "
            f"{_percentile(q_pix)} of their pixel values.")
    if int(n) * share < 1:  # fewer images than the quantile can resolve: the threshold is about their maximum
        text += (f" With {n} images that percentile is about their highest score, so expect more false alarms "
                 "(the gallery below shows the real ones).")
    return text


def _header(result: dict[str, Any]) -> str:
    thr = result.get("thresholds") or {}
    info = result.get("train_info") or {}
    facts = [("method", result.get("method")), ("category", result.get("category")),
             ("images", result.get("n_images")), ("image size", result.get("image_size")),
             ("protocol", result.get("protocol"))]
    if thr:
        source = threshold_meaning(str(thr.get("source") or ""), str(info.get("threshold_source") or ""))
        facts += [("image threshold", thr.get("image")), ("pixel threshold", thr.get("pixel")),
                  ("thresholds", source)]
    else:
        facts.append(("thresholds", "none stored with the model"))
    facts += [(label, info[key]) for key, label in TRAIN_FACTS if key in info]
    if int(info.get("world_size") or 1) > 1:
        facts.append(("training processes", info["world_size"]))
    return _table(["run", "value"], [[_esc(k), _fmt(v)] for k, v in facts])


# ------------------------------------------------------------------------------------------- public
def _operating_point(result: dict[str, Any]) -> list[str]:
    """The false-alarm rate observed on the good test images, with its 95 % interval, beside the guaranteed
    alpha (conformal thresholds) or the quantile aimed at (older bundles)."""
    fa = result.get("false_alarms")
    invalid = _invalid_rows(result.get("invalid"))
    if not fa:
        return ["<h2>Operating point</h2>", _table(["", "value"], invalid)] if invalid else []
    thr = result.get("thresholds") or {}
    lo, hi = fa["ci95"]
    rows = [["false alarms on good test images", f"{fa['flagged']} of {fa['n_good']} = {fa['rate']:.1%} "
                                                  f"(95 % interval {lo:.1%} .. {hi:.1%}, Clopper-Pearson)"]]
    if fa.get("alpha") is not None:
        rows.append(["guaranteed false-alarm rate alpha", f"{float(fa['alpha']):.1%} "
                                                          f"(on {fa['n_calibration']} calibration normals)"])
        verdict = "consistent with" if lo <= float(fa["alpha"]) else "above"
        rows.append(["guarantee", _esc(str(thr.get("guarantee") or ""))])
        rows.append(["observed vs alpha", f"the interval is {verdict} alpha"
                     + ("" if lo <= float(fa["alpha"]) else ": the test normals are not exchangeable with the "
                        "calibration ones (another camera, lighting or line?); recalibrate with `kdad calibrate`")])
    else:
        rows.append(["guarantee", "none: a quantile threshold (written before conformal thresholds or with "
                                  "train.image_threshold_rule=quantile)"])
    return ["<h2>Operating point</h2>", _table(["", "value"], rows + invalid)]


def _invalid_rows(invalid: dict[str, Any] | None) -> list[list[str]]:
    """Rows for the gate's `invalid` decisions on the test normals and defects (none without a gate)."""
    if not invalid:
        return []
    rows = []
    for key, what in (("normals", "good test images"), ("defects", "defective test images")):
        part = invalid.get(key) or {}
        if part.get("n"):
            rows.append([f"called invalid by the gate: {what}",
                         f"{part['invalid']} of {part['n']} = {float(part['rate']):.1%}"])
    if invalid.get("reasons"):
        rows.append(["invalid reasons", _esc(", ".join(f"{k}: {v}" for k, v in sorted(invalid["reasons"].items())))])
    return rows


def write_report(path: Path, result: dict[str, Any], pred: Predictions, max_gallery: int = 8) -> None:
    """Write a self-contained HTML report of one evaluated run to `path` (atomically).

    result: the metrics.json dict of `evaluate_run` (method, category, n_images, image_size, protocol,
    metrics, thresholds, train_info); pred: its Predictions, maps (N, H, W) and masks (N, H, W) when
    kept. max_gallery: rows per gallery section (worst false positives, worst false negatives).
    Handles sets without defects, without masks and with NaN metrics.
    """
    if len(pred.scores) == 0:
        raise KdadError(f"write_report {path}: the predictions hold no images")
    metrics = result.get("metrics") or {}
    thr = (result.get("thresholds") or {}).get("image")
    image_threshold = None if thr is None or _is_nan(thr) else float(thr)
    title = f"kdad report: {result.get('method', '?')} on {result.get('category', '?')}"
    parts = [f"<h1>{_esc(title)}</h1>", _header(result), "<h2>Metrics</h2>", _metrics_table(result, pred),
             '<p class="note">F1-max values pick the threshold on the test labels (an oracle).</p>']
    parts += _operating_point(result)
    curves, note = _curves_figure(pred, metrics)
    parts += ["<h2>Curves</h2>", _img(curves, "ROC, PR and PRO curves"), f'<p class="note">{_esc(note)}</p>']
    parts += ["<h2>Score histogram</h2>", _img(_histogram_png(pred, image_threshold), "score histogram"),
              "<h2>Per defect type</h2>", _defect_table(pred, image_threshold),
              "<h2>Gallery</h2>", _gallery(pred, result, max_gallery)]
    atomic_write_text(path, _page(title, "".join(parts)))


# ------------------------------------------------------------------------------------------- compare
def _load_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise KdadError(f"run folder {run_dir} has no metrics.json (run `kdad evaluate {run_dir}` first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KdadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise KdadError(f"{path} has no 'metrics' object; is it a kdad evaluate output?")
    return data


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, widened to parent/name where two runs share a name."""
    names = [d.name or str(d) for d in run_dirs]
    return [str(Path(d.parent.name) / d.name) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _method_means(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean of each metric per method over its categories (finite values only, counted in `n_finite`)."""
    means = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        row: dict[str, Any] = {"run": f"mean of {method}", "method": method,
                               "category": f"{len({r['category'] for r in mine})} categories", "n_finite": {}}
        for key in (*keys, "train_images_per_s"):
            vals = np.array([r[key] for r in mine], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            row[key] = float(finite.mean()) if finite.size else float("nan")
            row["n_finite"][key] = f"{finite.size}/{vals.size}"
        means.append(row)
    return means


def _bar_chart_png(series: list[dict[str, Any]], keys: Sequence[str]) -> bytes:
    fig, (ax,) = _new_figure(1, max(8.0, 1.6 * len(keys) + 0.25 * len(series) * len(keys)), 4.4)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(keys))
    for j, row in enumerate(series):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, [row[k] for k in keys], width, label=row["run"])
    ax.set_xticks(x, [METRIC_LABELS.get(k, k) for k in keys])
    ax.set(ylim=(0, 1.05), ylabel="value", title="Main metrics (missing bars: n/a)")
    ax.legend(fontsize=7, ncols=max(1, len(series) // 12 + 1), loc="lower right")
    return _figure_png(fig)


def compare_runs(run_dirs: list[Path], out_path: Path) -> dict[str, Any]:
    """Compare evaluated runs side by side in one self-contained HTML page at `out_path`.

    Each run folder must hold the metrics.json of `evaluate_run` (else KdadError naming the folder).
    Returns {"runs": [row, ...], "method_means": [row, ...], "out_path": str}; a row holds run, method,
    category, every metric and train_images_per_s (NaN when unknown). Method means appear when the runs
    span several categories.
    """
    if not run_dirs:
        raise KdadError("compare_runs: no run folders given")
    dirs = [Path(d) for d in run_dirs]
    runs = [_load_run(d) for d in dirs]
    extra = dict.fromkeys(k for r in runs for k in r["metrics"] if k not in METRIC_LABELS)
    keys = [*METRIC_LABELS, *extra]
    rows = []
    for name, d, run in zip(_run_names(dirs), dirs, runs):
        row: dict[str, Any] = {"run": name, "dir": str(d), "method": str(run.get("method", "?")),
               "category": str(run.get("category", "?"))}
        row.update({k: _as_float(run["metrics"].get(k)) for k in keys})
        row["train_images_per_s"] = _as_float((run.get("train_info") or {}).get("train_images_per_s"))
        rows.append(row)
    several = len({r["category"] for r in rows}) > 1
    means = _method_means(rows, keys) if several else []
    page = _compare_page(rows, means, keys)
    atomic_write_text(out_path, page)
    return {"runs": rows, "method_means": means, "out_path": str(out_path)}


def _compare_page(rows: list[dict[str, Any]], means: list[dict[str, Any]], keys: Sequence[str]) -> str:
    finite = {k: [r[k] for r in rows if math.isfinite(r[k])] for k in keys}
    best = {k: max(v) if v else None for k, v in finite.items()}

    def cells(r: dict[str, Any]) -> list[str]:
        out = [_esc(r["run"]), _esc(r["method"]), _esc(r["category"])]
        for k in keys:
            text = _fmt(r[k])
            if "n_finite" in r:  # a mean row: say when it averages fewer runs than the method has
                num, den = r["n_finite"][k].split("/")
                text += f' <span class="note">({num}/{den})</span>' if num not in ("0", den) else ""
            elif best[k] is not None and r[k] == best[k]:
                text = f"<b>{text}</b>"
            out.append(text)
        return out + [_fmt(r["train_images_per_s"], 1)]

    header = ["run", "method", "category", *[METRIC_LABELS.get(k, k) for k in keys], "train images/s"]
    table = _table(header, [cells(r) for r in rows + means], ["" for _ in rows] + ["mean" for _ in means])
    chart_keys = [k for k in CHART_METRICS if any(math.isfinite(r[k]) for r in rows)]
    series = means or rows
    parts = [f"<h1>kdad: comparison of {_plural(len(rows), 'run')}</h1>", table,
             '<p class="note">Bold: best run per metric. Mean rows average each method over its categories, '
             "using finite values only ((k/n) marks a mean over k of n runs). F1-max values are oracle "
             "scores.</p>"]
    if chart_keys:
        what = "method means" if means else "runs"
        parts += [f"<h2>Main metrics ({what})</h2>", _img(_bar_chart_png(series, chart_keys), "bar chart")]
    return _page("kdad run comparison", "".join(parts))
