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
