"""kdad.metrics against scikit-learn, the REFERENCE §5 hand fixtures and a slow reference AU-PRO."""

from __future__ import annotations

import itertools
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from kdad import metrics as M
from kdad.errors import ConfigError, DatasetError


# Where a metric's warning must point: this file. Under mutation testing (benchmarks/mutation.py) mutmut wraps
# every mutated function in a trampoline from its own package, which then is the first frame outside
# kdad/metrics; there only the messages are checked, and the caller by this suite's normal run.
def points_here(filename: str) -> bool:
    trampoline = sys.modules.get("mutmut.mutation.trampoline")
    return filename in (__file__, getattr(trampoline, "__file__", __file__))

# ---------------------------------------------------------------- fixtures of REFERENCE §5
MAP_A = np.array(
    [
        [0.10, 0.20, 0.30, 0.05],
        [0.40, 0.90, 0.80, 0.15],
        [0.25, 0.70, 0.35, 0.12],
        [0.02, 0.08, 0.50, 0.01],
    ]
)
MASK_A = np.zeros((4, 4), bool)
MASK_A[1:3, 1:3] = True
MAP_B_NORMAL = (0.001 + 0.0009 * np.arange(16)).reshape(4, 4)
MAP_B_NORMAL[0, 0] = 0.95


def _one(x: np.ndarray) -> np.ndarray:
    return x[None]


# ---------------------------------------------------------------- independent slow references
def slow_au_pro(maps: np.ndarray, masks: np.ndarray, limit: float, connectivity: int = 2) -> float:
    """Per-threshold loop over every distinct score (score >= t), regions by skimage, then the
    official integration (points with FPR <= limit, linear interpolation at the limit, / limit)."""
    regions = []
    for amap, mask in zip(maps, masks):
        lab = sk_label(mask, connectivity=connectivity)
        regions += [(amap, lab == r) for r in range(1, lab.max() + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(normal >= t)
        pro = np.mean([np.sum(a[r] >= t) / r.sum() for a, r in regions])
        points.append((min(fpr, 1.0), min(pro, 1.0)))
    points.append((1.0, 1.0))
    fpr_arr, pro_arr = np.array(points).T
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_lim) / 2
            break
    assert fpr_arr[-1] == 1.0 and pro_arr[0] == 0.0
    return area / limit


def slow_au_spro(maps, channels, limit):
    """LOCO sPRO by thresholding at every distinct score (positive iff score > t) plus the top."""
    all_scores = np.concatenate([m.ravel() for m in maps])
    thresholds = np.concatenate(([all_scores.max() + 1.0], np.unique(all_scores)[::-1], [-np.inf]))
    n_ch = sum(len(c) for c in channels)
    unions = [np.logical_or.reduce([c.mask for c in chans]) if chans else np.zeros(m.shape, bool)
              for m, chans in zip(maps, channels)]
    n_neg = sum(int((~u).sum()) for u in unions)
    pts = []
    for t in thresholds:
        fp = sum(int(((m > t) & ~u).sum()) for m, u in zip(maps, unions))
        spro = sum(min(((m > t) & c.mask).sum() / c.saturation_area(), 1.0)
                   for m, chans in zip(maps, channels) for c in chans) / n_ch
        pts.append((fp / n_neg, spro))
    x, y = np.array(pts).T
    return M._core.area_to_limit(x, y, limit)


def random_case(rng: np.random.Generator, n: int = 4, size: int = 12, levels: int | None = None):
    """Small maps with several (some diagonal-touching) regions and, optionally, heavy ties."""
    maps = rng.random((n, size, size))
    if levels:
        maps = np.round(maps * levels) / levels
    masks = rng.random((n, size, size)) > 0.85
    masks[0] = False  # one good image
    masks[1, 2:5, 2:5] = True
    masks[1, 5, 5] = True  # diagonal neighbour: joins under 8-connectivity only
    maps = maps + 0.3 * masks
    return maps, masks


# ---------------------------------------------------------------- sklearn properties
@pytest.mark.parametrize("seed", range(6))
def test_auroc_ap_f1_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), int(rng.integers(0, 3)))
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    p, r, th = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))[:-1]
    best, threshold = M.f1_max(scores, labels)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert th[np.flatnonzero(np.isclose(f1, f1.max()))].min() == threshold


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    maps, masks = random_case(rng, n=5, size=16, levels=20 if seed else None)
    maps32 = maps.astype(np.float32)
    flat_s, flat_y = maps32.ravel(), masks.ravel()
    assert M.pixel_auroc(maps32, masks) == pytest.approx(roc_auc_score(flat_y, flat_s), abs=1e-12)
    assert M.pixel_ap(maps32, masks) == pytest.approx(average_precision_score(flat_y, flat_s), abs=1e-12)
    assert M.pixel_f1_max(maps32, masks)[0] == pytest.approx(M.f1_max(flat_s, flat_y)[0], abs=1e-15)


