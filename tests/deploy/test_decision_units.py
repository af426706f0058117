"""Decision and post-processing helpers on hand-made inputs (edge cases found by benchmarks/mutation.py).

The service's routes run in the ASGI test client's thread, where mutmut does not see which test reached
``result_dict``; these call the helpers directly. No model, no data.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.deploy.batch import stream_predictions
from kdad.deploy.serve.app import result_dict
from kdad.evaluate import Predictions, _mean_metrics, compute_metrics, display_range, write_scores_csv
from kdad.metrics import evaluate_maps, image_ap, image_auroc, image_f1_max
from tests.fakes import blob_map


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _runner(**kw: object) -> SimpleNamespace:
    base = {"image_threshold": 0.7, "pixel_threshold": 0.5, "vmin": 0.0, "vmax": 1.0, "pixel_min_area": 4}
    return SimpleNamespace(**{**base, **kw})


def test_result_dict_decides_at_the_threshold_inclusive_and_labels_it() -> None:
    image = np.zeros((16, 16, 3), np.float32)
    runner = _runner()
    on = result_dict(runner, "a.png", 0.7, blob_map(16, 10), image, 0.7, mask=False)
    assert set(on) == {"filename", "score", "threshold", "decision", "label", "image_threshold",
                       "heatmap_png_base64", "reason", "gate_score", "gate_threshold"}
    assert (on["reason"], on["gate_score"]) == (None, None)  # no gate stored: never "invalid"
    assert (on["filename"], on["score"], on["threshold"], on["decision"], on["label"]) == \
        ("a.png", 0.7, 0.7, 1, "anomalous")
    assert on["image_threshold"] == 0.7
    assert _png(on["heatmap_png_base64"]).shape == (16, 16, 3)
    below = result_dict(runner, "b.png", 0.69, blob_map(16, 10), image, 0.7, mask=False)
    assert (below["decision"], below["label"]) == (0, "normal")
    none = result_dict(runner, "c.png", 0.9, blob_map(16, 10), image, None, mask=False)
    assert (none["decision"], none["label"]) == (None, None)


def test_result_dict_mask_keeps_regions_of_the_stored_min_area() -> None:
    image = np.zeros((16, 16, 3), np.float32)
    out = result_dict(_runner(), "a.png", 0.9, blob_map(16, 10), image, 0.7, mask=True)
    keep = _png(out["mask_png_base64"]) > 0
    assert keep.sum() == 4 and not keep[10, 10]
    old = SimpleNamespace(**{k: v for k, v in vars(_runner()).items() if k != "pixel_min_area"})
    assert (_png(result_dict(old, "a.png", 0.9, blob_map(16, 10), image, 0.7, True)["mask_png_base64"]) > 0).sum() == 5
    assert "mask_png_base64" not in result_dict(_runner(pixel_threshold=None), "a.png", 0.9, blob_map(16, 10), image,
                                                0.7, True)
    assert "mask_png_base64" not in result_dict(_runner(), "a.png", 0.9, blob_map(16, 10), image, 0.7, False)


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

    image_threshold: float | None = 0.5
    pixel_threshold = None
    vmin, vmax = 0.0, 1.0

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(images))
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
    assert runner.calls[-3:] == [2, 2, 2]  # memory bounded by one batch of the asked size


def test_stream_predictions_applies_the_callers_pixel_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)  # 1600 px
    row = next(stream_predictions(_MaxRunner(), [path], 8, progress=False, max_megapixels=0.001))[0]
    assert row.error and "megapixel" in row.error.lower() and row.decision is None
    ok = next(stream_predictions(_MaxRunner(), [path], 8, progress=False, max_megapixels=0.01))[0]
    assert not ok.error and ok.decision == 0


def test_good_images_flagged_counts_good_images_with_a_large_enough_region() -> None:
    from kdad.evaluate import good_images_flagged

    maps = np.zeros((5, 12, 12), np.float32)
    maps[0, 2:4, 2:4] = 1.0  # good, 4-px region: flagged at min_area 4
    maps[1, 5, 5] = 1.0  # good, hot pixel: flagged only at min_area 1
    maps[3, 2:6, 2:6] = 1.0  # defective: never counted
    labels = np.array([0, 0, 0, 1, 0])
    p = Predictions(maps.max(axis=(1, 2)), labels, [""] * 5, [""] * 5, maps.mean(axis=(1, 2)), maps)
    assert good_images_flagged(p, {"pixel": 0.5, "min_area": 4}) == {"rate": 0.25, "n_good": 4, "min_area": 4}
    assert good_images_flagged(p, {"pixel": 0.5}) == {"rate": 0.5, "n_good": 4, "min_area": 1}
    assert good_images_flagged(p, {"pixel": 1.0, "min_area": 4})["rate"] == 0.25  # >= threshold
    assert good_images_flagged(p, {"pixel": None}) is None
    assert good_images_flagged(Predictions(p.scores, labels, [], [], p.map_means), {"pixel": 0.5}) is None
    none_good = Predictions(p.scores[3:4], labels[3:4], [""], [""], p.map_means[3:4], maps[3:4])
    assert good_images_flagged(none_good, {"pixel": 0.5}) == {"rate": None, "n_good": 0, "min_area": 1}


class _ChannelModel(torch.nn.Module):
    """Stand-in model: map = the first channel, score = its maximum."""

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        amap = images[:, :1]
        return SimpleNamespace(anomaly_map=amap, score=amap.amax(dim=(1, 2, 3)))


def _normal_items(n: int = 12) -> list[dict]:
    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        image = torch.from_numpy(rng.random((3, 16, 16)).astype(np.float32)) * 0.1
        y, x = rng.integers(0, 10, size=2)
        image[0, y:y + 4, x:x + 4] += 0.5 + i / n  # one 16-px spot per image, peaks all distinct
        items.append({"image": image, "label": 0, "path": f"{i}.png", "defect_type": "good",
                      "mask": torch.zeros(1, 16, 16)})
    return items


def test_thresholds_from_normals_region_and_quantile_rules() -> None:
    import dataclasses

    from kdad.config import TrainConfig
    from kdad.errors import ConfigError
    from kdad.evaluate import predict, thresholds_from_normals
    from kdad.thresholds import (
        image_threshold_from_validation,
        pixel_threshold_for_region_rate,
        pixel_threshold_from_validation,
    )

    items, model, cpu = _normal_items(), _ChannelModel(), torch.device("cpu")
    pred = predict(model, items, cpu)
    tc = dataclasses.replace(TrainConfig(), threshold_quantile=0.9, pixel_region_rate=0.25, pixel_min_area=9,
                             pixel_threshold_quantile=0.95, eval_batch_size=5, image_threshold_rule="quantile")
    thr, display, calib = thresholds_from_normals(model, items, cpu, tc)
    assert np.array_equal(calib, np.sort(pred.scores.astype(np.float64)))
    assert thr.image == image_threshold_from_validation(pred.scores, None, 0.9)
    assert thr.pixel == pixel_threshold_for_region_rate(pred.maps, 0.25, 9)
    assert thr.min_area == 9
    assert thr.source == ("image: 0.9 quantile of 12 normal scores; pixel: at most 0.25 of those images with a "
                          "region of >= 9 px flagged (measured 0.250)")
    assert display == display_range(thr.pixel, pred.maps)
    thr, display, _ = thresholds_from_normals(model, items, cpu,
                                              dataclasses.replace(tc, pixel_threshold_rule="quantile"))
    assert thr.pixel == pixel_threshold_from_validation(pred.maps, None, 0.95)
    assert (thr.image, thr.min_area) == (image_threshold_from_validation(pred.scores, None, 0.9), 1)
    assert thr.source == "normal-image quantiles (0.9, 0.95) over 12 images"
    assert display == display_range(thr.pixel, pred.maps)
    with pytest.raises(ConfigError, match="^train.pixel_threshold_rule: 'x' is not 'region' or 'quantile'"):
        thresholds_from_normals(model, items, cpu, dataclasses.replace(tc, pixel_threshold_rule="x"))


def test_model_info_reports_the_stored_decision_rule() -> None:
    from kdad import __version__
    from kdad.deploy.serve.app import ACCEPTED_FORMATS, Limits, model_info
    from kdad.export import input_contract

    runner = _runner(image_size=32, vmin=0.1, vmax=0.9)
    runner.info = lambda: {"method": "rd"}
    limits = Limits(max_upload_mb=1.0, max_megapixels=2.0, max_batch_files=3)
    info = model_info(runner, limits)
    assert info["method"] == "rd" and info["input_contract"] == input_contract(32)
    assert (info["image_threshold"], info["pixel_threshold"]) == (0.7, 0.5)
    assert info["display"] == {"vmin": 0.1, "vmax": 0.9}
    assert info["limits"] == {"max_upload_mb": 1.0, "max_megapixels": 2.0, "max_batch_files": 3}
    assert info["accepted_formats"] == list(ACCEPTED_FORMATS) and info["kdad_version"] == __version__
    assert info["score"] == "raw image score = max of the anomaly map; decision = score >= threshold"
    assert info["gate"] == ("label 'invalid' (decision null, with a reason) when the image is not a plausible picture "
                            "of the trained product: gate_score > gate_threshold, or a flat or overexposed frame")
    assert info["gate_threshold"] is None  # no stored gate
    runner.info = lambda: {"input_contract": "own"}
    assert model_info(runner, limits)["input_contract"] == "own"


def test_stream_predictions_defaults_batch_16_and_a_labelled_progress_bar(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    paths = []
    for i in range(17):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(paths[-1])
    runner = _MaxRunner()
    assert len(list(stream_predictions(runner, paths, 8))) == 17
    assert runner.calls == [16, 1]  # the default batch size
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)predict: ", err)  # a progress bar by default, labelled "predict"
    list(stream_predictions(runner, paths[:2], 8, progress=False))
    assert capsys.readouterr().err == ""


def _photo(h: int = 6, w: int = 10, seed: int = 0) -> np.ndarray:
    return (0.1 + 0.5 * np.random.default_rng(seed).random((h, w, 3))).astype(np.float32)


def test_invalid_reason_reads_either_layout_of_a_non_square_image() -> None:
    from kdad.deploy.postprocess import PostProcess

    post = PostProcess(image_threshold=0.5, gate_threshold=10.0, max_saturated=0.25, chroma_range=(0.05, 0.2))
    burnt = _photo()
    burnt.reshape(-1, 3)[:16] = 1.0  # 16 of 60 pixels saturated in every channel: 27 % > 25 %
    want = "overexposed: 27% of pixels saturated > 25%"
    assert post.verdict(0.1, 3.0, burnt) == ("invalid", want)
    assert post.verdict(0.1, 3.0, burnt.transpose(2, 0, 1)) == ("invalid", want)
    burnt.reshape(-1, 3)[15] = 0.3  # exactly 25 %: not above the limit, so the colour check speaks
    label, reason = post.verdict(0.1, 3.0, burnt)
    assert label == "invalid" and str(reason).startswith("colour unlike the training images")
    photo = _photo()
    c = float((photo.max(axis=2) - photo.min(axis=2)).mean())
    want = f"colour unlike the training images (another camera?): chroma {c:.4f} outside [0.0500, 0.2000]"
    assert post.verdict(0.1, 3.0, photo) == ("invalid", want)
    assert post.verdict(0.1, 3.0, photo.transpose(2, 0, 1)) == ("invalid", want)
    wide = PostProcess(image_threshold=0.5, gate_threshold=10.0, chroma_range=(0.05, 0.9))
    assert wide.verdict(0.7, 3.0, photo) == ("anomalous", None)
    assert wide.verdict(0.7, 11.0, photo)[0] == "invalid"


def test_result_dict_and_stream_pass_the_gate_score_and_the_image() -> None:
    from kdad.deploy.postprocess import PostProcess

    post = PostProcess(image_threshold=0.5, gate_threshold=10.0, chroma_range=(0.05, 0.9))
    runner = _runner(post=post)
    photo = _photo(16, 16)
    ok = result_dict(runner, "a.png", 0.7, blob_map(16, 10), photo, 0.5, mask=False, gate_score=3.0)
    assert (ok["label"], ok["decision"], ok["gate_score"], ok["reason"]) == ("anomalous", 1, 3.0, None)
    far = result_dict(runner, "a.png", 0.7, blob_map(16, 10), photo, 0.5, mask=False, gate_score=11.0)
    assert (far["label"], far["decision"], far["gate_score"]) == ("invalid", None, 11.0)
    flat = result_dict(runner, "a.png", 0.7, blob_map(16, 10), np.zeros((16, 16, 3), np.float32), 0.5, mask=False,
                       gate_score=3.0)
    assert (flat["label"], flat["decision"]) == ("invalid", None) and "flat frame" in flat["reason"]


class _GatedRunner(_MaxRunner):
    """_MaxRunner with a gate: gate score = 100 x the image's mean."""

    def __init__(self) -> None:
        from kdad.deploy.postprocess import PostProcess

        super().__init__()
        self.post = PostProcess(image_threshold=0.5, gate_threshold=30.0)
        self.gate_calls: list[torch.Tensor] = []

    def gate_scores(self, images01: torch.Tensor) -> np.ndarray:
        self.gate_calls.append(images01)
        return 100 * images01.mean(dim=(1, 2, 3)).numpy()


