"""Validation-split thresholds: F1-max with defects, a normal-score quantile without."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdad.errors import ConfigError
from kdad.metrics import f1_max
from kdad.thresholds import (
    Thresholds,
    image_threshold_from_validation,
    pixel_threshold_from_validation,
    thresholds_from_validation,
)


def test_image_threshold_uses_f1_max_when_defects_present() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.25])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert image_threshold_from_validation(scores, labels) == f1_max(scores, labels)[1]


def test_image_threshold_from_normals_only_is_a_quantile() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    threshold = image_threshold_from_validation(scores, quantile=0.99)
    assert threshold == pytest.approx(np.quantile(scores, 0.99))
    # A defect-free validation set must not mark everything anomalous.
    assert np.mean(scores >= threshold) == pytest.approx(0.01, abs=0.002)
    assert image_threshold_from_validation(scores, np.zeros(1000), 0.99) == threshold
    assert image_threshold_from_validation(torch.from_numpy(scores), None, 0.99) == pytest.approx(threshold)


def test_pixel_threshold_with_and_without_masks() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[1, 4:8, 4:8] = True
    maps[masks] += 1.0
    assert pixel_threshold_from_validation(maps, masks) == f1_max(maps, masks)[1]
    normal = maps[:1]
    assert pixel_threshold_from_validation(normal, None, 0.999) == pytest.approx(np.quantile(normal, 0.999))


def test_pixel_threshold_subsamples_large_inputs_deterministically() -> None:
    maps = np.random.default_rng(2).random((4, 64, 64)).astype(np.float32)
    a = pixel_threshold_from_validation(maps, quantile=0.9, max_pixels=5000, seed=3)
    b = pixel_threshold_from_validation(maps, quantile=0.9, max_pixels=5000, seed=3)
    assert a == b
    assert a == pytest.approx(np.quantile(maps, 0.9), abs=0.02)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan")])
def test_quantile_validation(bad: float) -> None:
    with pytest.raises(ConfigError, match="quantile"):
        image_threshold_from_validation([0.1, 0.2], quantile=bad)
    with pytest.raises(ConfigError, match="quantile"):
        pixel_threshold_from_validation(np.zeros((1, 4, 4)), quantile=bad)


def test_thresholds_roundtrip_and_errors() -> None:
    rng = np.random.default_rng(4)
    t = thresholds_from_validation(rng.random(20), rng.random((20, 8, 8)))
    assert "quantile" in t.source
    restored = Thresholds.from_dict(json.loads(json.dumps(t.to_dict())))
    assert restored == t
    with pytest.raises(ConfigError, match="pixel"):
        Thresholds.from_dict({"image": 0.1, "source": "x"})
    with pytest.raises(ConfigError, match="number"):
        Thresholds.from_dict({"image": "high", "pixel": 0.2, "source": "x"})


def test_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="same length"):
        image_threshold_from_validation([0.1, 0.2, 0.3], [0, 1])


def _spotty_maps(n: int = 40, size: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth normal maps; image i carries one 5x5 spot of height i / n (so region peaks are all distinct)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size)) * 0.05
    for i in range(n):
        y, x = rng.integers(5, size - 10, size=2)
        maps[i, y:y + 5, x:x + 5] += 1.0 + i / n
    return maps


def test_region_peak_is_the_highest_threshold_with_a_large_region() -> None:
    from kdad.thresholds import region_peak

    m = np.zeros((32, 32))
    m[5:9, 5:9] = 1.0  # a 16-px region at 1.0
    m[20, 20] = 5.0  # a single hot pixel
    assert region_peak(m, 1) == 5.0
    assert region_peak(m, 16) == pytest.approx(1.0, abs=1e-6)  # the hot pixel is too small to count
    assert region_peak(m, 17) < m.min()  # no region that large at any threshold: never flagged


def test_pixel_threshold_controls_the_fraction_of_flagged_normal_images() -> None:
    from kdad.thresholds import flagged_region_rate, pixel_threshold_for_region_rate

    maps = _spotty_maps()
    for rate in (0.0, 0.05, 0.1, 0.25):
        t = pixel_threshold_for_region_rate(maps, rate, min_area=16)
        assert flagged_region_rate(maps, t, 16) <= rate + 1e-12
        # the smallest such threshold: a little lower flags one image more than allowed
        assert flagged_region_rate(maps, t - 1e-3, 16) > rate
    # a per-pixel quantile does not control it: at the 0.999 pixel quantile most of these images are flagged
    big = _spotty_maps(size=128)  # spots are 0.15 % of the pixels: the 0.999 quantile falls inside most of them
    q = pixel_threshold_from_validation(big, quantile=0.999)
    assert flagged_region_rate(big, q, 16) > 0.5


def test_defect_mask_drops_regions_below_min_area() -> None:
    from kdad.thresholds import defect_mask

    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0  # 16 px
    m[15, 15] = 1.0  # 1 px
    assert defect_mask(m, 0.5, 1).sum() == 17
    keep = defect_mask(m, 0.5, 16)
    assert keep.sum() == 16 and not keep[15, 15] and keep[3, 3]
    assert defect_mask(m, 2.0, 16).sum() == 0


def test_thresholds_min_area_round_trips_and_old_bundles_load() -> None:
    t = Thresholds(1.0, 0.5, "x", min_area=16)
    assert Thresholds.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert Thresholds.from_dict({"image": 1.0, "pixel": 0.5, "source": "old"}).min_area == 1
    with pytest.raises(ConfigError, match="min_area"):
        Thresholds.from_dict({"image": 1.0, "pixel": 0.5, "source": "x", "min_area": 0})


# Edge cases found by mutation testing (benchmarks/mutation.py): each test fails on a named wrong behaviour.


def test_finite_threshold_passes_numbers_and_none_and_names_the_bad_one() -> None:
    from kdad.thresholds import finite_threshold

    assert finite_threshold(None) is None
    assert finite_threshold(0.25) == 0.25
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ConfigError, match="^threshold must be a finite number"):
            finite_threshold(bad)
    with pytest.raises(ConfigError, match="^image_threshold must be a finite number"):
        finite_threshold(float("nan"), "image_threshold")


def test_quantile_bounds_are_inclusive_and_a_single_score_is_enough() -> None:
    scores = [0.1, 0.5, 0.3]
    assert image_threshold_from_validation(scores, quantile=1.0) == 0.5
    assert image_threshold_from_validation(scores, quantile=0.0) == 0.1
    assert image_threshold_from_validation([0.3]) == 0.3
    with pytest.raises(ValueError, match="^image_threshold_from_validation needs at least one score$"):
        image_threshold_from_validation([])


def test_column_scores_and_labels_are_flattened() -> None:
    scores = np.array([[0.1], [0.2], [0.3], [0.6], [0.7], [0.25]])
    labels = np.array([[0], [0], [0], [1], [1], [1]])
    expected = f1_max(scores.ravel(), labels.ravel())[1]
    assert image_threshold_from_validation(scores, labels.ravel()) == expected
    assert image_threshold_from_validation(scores.ravel(), labels) == expected


def test_bad_inputs_are_named_in_the_error() -> None:
    from kdad.thresholds import flagged_region_rate, pixel_threshold_for_region_rate

    with pytest.raises(ValueError, match="^scores contains NaN"):
        image_threshold_from_validation([0.1, float("nan")])
    with pytest.raises(ValueError, match="^labels must be 0/1"):
        image_threshold_from_validation([0.1, 0.2], [0, -1])
    nan_maps = np.zeros((1, 4, 4))
    nan_maps[0, 0, 0] = np.nan
    for call in (lambda: pixel_threshold_from_validation(nan_maps), lambda: flagged_region_rate(nan_maps, 0.5),
                 lambda: pixel_threshold_for_region_rate(nan_maps)):
        with pytest.raises(ValueError, match="^maps contains NaN"):
            call()
    with pytest.raises(ConfigError, match="^max_pixels must be >= 1"):
        pixel_threshold_from_validation(np.zeros((1, 4, 4)), max_pixels=0)
    with pytest.raises(ValueError, match=r"^maps must be \(N, H, W\)"):
        pixel_threshold_for_region_rate(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"^maps must be \(N, H, W\)"):
        pixel_threshold_for_region_rate(np.zeros((0, 4, 4)))
    with pytest.raises(ConfigError, match="^min_area must be >= 1"):
        pixel_threshold_for_region_rate(np.zeros((2, 4, 4)), 0.5, min_area=0)
    maps = _spotty_maps(n=4)
    assert pixel_threshold_for_region_rate(maps, 0.0, min_area=1) == maps.max()  # 1 px: the per-pixel maximum


def test_sources_name_the_rule_used_for_each_threshold() -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((4, 8, 8))
    masks = np.zeros(maps.shape, bool)
    masks[1, 2:4, 2:4] = True
    maps[masks] += 1.0
    t = thresholds_from_validation(maps.max(axis=(1, 2)), maps, labels=[0, 1, 0, 0], masks=masks)
    assert t.source == "validation image=f1_max pixel=f1_max"
    assert t.pixel == f1_max(maps, masks)[1]
    t = thresholds_from_validation(maps.max(axis=(1, 2)), maps, image_quantile=0.5, pixel_quantile=0.9)
    assert t.source == "validation image=quantile:0.5 pixel=quantile:0.9"


def test_pixel_subsample_draws_from_every_pixel_and_only_above_the_cap() -> None:
    maps = np.random.default_rng(6).random((1, 4, 4))
    assert pixel_threshold_from_validation(maps, quantile=0.7, max_pixels=16) == np.quantile(maps, 0.7)
    assert pixel_threshold_from_validation(maps, quantile=0.7, max_pixels=1) in maps
    # two pixels, one drawn: over seeds both are drawn (index 0 included), so the threshold varies with the seed
    two = np.array([[[1.0, 2.0]]])
    drawn = {pixel_threshold_from_validation(two, quantile=0.5, max_pixels=1, seed=s) for s in range(20)}
    assert drawn == {1.0, 2.0}
    assert pixel_threshold_from_validation(np.zeros((1, 1, 1)), max_pixels=1) == 0.0


def test_region_peak_edge_cases() -> None:
    from kdad.thresholds import region_peak

    m = np.zeros((16, 16))
    m[3, 3:5] = 2.0  # a 2-px region
    m[10, 10] = 5.0  # a hot pixel
    assert region_peak(m, 2) == pytest.approx(2.0, abs=1e-6)
    diagonal = np.zeros((16, 16))
    for i in range(5):
        diagonal[4 + i, 4 + i] = 1.0  # 8-connected: one 5-px region
    assert region_peak(diagonal, 5) == pytest.approx(1.0, abs=1e-6)
    assert region_peak(np.ones((8, 8)), 4) < 1.0  # a flat map has no region above its minimum
    assert region_peak(np.array([[0.5, 1.0], [0.2, 0.3]]), 5) < 0.2  # smaller than min_area: never flagged


def test_region_rate_one_flags_every_image() -> None:
    from kdad.thresholds import flagged_region_rate, pixel_threshold_for_region_rate, region_peak

    maps = _spotty_maps(n=10)
    maps[1:] += 5.0  # peaks far apart: a threshold below all but the lowest one does not flag every image
    t = pixel_threshold_for_region_rate(maps, 1.0, min_area=16)
    assert t < min(region_peak(a, 16) for a in maps)
    assert flagged_region_rate(maps, t, 16) == 1.0
    assert flagged_region_rate(maps[:1], t, 16) == 1.0
    assert np.isnan(flagged_region_rate(np.zeros((0, 8, 8)), 0.5, 16))


def test_defect_mask_is_8_connected_inclusive_and_honours_min_area_2() -> None:
    from kdad.thresholds import defect_mask

    m = np.zeros((12, 12))
    for i in range(4):
        m[2 + i, 2 + i] = 1.0  # a 4-px diagonal: one 8-connected region
    m[9, 9] = 1.0
    assert defect_mask(m, 1.0, 1).sum() == 5  # a pixel equal to the threshold is flagged
    assert defect_mask(m, 1.0, 2).sum() == 4
    assert defect_mask(m, 1.0, 4).sum() == 4


@pytest.mark.parametrize("bad", [2.5, True])
def test_thresholds_min_area_must_be_a_plain_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="min_area"):
        Thresholds.from_dict({"image": 1.0, "pixel": 0.5, "source": "x", "min_area": bad})


def test_thresholds_over_the_pixel_cap_are_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdad.thresholds as thresholds

    monkeypatch.setattr(thresholds, "DEFAULT_MAX_PIXELS", 100)  # stands in for a 20 M-pixel validation set
    rng = np.random.default_rng(7)
    scores, maps = rng.random(8), rng.random((8, 16, 16))
    a = thresholds_from_validation(scores, maps)
    assert thresholds_from_validation(scores, maps) == a
    assert a.pixel == pixel_threshold_from_validation(maps, quantile=0.999, max_pixels=100, seed=0)


# ----------------------------------------------------------------------------------- conformal (issue 21.1)
def test_conformal_threshold_is_the_hand_computed_order_statistic() -> None:
    from kdad.thresholds import conformal_rank, conformal_threshold

    scores = np.random.default_rng(3).permutation(np.arange(1.0, 20.0))  # 1..19, shuffled
    conf = conformal_threshold(scores, alpha=0.1)
    # k = ceil((19 + 1) * 0.9) = 18: the 18th smallest score; anomalous iff score > it (score >= next float)
    assert conformal_rank(19, 0.1) == 18 and conf.rank == 18 and conf.enough
    assert conf.threshold == np.nextafter(18.0, np.inf)
    assert not (18.0 >= conf.threshold) and 19.0 >= conf.threshold
    assert conformal_rank(99, 0.01) == 99 and conformal_rank(40, 0.1) == 37  # (n+1)(1-a) integer, and not


def test_conformal_false_alarm_rate_is_at_most_alpha_over_random_splits() -> None:
    """Many random calibration/test splits of a known score distribution: the mean realised false-alarm rate
    matches the exact conformal value (n+1-k)/(n+1) <= alpha, where the old 0.95 quantile rule exceeds alpha."""
    from kdad.thresholds import conformal_threshold

    rng = np.random.default_rng(0)
    n, alpha, trials, m = 40, 0.05, 3000, 200
    conf_rates, quant_rates = [], []
    for _ in range(trials):
        calib, test = rng.lognormal(size=n), rng.lognormal(size=m)
        conf_rates.append(np.mean(test >= conformal_threshold(calib, alpha).threshold))
        quant_rates.append(np.mean(test >= image_threshold_from_validation(calib, quantile=1 - alpha)))
    k = int(np.ceil((n + 1) * (1 - alpha)))  # 39
    exact = (n + 1 - k) / (n + 1)  # 2/41 = 0.0488
    se = np.std(conf_rates) / np.sqrt(trials)
    assert exact <= alpha
    assert abs(np.mean(conf_rates) - exact) < 4 * se
    assert np.mean(conf_rates) <= alpha
    assert np.mean(quant_rates) > alpha + 4 * np.std(quant_rates) / np.sqrt(trials)  # why the rule changed


def test_too_few_calibration_images_warn_and_say_how_many() -> None:
    from kdad.thresholds import conformal_guarantee, conformal_threshold, images_needed

    assert images_needed(0.01) == 99 and images_needed(0.05) == 19 and images_needed(0.3) == 3
    conf = conformal_threshold(np.arange(50.0), alpha=0.01)
    assert not conf.enough and conf.rank == 50 and conf.threshold > 49.0
    assert conf.warning is not None and "at least 99" in conf.warning
    assert "at least 99" in conformal_guarantee(0.01, 50) and "<= 0.01961" in conformal_guarantee(0.01, 50)
    assert conformal_threshold(np.arange(99.0), alpha=0.01).warning is None
    assert "P(false alarm) <= 0.01 " in conformal_guarantee(0.01, 99)


def test_thresholds_from_predictions_follow_the_rule_and_warn() -> None:
    from kdad.config import TrainConfig
    from kdad.evaluate import thresholds_from_predictions

    rng = np.random.default_rng(1)
    scores, maps = rng.random(30), rng.random((30, 8, 8))
    with pytest.warns(UserWarning, match="at least 99"):
        thr, _ = thresholds_from_predictions(scores, maps, TrainConfig(alpha=0.01))
    assert thr.alpha == 0.01 and thr.n_calibration == 30 and "conformal" in thr.source
    assert thr.image == np.nextafter(scores.max(), np.inf)
    thr, _ = thresholds_from_predictions(scores, maps, TrainConfig(alpha=0.1))
    assert thr.image == np.nextafter(np.sort(scores)[27], np.inf)  # k = ceil(31 * 0.9) = 28
    meta = thr.to_metadata()
    assert meta["alpha"] == 0.1 and meta["n_calibration"] == 30 and "<= 0.1 " in meta["guarantee"]
    old, _ = thresholds_from_predictions(scores, maps, TrainConfig(image_threshold_rule="quantile"))
    assert old.image == pytest.approx(np.quantile(scores, 0.99)) and old.alpha is None and old.guarantee is None


def test_bundles_without_alpha_load_as_the_quantile_rule() -> None:
    old = Thresholds.from_dict({"image": 2.0, "pixel": 1.0, "source": "normal-image quantiles (0.99, 0.999) over 32"})
    assert old.alpha is None and old.n_calibration is None and old.guarantee is None
    new = Thresholds.from_dict({**old.to_dict(), "alpha": 0.05, "n_calibration": 40, "guarantee": "ignored"})
    assert new.alpha == 0.05 and new.guarantee is not None and "40 calibration images" in new.guarantee
    with pytest.raises(ConfigError, match="alpha"):
        Thresholds.from_dict({**old.to_dict(), "alpha": 1.5, "n_calibration": 40})


def test_clopper_pearson_interval() -> None:
    from kdad.thresholds import clopper_pearson

    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(5, 100)
    assert lo == pytest.approx(0.01643, abs=1e-4) and hi == pytest.approx(0.11284, abs=1e-4)


def test_onnx_metadata_states_alpha_n_and_the_guarantee() -> None:
    from kdad.export import threshold_metadata

    meta = threshold_metadata({"image": 2.0, "pixel": 1.0, "source": "s", "alpha": 0.01, "n_calibration": 120})
    assert meta["alpha"] == 0.01 and meta["n_calibration"] == 120 and "<= 0.01 " in meta["guarantee"]
    old = threshold_metadata({"image": 2.0, "pixel": 1.0, "source": "normal-image quantiles"})
    assert old["alpha"] is None and old["guarantee"] is None and old["min_area"] == 1