def test_torch_inputs_and_channel_dim() -> None:
    maps, masks = random_case(np.random.default_rng(3))
    t_maps = torch.from_numpy(maps).float()[:, None]
    t_masks = torch.from_numpy(masks).float()[:, None]
    assert M.pixel_auroc(t_maps, t_masks) == pytest.approx(M.pixel_auroc(maps.astype(np.float32), masks))
    assert M.au_pro(t_maps, t_masks) == pytest.approx(M.au_pro(maps.astype(np.float32), masks))


# ---------------------------------------------------------------- REFERENCE §5 fixtures
def test_fixture_a() -> None:
    assert M.au_pro(_one(MAP_A), _one(MASK_A)) == pytest.approx(0.861111, abs=1e-6)
    # Hand derivation: 0.0625 + 0.0625 + 1/12 + the interpolated piece 1·(0.3 − 0.25), ÷ 0.3.
    assert M.au_pro(_one(MAP_A), _one(MASK_A)) == pytest.approx((0.0625 * 2 + 1 / 12 + 0.05) / 0.3)
    assert M.au_pro(_one(MAP_A), _one(MASK_A), limit=0.1) == pytest.approx(0.75)
    assert M.au_pro(_one(MAP_A), _one(MASK_A), limit=0.05) == pytest.approx(0.75)
    full = M.au_pro(_one(MAP_A), _one(MASK_A), limit=1.0)
    assert full == pytest.approx(0.958333, abs=1e-6)
    # One region and limit 1: AU-PRO equals pixel AUROC.
    assert full == pytest.approx(M.pixel_auroc(_one(MAP_A), _one(MASK_A)))
    assert M.pixel_ap(_one(MAP_A), _one(MASK_A)) == pytest.approx(0.25 * 3 + 0.25 * 4 / 6)
    f1, threshold = M.pixel_f1_max(_one(MAP_A), _one(MASK_A))
    assert f1 == pytest.approx(2 * 1 * 0.75 / 1.75) and f1 == pytest.approx(0.857143, abs=1e-6)
    assert threshold == 0.7
    assert M.legacy_rd4ad_pro(_one(MAP_A), _one(MASK_A)) == pytest.approx(0.833333, abs=1e-6)
    # FPRs {0, 1/12, 2/12, 3/12} rescaled to {0, 1/3, 2/3, 1}: area 0.75/3 + 0.75/3 + 1/3.
    assert M.legacy_rd4ad_pro(_one(MAP_A), _one(MASK_A)) == pytest.approx(0.25 + 0.25 + 1 / 3)


def test_fixture_b_dataset_level_fpr() -> None:
    maps = np.stack([MAP_A, MAP_B_NORMAL])
    masks = np.stack([MASK_A, np.zeros_like(MASK_A)])
    assert M.au_pro(maps, masks) == pytest.approx(0.821429, abs=1e-6)
    assert M.au_pro(maps, masks) == pytest.approx(slow_au_pro(maps, masks, 0.3))
    assert M.legacy_rd4ad_pro(maps, masks) == pytest.approx(0.833333, abs=1e-6)
    fpr, pro = M.pro_curve(maps, masks)
    assert (fpr[1], pro[1]) == (pytest.approx(1 / 28), 0.0)


def test_fixture_c_tie_merging() -> None:
    tied = MAP_A.copy()
    tied[2, 2] = 0.40
    assert M.au_pro(_one(tied), _one(MASK_A)) == pytest.approx(0.895833, abs=1e-6)
    assert M.au_pro(_one(tied), _one(MASK_A)) == pytest.approx(slow_au_pro(_one(tied), _one(MASK_A), 0.3))


def test_fixture_d_eight_connectivity() -> None:
    mask = MASK_A.copy()
    mask[0, 3] = True
    assert M.au_pro(_one(MAP_A), _one(mask)) == pytest.approx(0.678788, abs=1e-6)
    assert slow_au_pro(_one(MAP_A), _one(mask), 0.3, connectivity=1) == pytest.approx(0.424242, abs=1e-6)


def _channels_e(relative: float) -> list[M.SproChannel]:
    single = np.zeros((4, 4), bool)
    single[3, 2] = True
    return [M.SproChannel(MASK_A, relative, True), M.SproChannel(single, 1, False)]


def test_fixture_e_spro() -> None:
    result = M.au_spro([MAP_A], [_channels_e(1.0)])
    assert result[0.3] == pytest.approx(0.962121, abs=1e-6)
    assert result[0.05] == pytest.approx(0.875)
    assert all(isinstance(v, float) for v in result.values())
    assert M.au_spro([MAP_A], [_channels_e(0.5)])[0.3] == pytest.approx(1.0)
    fpr, spro = M.spro_curve([MAP_A], [_channels_e(1.0)])
    assert (fpr[fpr > 0][0], spro[fpr > 0][0]) == (pytest.approx(1 / 11), pytest.approx(0.875))