def test_stream_predictions_gives_each_image_its_gate_score(tmp_path: Path) -> None:
    paths = []
    for i, level in enumerate((0.1, 0.2, 0.6)):
        paths.append(tmp_path / f"{i}.png")
        noise = np.random.default_rng(i).random((8, 8, 3)) * 0.2 + level
        Image.fromarray((noise * 255).round().astype(np.uint8)).save(paths[-1])
    runner = _GatedRunner()
    rows = [r for r, _, _ in stream_predictions(runner, paths, 8, batch_size=3, progress=False)]
    assert len(runner.gate_calls) == 1 and tuple(runner.gate_calls[0].shape) == (3, 3, 8, 8)
    gates = [r.gate_score for r in rows]
    assert gates[0] == pytest.approx(20, abs=2) and gates[1] == pytest.approx(30, abs=2) and gates[2] > 60
    assert [r.label for r in rows][2] == "invalid" and rows[2].decision is None and "out-of-distribution" in \
        str(rows[2].reason)
    assert rows[0].label == "anomalous" or rows[0].label == "normal"
    assert [r.gate_score for r in stream_predictions(_MaxRunner(), paths, 8, progress=False) for r in [r[0]]] == \
        [None] * 3


def test_stream_predictions_checks_each_image_itself_not_only_its_gate_score(tmp_path: Path) -> None:
    # A blank frame with an in-range gate score is still invalid: predict hands the image to the pixel checks.
    paths = [tmp_path / "blank.png", tmp_path / "noise.png"]
    Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).save(paths[0])  # gate score 100 * 40/255 ~ 16 < 30
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 80).astype(np.uint8)).save(paths[1])
    rows = [r for r, _, _ in stream_predictions(_GatedRunner(), paths, 8, batch_size=2, progress=False)]
    assert rows[0].label == "invalid" and "flat frame" in str(rows[0].reason) and rows[0].gate_score < 30
    assert rows[1].label in ("normal", "anomalous") and rows[1].reason is None


