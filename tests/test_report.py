"""HTML reports: self-contained single-run report (edge cases included) and run comparison."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdad.errors import KdadError
from kdad.evaluate import Predictions
from kdad.report import _curves, compare_runs, write_report

SIZE = 32
METRIC_NAMES = ("Image AUROC", "Image AP", "Image F1-max", "Pixel AUROC", "Pixel AP", "Pixel F1-max",
                "AU-PRO")


def _fake_predictions(root: Path, n_good: int = 4, n_bad: int = 3, with_masks: bool = True) -> Predictions:
    """Tiny MVTec-like test set on disk (PNG files) with random maps; defects get brighter regions."""
    rng = np.random.default_rng(0)
    paths, types, labels = [], [], []
    maps = rng.random((n_good + n_bad, SIZE, SIZE)).astype(np.float32) * 0.5
    masks = np.zeros((n_good + n_bad, SIZE, SIZE), bool)
    for i in range(n_good + n_bad):
        kind = "good" if i < n_good else ("scratch" if i % 2 else "crack")
        folder = root / "bottle" / "test" / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (SIZE + 8, SIZE + 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
        types.append(kind)
        labels.append(int(kind != "good"))
        if kind != "good":
            y, x = rng.integers(2, SIZE - 10, size=2)
            masks[i, y : y + 8, x : x + 8] = True
            maps[i][masks[i]] += 0.4 + 0.1 * i
    scores = maps.reshape(len(maps), -1).max(axis=1)
    has_mask = np.full(len(maps), with_masks)
    return Predictions(scores=scores, labels=np.array(labels, np.int64), paths=paths, defect_types=types,
                       map_means=maps.mean(axis=(1, 2)), maps=maps, masks=masks, has_mask=has_mask)


def _result(pred: Predictions, metrics: dict[str, float] | None = None) -> dict:
    from kdad.evaluate import compute_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined metrics warn; here they are the point
        computed = compute_metrics(pred) if metrics is None else metrics
    thresholds = {"image": 0.7, "pixel": 0.45, "source": "normal-image quantiles"}
    train_info = {"train_seconds": 12.5, "train_images_per_s": 40.0}
    return {"method": "rd4ad", "category": "bottle", "n_images": len(pred.scores), "image_size": SIZE,
            "metrics": computed, "thresholds": thresholds, "protocol": "test protocol string",
            "train_info": train_info}


def _assert_self_contained(text: str) -> None:
    assert "data:image/png;base64," in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()


def test_report_full(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data")
    result = _result(pred)
    out = tmp_path / "run" / "report.html"
    write_report(out, result, pred)
    text = out.read_text()
    _assert_self_contained(text)
    for name in METRIC_NAMES:
        assert name in text
    assert "False positives at the image threshold" in text and "False negatives at the image threshold" in text
    assert text.count('<div class="row">') == 7  # 4 good + 3 defective images, all within max_gallery
    assert "scratch" in text and "crack" in text and "rd4ad" in text and "test protocol string" in text
    assert "training images/s" in text and "normal-image quantiles" in text
    assert "ground truth outlined" in text
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_report_gallery_limit_and_missing_image(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data")
    good = np.flatnonzero(pred.labels == 0)
    Path(pred.paths[good[np.argmax(pred.scores[good])]]).unlink()  # the worst false positive
    write_report(tmp_path / "r.html", _result(pred), pred, max_gallery=2)
    text = (tmp_path / "r.html").read_text()
    assert text.count('<div class="row">') == 4
    assert "image not loaded" in text


def test_report_no_defects(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data", n_bad=0)
    result = _result(pred)
    assert np.isnan(result["metrics"]["image_auroc"]) and np.isnan(result["metrics"]["au_pro"])
    write_report(tmp_path / "r.html", result, pred)
    text = (tmp_path / "r.html").read_text()
    _assert_self_contained(text)
    assert "n/a" in text and "no defective test images" in text and "no mask has a defect pixel" in text
    assert "no defective images in the test set" in text


def test_report_no_masks(tmp_path: Path) -> None:
    from kdad.metrics import image_auroc

    pred = _fake_predictions(tmp_path / "data", with_masks=False)
    # compute_metrics cannot take has_mask all False yet (evaluate_maps gets 0 maps for N scores)
    metrics = {"image_auroc": image_auroc(pred.scores, pred.labels), "pixel_auroc": float("nan"),
               "au_pro": float("nan")}
    result = _result(pred, metrics)
    write_report(tmp_path / "r.html", result, pred)
    text = (tmp_path / "r.html").read_text()
    _assert_self_contained(text)
    assert "no ground-truth masks" in text and "no ground-truth mask" in text
    assert "ground truth outlined" not in text


def test_report_without_maps(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data")
    result = _result(pred)
    pred.maps, pred.masks, pred.has_mask = None, None, None
    write_report(tmp_path / "r.html", result, pred)
    text = (tmp_path / "r.html").read_text()
    _assert_self_contained(text)
    assert "no gallery" in text


def test_report_nan_metric_and_no_thresholds(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data")
    result = _result(pred)
    result["metrics"]["au_pro"] = float("nan")
    result["metric_notes"] = {"au_pro": "skipped on purpose"}
    result["thresholds"] = {}
    write_report(tmp_path / "r.html", result, pred)
    text = (tmp_path / "r.html").read_text()
    assert "skipped on purpose" in text and "none stored with the model" in text
    assert "percentile of test pixels" in text  # colour range without a stored pixel threshold


def test_report_subsamples_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdad.report

    monkeypatch.setattr(kdad.report, "MAX_CURVE_PIXELS", 1000)
    monkeypatch.setattr(kdad.report, "MAX_PRO_PIXELS", 3 * SIZE * SIZE)
    pred = _fake_predictions(tmp_path / "data")
    write_report(tmp_path / "r.html", _result(pred), pred)
    text = (tmp_path / "r.html").read_text()
    assert "1,000 of 7,168 pixels" in text and "seeded uniform sample" in text
    assert "a seeded subset of 3 of the images" in text


def test_curves_match_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, 300).astype(np.float64)  # many ties
    labels = rng.random(300) < 0.3
    fpr, tpr, recall, precision = _curves(scores, labels)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.roc_auc_score(labels, scores))
    ap = float(np.sum(np.diff(recall) * precision[1:]))
    assert ap == pytest.approx(metrics.average_precision_score(labels, scores))
    assert _curves(scores, np.zeros(300, bool)) is None


def _fake_run(folder: Path, method: str, category: str, auroc: float, nan_pro: bool = False) -> Path:
    folder.mkdir(parents=True)
    metrics = {"image_auroc": auroc, "image_ap": 0.9, "image_f1_max": 0.8, "pixel_auroc": 0.95,
               "pixel_ap": 0.5, "pixel_f1_max": 0.55, "au_pro": float("nan") if nan_pro else 0.9}
    result = {"method": method, "category": category, "n_images": 10, "image_size": 256, "metrics": metrics,
              "thresholds": {}, "train_info": {"train_images_per_s": 50.0}}
    (folder / "metrics.json").write_text(json.dumps(result))
    return folder


def test_compare_runs(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path / "a", "rd4ad", "bottle", 0.99),
            _fake_run(tmp_path / "b", "stpm", "bottle", 0.97)]
    out = tmp_path / "cmp" / "compare.html"
    summary = compare_runs(runs, out)
    text = out.read_text()
    _assert_self_contained(text)
    assert [r["run"] for r in summary["runs"]] == ["a", "b"]
    assert summary["method_means"] == []  # one category: no mean rows
    assert "rd4ad" in text and "stpm" in text and "Image AUROC" in text and "train images/s" in text
    assert "<b>0.9900</b>" in text


def test_compare_runs_means_over_categories(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path / "r1", "rd4ad", "bottle", 1.0),
            _fake_run(tmp_path / "r2", "rd4ad", "cable", 0.9, nan_pro=True),
            _fake_run(tmp_path / "r3", "stpm", "bottle", 0.8),
            _fake_run(tmp_path / "r4", "stpm", "cable", 0.6)]
    summary = compare_runs(runs, tmp_path / "c.html")
    means = {m["method"]: m for m in summary["method_means"]}
    assert means["rd4ad"]["image_auroc"] == pytest.approx(0.95)
    assert means["stpm"]["image_auroc"] == pytest.approx(0.7)
    assert means["rd4ad"]["au_pro"] == pytest.approx(0.9)  # the NaN run is left out, and flagged
    text = (tmp_path / "c.html").read_text()
    assert "mean of rd4ad" in text and "(1/2)" in text and "n/a" in text


def test_compare_runs_missing_metrics(tmp_path: Path) -> None:
    good = _fake_run(tmp_path / "ok", "rd4ad", "bottle", 0.9)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(KdadError, match="empty_run.*metrics.json"):
        compare_runs([good, tmp_path / "empty_run"], tmp_path / "c.html")
    assert not (tmp_path / "c.html").exists()


def _sections(text: str) -> dict[str, int]:
    """Gallery section title -> number of image rows under it."""
    gallery = text[text.index('<div class="gallery">'):]
    parts = re.split(r"<h3>(.*?)</h3>", gallery)[1:]
    return {title: body.count('<div class="row">') for title, body in zip(parts[::2], parts[1::2])}


def test_gallery_shows_the_real_false_positives_first(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data", n_good=6, n_bad=3)
    good = np.sort(pred.scores[pred.labels == 0])
    result = _result(pred)
    result["thresholds"]["image"] = float((good[-1] + good[-2]) / 2)  # exactly one good image above
    write_report(tmp_path / "r.html", result, pred, max_gallery=4)
    sections = _sections((tmp_path / "r.html").read_text())
    titles = list(sections)
    assert "1 of 6 good images scored at or above it" in titles[0] and sections[titles[0]] == 1
    assert titles[1].startswith("Good images closest to a false alarm") and sections[titles[1]] == 3
    assert "0 of 3 defective images scored below it" in titles[2] and sections[titles[2]] == 0
    assert titles[3].startswith("Defective images closest to a miss") and sections[titles[3]] == 3
    assert not any("Worst" in t for t in titles)


def test_run_table_is_plain(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data")
    result = _result(pred)
    result["thresholds"]["source"] = "normal-image quantiles (0.99, 0.999) over 6 images"
    result["train_info"].update({"fused_optimizers": 2, "heap_allocator": True, "channels_last": True,
                                 "threshold_source": "training normals (optimistic)", "iters": 30})
    write_report(tmp_path / "r.html", result, pred)
    text = (tmp_path / "r.html").read_text()
    assert "fused" not in text and "heap" not in text and "channels" not in text
    assert "the 99th percentile of their scores, aiming at 1% false alarms on normal images" in text
    assert "With 6 images that percentile is about their highest score" in text
    assert "6 normal images (training normals (optimistic))" in text and "training steps" in text
    assert "break-all" not in text and "/<wbr>" in text  # captions wrap at slashes, not mid-word
    assert ".row{display:grid;grid-template-columns:repeat(3" in text  # the gallery uses the page width


def test_compare_one_run_title(tmp_path: Path) -> None:
    pred = _fake_predictions(tmp_path / "data")
    run = tmp_path / "r1"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_result(pred, {"image_auroc": 0.9})))
    compare_runs([run], tmp_path / "c.html")
    assert "comparison of 1 run<" in (tmp_path / "c.html").read_text()


def test_report_operating_point_shows_observed_false_alarms_beside_alpha(tmp_path: Path) -> None:
    """Issue 21.1: the observed false-alarm rate on good test images, its binomial 95 % interval, alpha and the
    guarantee; an old (quantile) threshold says it carries no guarantee."""
    from kdad.evaluate import false_alarms
    from kdad.thresholds import Thresholds

    pred = _fake_predictions(tmp_path / "data", n_good=4, n_bad=3)
    good = np.sort(pred.scores[pred.labels == 0])
    thr = Thresholds(image=float((good[-1] + good[-2]) / 2), pixel=0.45, source="conformal", alpha=0.2,
                     n_calibration=9).to_metadata()  # exactly one good image flagged
    fa = false_alarms(pred, thr)
    assert fa is not None and fa["flagged"] == 1 and fa["n_good"] == 4 and fa["rate"] == 0.25
    assert fa["ci95"][0] == pytest.approx(0.00631, abs=1e-4) and fa["ci95"][1] == pytest.approx(0.80589, abs=1e-4)
    result = {**_result(pred), "thresholds": thr, "false_alarms": fa}
    write_report(tmp_path / "r.html", result, pred)
    text = (tmp_path / "r.html").read_text()
    assert "Operating point" in text and "1 of 4 = 25.0%" in text and "0.6% .. 80.6%" in text
    assert "20.0% (on 9 calibration normals)" in text and "P(false alarm) &lt;= 0.2 " in text
    old = {"image": thr["image"], "pixel": 0.45, "source": "normal-image quantiles"}
    result = {**_result(pred), "thresholds": old, "false_alarms": false_alarms(pred, old)}
    write_report(tmp_path / "old.html", result, pred)
    assert "none: a quantile threshold" in (tmp_path / "old.html").read_text()


def test_kdad_test_reports_the_gates_invalid_share_of_test_normals_and_defects(tmp_path: Path) -> None:
    """A black frame among the good test images is refused by the gate (flat frame): metrics.json and the
    report's Operating point section count it, per label, with the reason."""
    from kdad.config import load_config
    from kdad.data.demo import make_demo_dataset
    from kdad.evaluate import evaluate_run
    from kdad.train import fit

    demo = make_demo_dataset(tmp_path / "d", n_train=10, n_test_good=3, n_test_bad=2, size=64, kind="object")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(demo / "test" / "good" / "black.png")
    run = fit(load_config("rd_cpu", [], [
        f"data.root={demo}", "model.backbone=resnet18", "model.weights=random", "data.image_size=64",
        "train.batch_size=4", "train.progress=false", "train.epochs=1", "train.val_fraction=0.3",
        "train.alpha=0.3"]), tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate_run(run, device="cpu")
    invalid = json.loads((run / "metrics.json").read_text())["invalid"]
    assert invalid == res["invalid"]
    assert invalid["normals"] == {"invalid": 1, "n": 4, "rate": 0.25}
    assert invalid["defects"]["n"] == 2 and invalid["reasons"].get("flat frame (black, white or blank)") == 1
    html = (run / "report.html").read_text()
    assert "called invalid by the gate: good test images</td><td>1 of 4 = 25.0%" in html
    assert "called invalid by the gate: defective test images" in html


def test_metrics_by_defect_type_tells_a_found_defect_from_a_flagged_one() -> None:
    """Both types score above every good image (image AUROC 1), but only one is localised: its AU-PRO is high,
    the other's (its map lights up beside the mask) is low. The overall AU-PRO would average the two away."""
    from kdad.prediction_metrics import metrics_by_defect_type

    rng = np.random.default_rng(0)
    n = 10  # 4 good, 3 "found", 3 "flagged"
    maps = rng.random((n, SIZE, SIZE)).astype(np.float32) * 0.5
    masks = np.zeros((n, SIZE, SIZE), bool)
    types = ["good"] * 4 + ["found"] * 3 + ["flagged"] * 3
    for i in range(4, n):
        masks[i, 4:12, 4:12] = True
        if types[i] == "found":
            maps[i, 4:12, 4:12] += 1.0
        else:
            maps[i, 20:28, 20:28] += 1.0
    pred = Predictions(scores=maps.reshape(n, -1).max(axis=1), labels=np.array([t != "good" for t in types], np.int64),
                       paths=[f"{i}.png" for i in range(n)], defect_types=types, map_means=maps.mean(axis=(1, 2)),
                       maps=maps, masks=masks, has_mask=np.ones(n, bool))
    by_type = metrics_by_defect_type(pred)
    assert set(by_type) == {"found", "flagged"} and by_type["found"]["n"] == 3
    assert by_type["found"]["image_auroc"] == by_type["flagged"]["image_auroc"] == 1.0
    assert by_type["found"]["au_pro"] > 0.9 > 0.2 > by_type["flagged"]["au_pro"]  # chance is 0.15 at limit 0.3
    # the report's defect table shows each type's AU-PRO: high for the found type, low for the flagged one
    from kdad.report import _defect_table

    rows = {r.split("</td>")[0].split(">")[-1]: r for r in _defect_table(pred, None).split("<tr>")[2:]}
    assert "AU-PRO vs good" in _defect_table(pred, None)
    assert f"{by_type['found']['au_pro']:.4f}" in rows["found"]
    assert f"{by_type['flagged']['au_pro']:.4f}" in rows["flagged"]
    no_maps = metrics_by_defect_type(Predictions(scores=pred.scores, labels=pred.labels, paths=pred.paths,
                                                 defect_types=types, map_means=pred.map_means))
    assert set(no_maps["found"]) == {"image_auroc", "n"}
