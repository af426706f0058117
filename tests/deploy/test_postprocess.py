"""kdad.deploy.postprocess on hand-made inputs: the decision rule, the defect mask and the display range.

Edge cases found by benchmarks/mutation.py (group decision). No model, no data.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kdad.deploy.postprocess import PostProcess, display_range, post_of
from kdad.errors import ConfigError
from kdad.thresholds import Thresholds, defect_mask
from kdad.visualize import overlay
from tests.fakes import blob_map


def test_display_range_prefers_the_stored_range() -> None:
    maps = np.array([0.1, 0.2, 0.3, 0.9])
    assert display_range({"vmin": 1, "vmax": 3}, 0.5, maps) == (1.0, 3.0, "stored display range")
    got = display_range({"vmin": 1, "vmax": 3}, None, None)
    assert got == (1.0, 3.0, "stored display range") and isinstance(got[0], float) and isinstance(got[1], float)
    # half a stored range is no range: the pixel threshold decides
    assert display_range({"vmin": 1, "vmax": None}, 0.5, maps)[:2] == pytest.approx((0.25, 0.75))
    assert display_range({"vmin": None, "vmax": 3}, 0.5, maps)[:2] == pytest.approx((0.25, 0.75))


def test_display_range_around_the_pixel_threshold() -> None:
    maps = np.array([0.1, 0.2, 0.3, 0.9])
    assert display_range(None, 0.5, maps) == (pytest.approx(0.25), pytest.approx(0.75),
                                              "median good-image pixel .. 2 × pixel threshold − median")
    assert display_range({}, 0.5, None)[:2] == (0.0, 1.0)
    assert display_range(None, 0.5, np.zeros(0))[:2] == (0.0, 1.0)
    assert display_range(None, 0.5, np.array([0.3]))[:2] == pytest.approx((0.3, 0.7))  # one pixel is a median
    lo, hi, _ = display_range(None, 0.1, maps)  # threshold under the median: a tiny range, never inverted
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25 + 1e-6) and hi > lo


@pytest.mark.parametrize("pixel", [None, float("nan"), float("inf")])
def test_display_range_without_a_finite_pixel_threshold(pixel: float | None) -> None:
    maps = np.linspace(0.0, 1.0, 201)
    lo, hi, how = display_range(None, pixel, maps)
    assert (lo, hi) == pytest.approx((0.01, 0.995))
    assert how == "no stored thresholds: 1st .. 99.5th percentile of test pixels"
    flat = display_range(None, pixel, np.full(10, 0.3))
    assert flat[0] == pytest.approx(0.3) and flat[1] == pytest.approx(0.3 + 1e-6) and flat[1] > flat[0]
    assert display_range(None, pixel, None) == (0.0, 2.0, "no stored thresholds or maps: [0, 2]")
    assert display_range(None, pixel, np.zeros(0)) == (0.0, 2.0, "no stored thresholds or maps: [0, 2]")


def test_postprocess_defaults_and_refuses_a_non_finite_image_threshold() -> None:
    post = PostProcess()
    assert (post.image_threshold, post.pixel_threshold, post.min_area, post.vmin, post.vmax) == \
        (None, None, 1, 0.0, 2.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="^image_threshold must be a finite number"):
            PostProcess(bad)
        with pytest.raises(ConfigError, match="^image_threshold must be a finite number"):
            PostProcess.from_thresholds({"image": 0.5, "pixel": 0.2}, image_threshold=bad)


def test_from_thresholds_reads_a_thresholds_object_or_its_dict() -> None:
    thr = Thresholds(0.7, 0.4, "test", min_area=4)
    for stored in (thr, thr.to_dict()):
        post = PostProcess.from_thresholds(stored, {"vmin": 0.1, "vmax": 0.9})
        assert post == PostProcess(0.7, 0.4, 4, 0.1, 0.9)
    over = PostProcess.from_thresholds(thr, image_threshold=0.2, maps=np.array([0.1, 0.2, 0.3]))
    assert over.image_threshold == 0.2 and over.pixel_threshold == 0.4
    assert (over.vmin, over.vmax) == pytest.approx((0.2, 0.6))  # the maps' median feeds the display fallback
    zero = PostProcess.from_thresholds(thr, image_threshold=0.0)
    assert zero.image_threshold == 0.0  # 0 overrides the stored 0.7 (not treated as missing)


def test_from_thresholds_with_missing_or_none_keys() -> None:
    assert PostProcess.from_thresholds(None) == PostProcess(None, None, 1, 0.0, 2.0)
    assert PostProcess.from_thresholds({}) == PostProcess(None, None, 1, 0.0, 2.0)
    post = PostProcess.from_thresholds({"image": None, "pixel": None, "min_area": None})
    assert post == PostProcess(None, None, 1, 0.0, 2.0)
    post = PostProcess.from_thresholds({"image": "0.5", "pixel": "0.25", "min_area": "3"})
    assert post == PostProcess(0.5, 0.25, 3, 0.0, 0.5)
    assert isinstance(post.image_threshold, float) and isinstance(post.pixel_threshold, float)
    assert isinstance(post.min_area, int)


def test_decision_and_flagged_are_inclusive() -> None:
    post = PostProcess(0.5)
    assert [post.decision(s) for s in (0.49, 0.5, 0.51)] == [0, 1, 1]
    assert post.flagged(np.array([0.49, 0.5, 0.51])).tolist() == [False, True, True]
    none = PostProcess()
    assert none.decision(9.0) is None
    got = none.flagged([0.1, 9.0])
    assert got.dtype == bool and got.tolist() == [False, False]
    assert PostProcess(0.5).flagged([[0.1, 0.7]]).shape == (1, 2)


def test_mask_keeps_regions_of_min_area_at_the_threshold() -> None:
    amap = blob_map(12, 9)
    assert PostProcess(pixel_threshold=None).mask(amap) is None
    keep = PostProcess(pixel_threshold=1.0, min_area=4).mask(amap)
    assert keep is not None and keep.sum() == 4 and not keep[9, 9]
    every = PostProcess(pixel_threshold=1.0).mask(amap)
    assert every is not None and every.sum() == 5
    assert np.array_equal(keep, defect_mask(amap, 1.0, 4))


def test_overlay_uses_the_fixed_range() -> None:
    image = np.full((12, 12, 3), 0.5, np.float32)
    amap = blob_map(12, 9)
    post = PostProcess(vmin=0.2, vmax=0.8)
    assert np.array_equal(post.overlay(image, amap), overlay(image, amap, 0.2, 0.8))
    assert not np.array_equal(post.overlay(image, amap), overlay(image, amap, 0.0, 2.0))


def test_post_of_uses_the_runners_post_or_its_attributes() -> None:
    own = PostProcess(0.3, 0.2, 5, 0.1, 0.7)
    assert post_of(SimpleNamespace(post=own, image_threshold=0.9)) is own
    runner = SimpleNamespace(post="not a PostProcess", image_threshold=0.6, pixel_threshold=0.4, pixel_min_area=3,
                             vmin=0, vmax=1)
    assert post_of(runner) == PostProcess(0.6, 0.4, 3, 0.0, 1.0)
    old = SimpleNamespace(image_threshold=0.6, pixel_threshold=0.4, vmin=0.1, vmax=0.5)  # no pixel_min_area
    got = post_of(old)
    assert got == PostProcess(0.6, 0.4, 1, 0.1, 0.5) and isinstance(got.vmin, float)
