"""Decision and post-processing helpers on hand-made inputs (edge cases found by benchmarks/mutation.py).

The service's routes run in the ASGI test client's thread, where mutmut does not see which test reached
``result_dict``; these call the helpers directly. No model, no data.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.evaluate import Predictions, _mean_metrics, compute_metrics, display_range, write_scores_csv
from kdad.infer import stream_predictions
from kdad.metrics import evaluate_maps, image_ap, image_auroc, image_f1_max
from kdad.serve.app import result_dict


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _runner(**kw: object) -> SimpleNamespace:
    base = {"image_threshold": 0.7, "pixel_threshold": 0.5, "vmin": 0.0, "vmax": 1.0, "pixel_min_area": 4}
    return SimpleNamespace(**{**base, **kw})


def _blob_map() -> np.ndarray:
    amap = np.zeros((16, 16), np.float32)
    amap[2:4, 2:4] = 1.0  # a 4-px region
    amap[10, 10] = 1.0  # a hot pixel
    return amap


def test_result_dict_decides_at_the_threshold_inclusive_and_labels_it() -> None:
    image = np.zeros((16, 16, 3), np.float32)
    runner = _runner()
    on = result_dict(runner, "a.png", 0.7, _blob_map(), image, 0.7, mask=False)
    assert set(on) == {"filename", "score", "threshold", "decision", "label", "image_threshold",
                       "heatmap_png_base64"}
    assert (on["filename"], on["score"], on["threshold"], on["decision"], on["label"]) == \
        ("a.png", 0.7, 0.7, 1, "anomalous")
    assert on["image_threshold"] == 0.7
    assert _png(on["heatmap_png_base64"]).shape == (16, 16, 3)
    below = result_dict(runner, "b.png", 0.69, _blob_map(), image, 0.7, mask=False)
    assert (below["decision"], below["label"]) == (0, "normal")
    none = result_dict(runner, "c.png", 0.9, _blob_map(), image, None, mask=False)
    assert (none["decision"], none["label"]) == (None, None)


def test_result_dict_mask_keeps_regions_of_the_stored_min_area() -> None:
    image = np.zeros((16, 16, 3), np.float32)
    out = result_dict(_runner(), "a.png", 0.9, _blob_map(), image, 0.7, mask=True)
    keep = _png(out["mask_png_base64"]) > 0
    assert keep.sum() == 4 and not keep[10, 10]
    old = SimpleNamespace(**{k: v for k, v in vars(_runner()).items() if k != "pixel_min_area"})
    assert (_png(result_dict(old, "a.png", 0.9, _blob_map(), image, 0.7, True)["mask_png_base64"]) > 0).sum() == 5
    assert "mask_png_base64" not in result_dict(_runner(pixel_threshold=None), "a.png", 0.9, _blob_map(), image,
                                                0.7, True)
    assert "mask_png_base64" not in result_dict(_runner(), "a.png", 0.9, _blob_map(), image, 0.7, False)


def _preds(has_mask: np.ndarray | None) -> Predictions:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((6, 8, 8), bool)
    masks[3:, 2:5, 2:5] = True
    maps = rng.random((6, 8, 8)).astype(np.float32) + masks * rng.random((6, 8, 8)).astype(np.float32)
    scores = np.array([0.2, 0.5, 0.1, 0.4, 0.9, 0.3])  # not the map maxima: image metrics must use these
    return Predictions(scores, labels, [f"{i}.png" for i in range(6)], ["good"] * 3 + ["cut"] * 3,
                       maps.mean(axis=(1, 2)), maps, masks, has_mask)


def test_compute_metrics_pixel_metrics_skip_images_without_masks_image_metrics_do_not() -> None:
    p = _preds(np.array([True, True, False, True, False, True]))
    keep = p.has_mask
    got = compute_metrics(p, pro_limit=0.2)
    pixel = evaluate_maps(p.maps[keep], p.masks[keep], p.scores[keep], p.labels[keep], pro_limit=0.2)
    for k in pixel:
        if k.startswith("image_"):
            continue
        assert got[k] == pytest.approx(pixel[k]), k
    assert got["image_auroc"] == pytest.approx(image_auroc(p.scores, p.labels))
    assert got["image_ap"] == pytest.approx(image_ap(p.scores, p.labels))
    assert got["image_f1_max"] == pytest.approx(image_f1_max(p.scores, p.labels)[0])
    assert got["image_auroc"] != pytest.approx(image_auroc(p.scores[keep], p.labels[keep]))


@pytest.mark.parametrize("has_mask", [None, np.ones(6, bool)])
def test_compute_metrics_with_every_mask_is_evaluate_maps(has_mask: np.ndarray | None) -> None:
    p = _preds(has_mask)
    assert compute_metrics(p, pro_limit=0.2) == pytest.approx(
        evaluate_maps(p.maps, p.masks, p.scores, p.labels, pro_limit=0.2))
    assert compute_metrics(p) != pytest.approx(compute_metrics(p, pro_limit=0.2))


def test_compute_metrics_without_any_mask_gives_image_metrics_only() -> None:
    p = _preds(np.zeros(6, bool))
    got = compute_metrics(p)
    assert got == pytest.approx({"image_auroc": image_auroc(p.scores, p.labels),
                                 "image_ap": image_ap(p.scores, p.labels),
                                 "image_f1_max": image_f1_max(p.scores, p.labels)[0]})


def test_mean_metrics_skips_missing_nan_and_non_numbers() -> None:
    per = {"a": {"metrics": {"x": 0.2, "y": float("nan"), "z": "n/a"}},
           "b": {"metrics": {"x": 0.4, "y": 0.6, "w": 1}}}
    got = _mean_metrics(per)
    assert got["x"] == pytest.approx(0.3) and got["y"] == 0.6 and got["w"] == 1.0
    assert set(got) == {"w", "x", "y", "z"} and np.isnan(got["z"])


def test_display_range_is_centred_on_the_threshold() -> None:
    maps = np.array([0.1, 0.2, 0.3, 0.9])
    assert display_range(0.5, maps) == pytest.approx({"vmin": 0.25, "vmax": 0.75})
    assert display_range(0.5) == {"vmin": 0.0, "vmax": 1.0}
    assert display_range(0.5, np.zeros(0)) == {"vmin": 0.0, "vmax": 1.0}
    low = display_range(0.1, maps)  # threshold under the median: a tiny positive range, never inverted
    assert low["vmin"] == 0.25 and low["vmax"] == pytest.approx(0.25 + 1e-6)


def test_scores_csv_decides_at_the_threshold_inclusive(tmp_path: Path) -> None:
    p = _preds(None)
    write_scores_csv(tmp_path / "s.csv", {"bottle": p}, 0.4)
    rows = list(csv.reader((tmp_path / "s.csv").read_text().splitlines()))
    assert rows[0] == ["category", "path", "defect_type", "label", "score", "decision"]
    assert rows[4] == ["bottle", "3.png", "cut", "1", "0.4", "1"]
    assert [r[5] for r in rows[1:]] == ["0", "1", "0", "1", "1", "0"]
    write_scores_csv(tmp_path / "n.csv", {"bottle": p}, None)
    assert {r[5] for r in list(csv.reader((tmp_path / "n.csv").read_text().splitlines()))[1:]} == {""}


class _MaxRunner:
    """Stand-in runner: map = the image's first channel, score = its maximum."""

    image_threshold = 0.5

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = images[:, 0].numpy()
        return maps, maps.reshape(len(maps), -1).max(axis=1)


def test_stream_predictions_keeps_path_order_and_decides_inclusive(tmp_path: Path) -> None:
    paths = []
    for i, v in enumerate([0, 255, 64, 128, 200]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(2, tmp_path / "bad.png")
    runner = _MaxRunner()
    runner.image_threshold = None
    first = list(stream_predictions(runner, paths, 8, batch_size=2, progress=False))
    assert all(r.decision is None for r, _, _ in first)
    runner.image_threshold = first[4][0].score  # the grey-128 image's score, exactly
    rows = list(stream_predictions(runner, paths, 8, batch_size=2, progress=False))
    assert [Path(r.path).name for r, _, _ in rows] == [p.name for p in paths]
    bad = rows[2][0]
    assert bad.error and np.isnan(bad.score) and bad.decision is None and rows[2][1] is None
    assert [r.decision for r, _, _ in rows if not r.error] == [0, 1, 0, 1, 1]
    _, amap, image = rows[1]
    assert amap.shape == (8, 8) and image.shape == (8, 8, 3)