def test_from_thresholds_reads_every_stored_gate_field() -> None:
    from kdad.deploy.postprocess import PostProcess

    gate = {"threshold": 7.5, "flat_std": 0.03, "max_saturated": 0.4, "chroma_range": [0.01, 0.2]}
    post = PostProcess.from_thresholds({"image": 0.5}, gate=gate)
    assert (post.gate_threshold, post.flat_std, post.max_saturated, post.chroma_range) == (7.5, 0.03, 0.4,
                                                                                          (0.01, 0.2))
    old = PostProcess.from_thresholds({"image": 0.5}, gate={"threshold": 7.5})  # a gate fitted before the checks
    assert (old.flat_std, old.max_saturated, old.chroma_range) == (0.01, 1.0, None)
    assert PostProcess.from_thresholds({"image": 0.5}).gate_threshold is None


def test_gate_limits_are_inclusive_chroma_on_either_end_and_the_gate_score() -> None:
    from kdad.deploy.postprocess import PostProcess
    from kdad.gate import chroma

    photo = _photo()
    c = float(chroma(photo)[0])
    for lo, hi in ((c, c + 0.1), (c - 0.1, c), (c, c)):
        post = PostProcess(image_threshold=0.5, gate_threshold=3.0, chroma_range=(lo, hi))
        assert post.verdict(0.7, 3.0, photo) == ("anomalous", None), (lo, hi)  # on the limits: valid
    post = PostProcess(image_threshold=0.5, gate_threshold=3.0, chroma_range=(c + 1e-6, 1.0))
    assert post.verdict(0.7, 3.0, photo)[0] == "invalid"


def test_thresholds_from_normals_returns_float64_calibration_scores() -> None:
    # the bundle stores these for the service's drift statistic: float64, whatever the model's dtype
    import dataclasses

    from kdad.config import TrainConfig
    from kdad.evaluate import thresholds_from_normals

    tc = dataclasses.replace(TrainConfig(), eval_batch_size=5)
    _, _, calib = thresholds_from_normals(_ChannelModel(), _normal_items(), torch.device("cpu"), tc)
    assert calib.dtype == np.float64 and np.all(np.diff(calib) >= 0)