def test_image_auroc_tie_fixture() -> None:
    scores, labels = [0.2, 0.5, 0.5, 0.5, 0.9], [0, 0, 0, 1, 1]
    assert M.image_auroc(scores, labels) == pytest.approx(0.833333, abs=1e-6)
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


# ---------------------------------------------------------------- AU-PRO vs the slow reference
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_au_pro_matches_slow_reference(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    maps, masks = random_case(rng, levels=[None, 5, 30][seed % 3])
    assert M.au_pro(maps, masks, limit) == pytest.approx(slow_au_pro(maps, masks, limit), abs=1e-9)
    assert M.au_pro(maps.astype(np.float32), masks, limit) == pytest.approx(
        slow_au_pro(maps.astype(np.float32), masks, limit), abs=1e-9
    )


def test_au_pro_partial_sort_falls_back_on_boundary_ties() -> None:
    rng = np.random.default_rng(7)
    maps = np.zeros((3, 10, 10))
    maps[:, :2] = rng.random((3, 2, 10)) + 1  # a few high scores, then a huge tie block at 0
    masks = np.zeros(maps.shape, bool)
    masks[1, 4:6, 4:6] = True
    for limit in (0.1, 0.3):
        assert M.au_pro(maps, masks, limit) == pytest.approx(slow_au_pro(maps, masks, limit), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_au_spro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(50 + seed)
    maps = [np.round(rng.random((8, 9)) * 12) / 12 for _ in range(4)]
    channels: list[list[M.SproChannel]] = [[], [], [], []]
    for i in (1, 2, 3):
        for _ in range(int(rng.integers(1, 3))):
            mask = rng.random((8, 9)) > 0.8  # disconnected on purpose: channel = one defect
            maps[i] = maps[i] + 0.2 * mask
            channels[i].append(M.SproChannel(mask, float(rng.choice([0.5, 1.0, 3.0, 7.0])),
                                             bool(rng.integers(0, 2))))
    result = M.au_spro(maps, channels)
    for limit, value in result.items():
        assert value == pytest.approx(slow_au_spro(maps, channels, limit), abs=1e-9)


# ---------------------------------------------------------------- LOCO helpers
def test_loco_subsets_use_all_good_images(tmp_path) -> None:
    maps = [MAP_A, MAP_A, MAP_B_NORMAL]
    channels = [_channels_e(1.0), _channels_e(0.5), []]
    kinds = ["structural_anomalies", "logical_anomalies", "good"]
    out = M.loco_spro_subsets(maps, channels, kinds, limits=(0.05, 0.3))
    assert out["structural"] == M.au_spro([MAP_A, MAP_B_NORMAL], [channels[0], []], (0.05, 0.3))
    assert out["logical"] == M.au_spro([MAP_A, MAP_B_NORMAL], [channels[1], []], (0.05, 0.3))
    assert out["mean"][0.3] == pytest.approx((out["structural"][0.3] + out["logical"][0.3]) / 2)
    with pytest.raises(ValueError, match="unknown"):
        M.loco_spro_subsets(maps, channels, ["good", "bad", "good"])


def test_load_loco_defects_config(tmp_path) -> None:
    path = tmp_path / "defects_config.json"
    entries = [
        {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 1.0,
         "relative_saturation": True},
        {"defect_name": "extra", "pixel_value": 254, "saturation_threshold": 2000,
         "relative_saturation": False},
    ]
    path.write_text(json.dumps(entries))
    defects = M.load_loco_defects_config(path)
    assert defects[254].saturation_threshold == 2000.0 and not defects[254].relative_saturation
    png = np.zeros((4, 4), np.uint8)
    png[1:3, 1:3] = 255
    channel = M.spro_channel(png, defects, "gt/000.png")
    assert channel.saturation_area() == 4.0 and channel.mask.sum() == 4
    with pytest.raises(DatasetError, match="gt/001.png"):
        M.spro_channel(png // 255 * 7, defects, "gt/001.png")
    with pytest.raises(DatasetError, match="missing.json"):
        M.load_loco_defects_config(tmp_path / "missing.json")
    del entries[1]["relative_saturation"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match="relative_saturation") as err:
        M.load_loco_defects_config(path)
    assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=str(path)):
        M.load_loco_defects_config(path)


# ---------------------------------------------------------------- edge cases
def test_single_class_returns_nan_with_warning() -> None:
    for fn in (M.image_auroc, M.image_ap):
        with pytest.warns(M.MetricWarning, match=fn.__name__):
            assert np.isnan(fn([0.1, 0.2], [0, 0]))
    with pytest.warns(M.MetricWarning, match="image_auroc"):
        assert np.isnan(M.image_auroc([0.1, 0.2], [1, 1]))
    assert M.image_ap([0.1, 0.2], [1, 1]) == 1.0  # AP is defined without negatives
    with pytest.warns(M.MetricWarning, match="au_pro"):
        assert np.isnan(M.au_pro(np.random.rand(2, 4, 4), np.zeros((2, 4, 4))))
    with pytest.warns(M.MetricWarning, match="au_pro"):
        assert np.isnan(M.au_pro(np.random.rand(1, 4, 4), np.ones((1, 4, 4))))
    with pytest.warns(M.MetricWarning):
        assert np.isnan(M.pixel_f1_max(np.random.rand(1, 4, 4), np.zeros((1, 4, 4)))[0])
    with pytest.warns(M.MetricWarning, match="au_spro"):
        assert np.isnan(M.au_spro([MAP_A], [[]])[0.05])


def test_constant_maps() -> None:
    maps = np.full((2, 6, 6), 0.5, np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[1, 2:4, 2:4] = True
    assert M.pixel_auroc(maps, masks) == 0.5
    assert M.image_auroc([1.0, 1.0, 1.0], [0, 1, 0]) == 0.5
    # One tie block: the line PRO = FPR from (0,0) to (1,1); area to L is L²/2, ÷ L gives L/2.
    assert M.au_pro(maps, masks, 0.3) == pytest.approx(0.15)
    assert M.au_pro(maps, masks, 1.0) == pytest.approx(0.5)
    assert M.au_pro(maps, masks, 0.3) == pytest.approx(slow_au_pro(maps, masks, 0.3))
    assert M.pixel_ap(maps, masks) == pytest.approx(masks.mean())
    with pytest.warns(M.MetricWarning, match="legacy"):
        assert np.isnan(M.legacy_rd4ad_pro(maps, masks))


def test_perfect_and_single_region() -> None:
    maps, masks = np.zeros((2, 8, 8)), np.zeros((2, 8, 8), bool)
    masks[0, 3:5, 3:5] = True
    maps[masks] = 1.0
    assert M.au_pro(maps, masks) == 1.0
    assert M.pixel_auroc(maps, masks) == 1.0
    assert M.pixel_f1_max(maps, masks) == (1.0, 1.0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_limit_validation_names_option(bad: float) -> None:
    with pytest.raises(ConfigError, match="limit"):
        M.au_pro(_one(MAP_A), _one(MASK_A), limit=bad)
    with pytest.raises(ValueError, match="pro_limit"):
        M.evaluate_maps(_one(MAP_A), _one(MASK_A), None, [1], pro_limit=bad)
    with pytest.raises(ValueError, match="limits"):
        M.au_spro([MAP_A], [_channels_e(1.0)], limits=(0.3, bad))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="shape"):
        M.au_pro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        M.image_auroc([0.1, float("nan")], [0, 1])


# ---------------------------------------------------------------- evaluate_maps
def test_evaluate_maps_matches_individual_metrics() -> None:
    rng = np.random.default_rng(11)
    maps, masks = random_case(rng, n=6, size=16, levels=40)
    maps = maps.astype(np.float32)
    labels = masks.reshape(6, -1).any(axis=1)
    out = M.evaluate_maps(maps, masks, None, labels)
    scores = maps.reshape(6, -1).max(axis=1)
    assert out == pytest.approx({
        "image_auroc": M.image_auroc(scores, labels),
        "image_ap": M.image_ap(scores, labels),
        "image_f1_max": M.f1_max(scores, labels)[0],
        "pixel_auroc": M.pixel_auroc(maps, masks),
        "pixel_ap": M.pixel_ap(maps, masks),
        "pixel_f1_max": M.pixel_f1_max(maps, masks)[0],
        "au_pro": M.au_pro(maps, masks),
    })


def test_evaluate_maps_without_defect_pixels_skips_pixel_metrics() -> None:
    maps = np.random.default_rng(0).random((4, 8, 8))
    with pytest.warns(M.MetricWarning, match="pixel metrics skipped"):
        out = M.evaluate_maps(maps, np.zeros(maps.shape), [0.1, 0.2, 0.3, 0.9], [0, 0, 1, 1])
    assert out["image_auroc"] == 1.0
    assert all(np.isnan(out[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "au_pro"))


def test_no_warning_on_regular_data() -> None:
    maps, masks = random_case(np.random.default_rng(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.evaluate_maps(maps, masks, None, masks.reshape(len(masks), -1).any(axis=1))


def test_region_labelling_is_eight_connected_and_per_image() -> None:
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal: one region
    masks[1, 0, 0] = True  # same place in another image: a separate region
    regions = M.pro.region_pixels(np.random.rand(2, 5, 5), masks)
    assert regions.n_regions == 2
    assert sorted(np.round(regions.weights * 2, 6)) == [0.5, 0.5, 1.0]
    assert ndimage.label(masks[0], np.ones((3, 3)))[1] == 1


# Edge cases found by mutation testing (benchmarks/mutation.py): undefined metrics name themselves.


def _metric_warnings(fn, *args, **kw):  # noqa: ANN001, ANN202 - a tiny local helper
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [w for w in caught if issubclass(w.category, M.MetricWarning)]


def test_undefined_metrics_warn_under_their_own_name() -> None:
    one_class = ([0.1, 0.2, 0.3], [0, 0, 0])
    no_defect = (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    for name, fn, args in [("image_auroc", M.image_auroc, one_class), ("image_ap", M.image_ap, one_class),
                           ("image_f1_max", M.image_f1_max, one_class), ("f1_max", M.f1_max, one_class),
                           ("pixel_auroc", M.pixel_auroc, no_defect), ("pixel_ap", M.pixel_ap, no_defect),
                           ("pixel_f1_max", M.pixel_f1_max, no_defect)]:
        out, caught = _metric_warnings(fn, *args)
        assert np.isnan(out if np.isscalar(out) else out[0]), name
        assert [str(w.message).split(" is undefined")[0] for w in caught] == [name], name


def test_image_f1_max_is_f1_max_on_images() -> None:
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 1, 0, 1]
    assert M.image_f1_max(scores, labels) == M.f1_max(scores, labels) == (1.0, 0.4)


def test_evaluate_maps_names_each_undefined_metric_and_points_at_the_caller() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[1, :2, :2] = True
    out, caught = _metric_warnings(M.evaluate_maps, maps, masks, None, [0, 0])
    assert [str(w.message).split(" is undefined")[0] for w in caught] == ["image_auroc", "image_ap", "image_f1_max"]
    assert np.isfinite(out["pixel_auroc"])
    out, caught = _metric_warnings(M.evaluate_maps, maps, np.ones((2, 4, 4)), None, [1, 1])
    names = [str(w.message).split(" is undefined")[0] for w in caught]
    assert names == ["image_auroc", "pixel_auroc", "au_pro"] and np.isnan(out["au_pro"])
    assert all(points_here(w.filename) for w in caught)
    out, caught = _metric_warnings(M.evaluate_maps, maps, np.zeros((2, 4, 4)), None, [0, 1])
    assert [str(w.message) for w in caught] == ["no mask has a defect pixel: pixel metrics skipped (nan)"]
    assert points_here(caught[0].filename)  # stacklevel: the warning points at the caller's line
    assert all(np.isnan(out[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "au_pro"))


def test_evaluate_maps_errors_name_the_culprit() -> None:
    maps, masks = np.zeros((2, 4, 4)), np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match=r"^3 image scores/labels for 2 maps$"):
        M.evaluate_maps(maps, masks, [0.1, 0.2, 0.3], [0, 1, 0])
    with pytest.raises(ConfigError, match="^pro_limit must be in"):
        M.evaluate_maps(maps, masks, None, [0, 1], pro_limit=0.0)


# Edge cases found by mutation testing, continued: exact messages, where warnings point, PRO corner cases.

_ONE = "only one class present (need normal and anomalous samples)"


def test_undefined_metrics_give_their_reason_and_point_at_the_caller() -> None:
    one_class = ([0.1, 0.2, 0.3], [0, 0, 0])
    no_defect = (np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4)))
    all_defect = (no_defect[0], np.ones((2, 4, 4)))
    table = [(M.image_auroc, one_class, "image_auroc", _ONE),
             (M.image_ap, one_class, "image_ap", "no anomalous samples"),
             (M.image_f1_max, one_class, "image_f1_max", "no anomalous samples"),
             (M.f1_max, one_class, "f1_max", "no anomalous samples"),
             (M.pixel_auroc, all_defect, "pixel_auroc", _ONE),
             (M.pixel_ap, no_defect, "pixel_ap", "no anomalous samples"),
             (M.pixel_f1_max, no_defect, "pixel_f1_max", "no anomalous samples"),
             (M.au_pro, no_defect, "au_pro", "no mask has an anomalous pixel"),
             (M.au_pro, all_defect, "au_pro", "no normal pixel, so the FPR is undefined")]
    for fn, args, name, reason in table:
        out, caught = _metric_warnings(fn, *args)
        if isinstance(out, tuple):  # F1-max: (nan, nan)
            assert len(out) == 2 and np.isnan(out[1])
            out = out[0]
        assert np.isnan(out), name
        assert [str(w.message) for w in caught] == [f"{name} is undefined: {reason}; returning nan"], name
        assert points_here(caught[0].filename), name  # the public function's caller, not metrics internals


def test_legacy_pro_warns_per_skipped_image_at_the_caller() -> None:
    maps = np.random.default_rng(1).random((3, 6, 6))
    maps[1] = 0.5  # constant map: no usable curve
    masks = np.zeros(maps.shape, bool)
    masks[1, 2:4, 2:4] = masks[2, 1:3, 1:4] = True
    out, caught = _metric_warnings(M.legacy_rd4ad_pro, maps, masks)
    assert np.isfinite(out)
    assert [str(w.message) for w in caught] == ["legacy_rd4ad_pro: image 1 gives no usable curve; skipped"]
    assert points_here(caught[0].filename)
    assert out == pytest.approx(M.legacy_rd4ad_pro(maps[2:], masks[2:]))  # image 1 is left out of the mean
    out, caught = _metric_warnings(M.legacy_rd4ad_pro, maps[1:2], masks[1:2])
    assert np.isnan(out)
    assert [str(w.message) for w in caught] == [
        "legacy_rd4ad_pro: image 0 gives no usable curve; skipped",
        "legacy_rd4ad_pro is undefined: no anomalous image with a usable curve; returning nan"]
    assert all(points_here(w.filename) for w in caught)
    _, caught = _metric_warnings(M.au_spro, [MAP_A], [[]])
    assert caught and all(points_here(w.filename) for w in caught)


def _legacy_reference(amap: np.ndarray, mask: np.ndarray, steps: int = 200, max_fpr: float = 0.3) -> float:
    """hq-deng/RD4AD compute_pro for one image, written out with explicit loops."""
    lab, count = ndimage.label(mask, structure=np.ones((3, 3)))
    lo, hi = amap.min(), amap.max()
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        binary = amap > th
        pros.append(np.mean([(binary & (lab == r)).sum() / (lab == r).sum() for r in range(1, count + 1)]))
        fprs.append((binary & ~mask).sum() / (~mask).sum())
    fpr, pro = np.array(fprs), np.array(pros)
    keep = fpr < max_fpr
    fpr, pro = fpr[keep] / fpr[keep].max(), pro[keep]
    return float(-np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)


@pytest.mark.parametrize("steps,max_fpr", [(200, 0.3), (37, 0.5)])
def test_legacy_pro_matches_an_explicit_loop(steps: int, max_fpr: float) -> None:
    rng = np.random.default_rng(4)
    amap = np.round(rng.random((12, 10)) * 8) / 8  # ties between region and normal pixels
    mask = np.zeros((12, 10), bool)
    mask[1:4, 1:3] = mask[4, 3] = True  # one region 8-connected through a diagonal
    mask[8:11, 6:9] = True  # a second region of another size
    amap[mask] += 0.3
    want = _legacy_reference(amap, mask, steps, max_fpr)
    assert M.legacy_rd4ad_pro(amap[None], mask[None], steps, max_fpr) == pytest.approx(want, abs=1e-12)
    lo = amap - amap.min() + 2.0  # a map far from 0: the threshold grid spans min .. max
    assert M.legacy_rd4ad_pro(lo[None], mask[None], steps, max_fpr) == pytest.approx(
        _legacy_reference(lo, mask, steps, max_fpr), abs=1e-12)


def test_pro_curve_errors_and_full_range() -> None:
    with pytest.raises(ValueError, match="^pro_curve needs both defect pixels and normal pixels in masks$"):
        M.pro_curve(np.random.rand(1, 4, 4), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="^pro_curve needs both defect pixels and normal pixels in masks$"):
        M.pro_curve(np.random.rand(1, 4, 4), np.ones((1, 4, 4)))
    rng = np.random.default_rng(2)
    maps, masks = random_case(rng, n=3, size=12, levels=10)
    fpr, pro = M.pro_curve(maps, masks)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and fpr.max() == 1.0
    assert M.au_pro(maps, masks, 1.0) == pytest.approx(float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2))


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.001])
def test_au_pro_partial_sort_equals_the_full_sort(limit: float) -> None:
    from kdad.metrics._core import rank

    rng = np.random.default_rng(7)
    maps, masks = random_case(rng, n=4, size=24, levels=50)
    regions = M.pro.region_pixels(maps, masks)
    full = M.pro.au_pro_prepared(maps, regions, limit, rank(maps, masks))
    assert M.au_pro(maps, masks, limit) == pytest.approx(full, abs=1e-12)
    assert full == pytest.approx(slow_au_pro(maps, masks, limit), abs=1e-9)


def test_area_to_limit_interpolates_only_inside_the_curve() -> None:
    from kdad.metrics._core import area_to_limit

    fpr, pro = np.array([0.0, 0.2, 0.2, 0.6, 1.0]), np.array([0.0, 0.4, 0.6, 0.8, 1.0])
    assert area_to_limit(fpr, pro, 0.2) == pytest.approx((0.2 * 0.4 / 2) / 0.2)  # ends at the vertical step
    assert area_to_limit(fpr, pro, 0.4) == pytest.approx((0.04 + 0.2 * (0.6 + 0.7) / 2) / 0.4)
    assert area_to_limit(fpr, pro, 1.0) == pytest.approx(0.04 + 0.4 * 0.7 + 0.4 * 0.9)
    short = np.array([0.0, 0.1]), np.array([0.0, 0.5])  # a partial curve that stops before the limit
    assert area_to_limit(*short, 0.3) == pytest.approx(0.1 * 0.5 / 2 / 0.3)


def test_top_sorted_and_distinct_counts() -> None:
    from kdad.metrics._core import _distinct_desc, top_sorted

    x = np.array([[3.0, 1.0], [2.0, 5.0]])
    top, full = top_sorted(x, 2)
    assert top.tolist() == [3.0, 5.0] and full is False
    for k in (4, 9):
        top, full = top_sorted(x, k)
        assert top.tolist() == [1.0, 2.0, 3.0, 5.0] and full is True
    values, counts = _distinct_desc(np.array([1.0, 1.0, 2.0, 4.0, 4.0, 4.0]))
    assert values.tolist() == [4.0, 2.0, 1.0] and counts.tolist() == [3, 1, 2] and counts.dtype == np.int64
    values, counts = _distinct_desc(np.zeros(0, np.float32))
    assert values.shape == counts.shape == (0,) and values.dtype == np.float32 and counts.dtype == np.int64


def test_scores_and_labels_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^scores and labels must have the same length; got \(3,\) and \(2,\)$"):
        M.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="^scores contains NaN$"):
        M.image_ap([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="^labels must be 0/1"):
        M.image_ap([0.1, 0.2], [0, -1])
    with pytest.raises(ConfigError, match=r"^limit must be in \(0, 1\], got 2$"):
        M.au_pro(np.zeros((1, 2, 2)), np.eye(2)[None], limit=2)
    assert M.image_auroc(np.array([[0.1, 0.9]]), np.array([[0], [1]])) == 1.0  # columns are flattened


# Edge cases found by mutation testing, third round: exact messages of the input checks, the sPRO guards, and
# the PRO curve's partial sort (ties and ranks that a wrong partition size or comparison would change).


def test_input_errors_name_the_argument_exactly() -> None:
    with pytest.raises(ValueError, match=r"^maps must be numeric, got dtype <U1$"):
        M.au_pro(np.array([[["a"]]]), np.ones((1, 1, 1)))
    with pytest.raises(ValueError, match=r"^masks must be bool or numeric, got dtype <U1$"):
        M.au_pro(np.ones((1, 1, 1)), np.array([[["a"]]]))
    shapes = r"^maps and masks must be \(N, H, W\) of one shape; got "
    with pytest.raises(ValueError, match=shapes + r"\(1, 2, 2\), \(2, 2\)$"):
        M.au_pro(np.ones((1, 2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=shapes + r"\(2, 2\), \(1, 2, 2\)$"):
        M.au_pro(np.ones((2, 2)), np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match=r"^scores and labels must have the same length; got \(4,\) and \(2,\)$"):
        M.image_auroc(np.ones((2, 2)), [0, 1])
    with pytest.raises(ConfigError, match=r"^limit must be in \(0, 1\], got 2$"):
        M.au_pro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), limit=2)
    with pytest.raises(ConfigError, match=r"^limits must be in \(0, 1\], got 0$"):
        M.au_spro([np.ones((2, 2))], [[]], limits=[0])


def test_single_map_and_mask_are_one_image_and_ints_and_halves_are_scores() -> None:
    m = np.array([[0.1, 0.9], [0.2, 0.3]])
    g = np.array([[0, 1], [0, 0]])
    assert M.au_pro(m, g) == M.au_pro(m[None], g[None]) == pytest.approx(1.0)
    assert M.au_pro((m * 10).astype(np.int64)[None], g[None]) == pytest.approx(1.0)
    assert M.au_pro(m.astype(np.float16)[None], g[None]) == pytest.approx(1.0)
    assert M.image_auroc(np.array([1, 3, 2], np.uint8), [0, 1, 0]) == 1.0
    assert M.image_auroc(torch.tensor([[0.1], [0.9]]), torch.tensor([0, 1])) == 1.0
    assert M.image_auroc(torch.tensor([0.1, 0.9], requires_grad=True), [0, 1]) == 1.0  # detached, not refused


def _spro_channel(mask: np.ndarray) -> M.SproChannel:
    return M.SproChannel(mask.astype(bool), 1.0, True)


def test_au_spro_reasons_and_curve_errors_name_the_culprit() -> None:
    full = np.ones((2, 2), bool)
    _, caught = _metric_warnings(M.au_spro, [np.ones((2, 2))], [[]], [0.5])
    assert [str(w.message) for w in caught] == ["au_spro@0.5 is undefined: no GT channel; returning nan"]
    out, caught = _metric_warnings(M.au_spro, [np.ones((2, 2)), np.zeros((1, 3))], [[_spro_channel(full)],
                                                                                    [_spro_channel(np.ones((1, 3)))]],
                                   [0.5])
    assert [str(w.message) for w in caught] == ["au_spro@0.5 is undefined: no negative pixel; returning nan"]
    assert np.isnan(out[0.5])
    with pytest.raises(ValueError, match=r"^spro_curve needs at least one GT channel and at least one negative pixel$"):
        M.spro_curve([np.ones((2, 2))], [[_spro_channel(full)]])
    for maps, channels in [([], []), ([np.ones((2, 2))], [[]])]:
        with pytest.raises(ValueError, match=r"^spro_curve needs at least one GT channel and at least one "):
            M.spro_curve(maps, channels)
    one = np.zeros((2, 2), bool)
    one[0, 0] = True
    fpr, pro = M.spro_curve([np.array([[0.9, 0.1], [0.2, 0.3]])], [[_spro_channel(one)]])  # a single channel
    assert fpr.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0] and pro.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"^got 2 maps but channels for 1 images$"):
        M.spro_curve([np.ones((2, 2))] * 2, [[]])
    with pytest.raises(ValueError, match=r"^got 2 maps but channels for 1 images$"):
        M.au_spro([np.ones((2, 2))] * 2, [[]])
    with pytest.raises(ValueError, match=r"^channels\[0\]\[0\]\.mask has shape \(1, 2\), map has \(2, 2\)$"):
        M.spro_curve([np.ones((2, 2))], [[_spro_channel(np.ones((1, 2)))]])
    with pytest.raises(ValueError, match=r"^channels\[0\]\[0\]: saturation area is 0 \(empty mask or tiny "
                                         r"threshold\)$"):
        M.spro_curve([np.ones((2, 2))], [[_spro_channel(np.zeros((2, 2)))]])
    with pytest.raises(ValueError, match=r"^maps\[1\] must be numeric, got dtype <U1$"):
        M.spro_curve([np.ones((2, 2)), np.array([["a"]])], [[], []])
    with pytest.raises(ValueError, match=r"^channels\[0\]\[0\]\.mask must be bool or numeric, got dtype <U1$"):
        M.spro_curve([np.ones((1, 1))], [[M.SproChannel(np.array([["a"]]), 1.0, True)]])
    with pytest.raises(ValueError, match=r"^mask must be bool or numeric, got dtype <U1$"):
        M.au_spro([np.ones((1, 1))], [[M.SproChannel(np.array([["a"]]), 1.0, True)]])
    with pytest.raises(ValueError, match=r"^got 1 kinds but channels for 2 images$"):
        M.loco_spro_subsets([np.ones((1, 1))] * 2, [[], []], ["good"])


def test_defects_config_errors_are_exact(tmp_path: Path) -> None:
    def write(obj: object) -> Path:
        path = tmp_path / "defects_config.json"
        path.write_text(json.dumps(obj))
        return path

    entry = {"defect_name": "a", "pixel_value": 1, "saturation_threshold": 1, "relative_saturation": False}
    cases = [({"a": 1}, "expected a JSON list of defects, got dict"), ([1], "entry 0 is not an object"),
             ([entry | {"pixel_value": "1"}], "entry 0 field 'pixel_value' has wrong type str"),
             ([entry | {"saturation_threshold": True}], "entry 0 field 'saturation_threshold' has wrong type bool"),
             ([entry, entry], "pixel_value 1 appears twice")]
    for obj, message in cases:
        path = write(obj)
        with pytest.raises(DatasetError, match=f"^{re.escape(f'{path}: {message}')}$"):
            M.load_loco_defects_config(path)
    assert M.load_loco_defects_config(write([entry]))[1].defect_name == "a"
    defects = {1: M.LocoDefect("a", 1, 1.0, False)}
    with pytest.raises(DatasetError, match=re.escape("mask: expected exactly one nonzero value, found [1, 2, 3, 4, 5]")
                       + "$"):
        M.spro_channel(np.arange(7).reshape(1, 7), defects)


def test_legacy_pro_on_a_grid_of_ties_and_with_nothing_kept() -> None:
    rng = np.random.default_rng(7)
    amap = rng.integers(0, 9, (12, 10)).astype(np.float64)
    mask = np.zeros((12, 10), bool)
    mask[1:4, 1:3] = mask[4, 3] = True
    mask[8:11, 6:9] = True
    amap[mask] += 2.0
    amap[0, 9] = amap.max() + 3.0  # a normal pixel above every region pixel: PRO reaches 0 on the grid
    amap[0, 8] = amap[mask].max() - 0.5  # and one just below the top region pixel: that last step has a width
    steps = int(amap.max() - amap.min())  # integer thresholds: every one ties with map values
    normal = amap[~mask]
    at_a_threshold = float((normal > 4.0).sum() / normal.size)  # a limit that one threshold's FPR equals
    for s, f in [(steps, 0.3), (steps, at_a_threshold), (200, at_a_threshold), (200, 0.3)]:
        want = _legacy_reference(amap, mask, s, f)
        assert M.legacy_rd4ad_pro(amap[None], mask[None], s, f) == pytest.approx(want, abs=1e-12), (s, f)
    smooth = rng.random((12, 10)) + 0.3 * mask  # the default grid (200 steps) shows on a continuous map
    assert _legacy_reference(smooth, mask, 201) != pytest.approx(_legacy_reference(smooth, mask), abs=1e-9)
    assert M.legacy_rd4ad_pro(smooth[None], mask[None]) == pytest.approx(_legacy_reference(smooth, mask), abs=1e-12)
    _, caught = _metric_warnings(M.legacy_rd4ad_pro, amap[None], mask[None], steps, 1e-9)  # no FPR below it
    assert [str(w.message) for w in caught][0] == "legacy_rd4ad_pro: image 0 gives no usable curve; skipped"
