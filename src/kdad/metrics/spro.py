"""AU-sPRO of MVTec LOCO AD (saturated per-region overlap), exact global-sort variant.

Each GT *channel* is one defect (no connected components; channels may overlap). A channel c with
saturation area a_c scores sPRO_c(t) = min(TP_c(t) / a_c, 1); the curve averages over all channels
of the subset. FP = predicted positive AND in no channel. Instead of LOCO's adaptive thresholds we
use one global sort in which each channel's pixels contribute 1/(a_c·C) for its first a_c ranks
only: the limit of the official refinement (REFERENCE §5), agreeing with the script to ~1e-3.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from kdad.errors import DatasetError
from kdad.metrics._core import area_to_limit, as_bool, as_scores, check_limit, overlap_curve, undefined

LOCO_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
LOCO_SUBSETS: tuple[str, ...] = ("structural_anomalies", "logical_anomalies")


@dataclass(frozen=True)
class SproChannel:
    """One GT defect channel of an image: mask (H, W) bool and its saturation rule."""

    mask: np.ndarray
    saturation_threshold: float
    relative_saturation: bool

    def saturation_area(self) -> float:
        """int(threshold·area) if relative, else min(threshold, area) (LOCO definition), in pixels."""
        area = int(np.count_nonzero(self.mask))
        if self.relative_saturation:
            return float(int(self.saturation_threshold * area))
        return float(min(self.saturation_threshold, area))


@dataclass(frozen=True)
class LocoDefect:
    """One entry of a LOCO ``defects_config.json``."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def _channel_entries(values: np.ndarray, saturation: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a channel's first ceil(a) ranks and their increments (summing to 1)."""
    n = math.ceil(min(saturation, values.size))
    top = np.sort(values)[values.size - n :]  # ascending, the n largest
    ranks = np.arange(n, 0, -1, dtype=np.float64)  # rank 1 = largest score
    return top, (np.minimum(ranks, saturation) - np.minimum(ranks - 1, saturation)) / saturation


MapsInput = Sequence[ArrayLike] | np.ndarray


def _map_list(maps: MapsInput) -> list[np.ndarray]:
    return [as_scores(m, f"maps[{i}]") for i, m in enumerate(maps)]


def spro_curve(maps: MapsInput, channels: Sequence[Sequence[SproChannel]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact sPRO curve: fpr (K,), mean sPRO (K,) from (0,0) to (1,1).

    maps: N score maps (H_i, W_i) (a list, or an (N,H,W) array); channels: for each image the list of
    its GT channels (empty for good images). Raises ValueError if there is no channel or no negative.
    """
    images = _map_list(maps)
    if len(images) != len(channels):
        raise ValueError(f"got {len(images)} maps but channels for {len(channels)} images")
    union_vals, entry_vals, entry_w = [], [], []
    n_channels = 0
    for i, (amap, chans) in enumerate(zip(images, channels)):
        union = np.zeros(amap.shape, dtype=bool)
        for c, ch in enumerate(chans):
            mask = as_bool(ch.mask, f"channels[{i}][{c}].mask")
            if mask.shape != amap.shape:
                raise ValueError(f"channels[{i}][{c}].mask has shape {mask.shape}, map has {amap.shape}")
            saturation = ch.saturation_area()
            if saturation <= 0:
                raise ValueError(f"channels[{i}][{c}]: saturation area is 0 (empty mask or tiny threshold)")
            vals, w = _channel_entries(amap[mask], saturation)
            entry_vals.append(vals)
            entry_w.append(w)
            union |= mask
            n_channels += 1
        union_vals.append(amap[union])
    n_pixels = sum(a.size for a in images)
    union_sorted = np.sort(np.concatenate(union_vals)) if union_vals else np.zeros(0)
    if n_channels == 0 or union_sorted.size == n_pixels:
        raise ValueError("spro_curve needs at least one GT channel and at least one negative pixel")
    values = np.concatenate(entry_vals)
    order = np.argsort(values, kind="stable")
    all_sorted = np.concatenate([a.ravel() for a in images])
    all_sorted.sort()
    weights = np.concatenate(entry_w)[order] / n_channels
    return overlap_curve(all_sorted, True, union_sorted, values[order], weights, n_pixels - union_sorted.size)


def au_spro(
    maps: MapsInput,
    channels: Sequence[Sequence[SproChannel]],
    limits: Sequence[float] = LOCO_LIMITS,
) -> dict[float, float]:
    """AU-sPRO for each FPR limit (area to the limit, interpolated, divided by the limit).

    Inputs as :func:`spro_curve`. Returns {limit: value}; each limit must be in (0, 1]. Values are
    ``nan`` with a MetricWarning when there is no GT channel or no negative pixel.
    """
    checked = [check_limit(v, "limits") for v in limits]
    if len(maps) != len(channels):
        raise ValueError(f"got {len(maps)} maps but channels for {len(channels)} images")
    n_channels = sum(len(c) for c in channels)
    n_union, n_pixels = 0, 0
    for amap, chans in zip(maps, channels):
        n_pixels += int(np.size(amap))
        if chans:
            n_union += int(np.count_nonzero(np.logical_or.reduce([as_bool(c.mask, "mask") for c in chans])))
    if n_channels == 0 or n_union == n_pixels:
        reason = "no GT channel" if n_channels == 0 else "no negative pixel"
        out = {}
        for v in checked:
            out[v] = undefined(f"au_spro@{v}", reason)
        return out
    fpr, pro = spro_curve(maps, channels)
    return {v: area_to_limit(fpr, pro, v) for v in checked}


def loco_spro_subsets(
    maps: MapsInput,
    channels: Sequence[Sequence[SproChannel]],
    kinds: Sequence[str],
    limits: Sequence[float] = LOCO_LIMITS,
) -> dict[str, dict[float, float]]:
    """LOCO protocol: AU-sPRO of structural and of logical anomalies, each with *all* good images.

    kinds: per image one of ``good``, ``structural_anomalies``, ``logical_anomalies``.
    Returns {"structural": {limit: v}, "logical": {limit: v}, "mean": {limit: mean of the two}}.
    """
    valid = ("good",) + LOCO_SUBSETS
    bad = sorted({k for k in kinds if k not in valid})
    if bad:
        raise ValueError(f"kinds has unknown values {bad}; valid: {list(valid)}")
    if len(kinds) != len(channels):
        raise ValueError(f"got {len(kinds)} kinds but channels for {len(channels)} images")
    map_list = _map_list(maps)
    out: dict[str, dict[float, float]] = {}
    for subset in LOCO_SUBSETS:
        keep = [i for i, k in enumerate(kinds) if k in ("good", subset)]
        out[subset.split("_")[0]] = au_spro([map_list[i] for i in keep], [channels[i] for i in keep], limits)
    out["mean"] = {v: (out["structural"][v] + out["logical"][v]) / 2.0 for v in out["structural"]}
    return out


def load_loco_defects_config(path: str | Path) -> dict[int, LocoDefect]:
    """Read a LOCO ``defects_config.json`` -> {pixel_value: LocoDefect}; errors name the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: defects config not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read defects config ({exc})") from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a JSON list of defects, got {type(raw).__name__}")
    fields: dict[str, type | tuple[type, ...]] = {"defect_name": str, "pixel_value": int,
                                                  "saturation_threshold": (int, float), "relative_saturation": bool}
    defects: dict[int, LocoDefect] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: entry {i} is not an object")
        for key, kind in fields.items():
            if key not in entry:
                raise DatasetError(f"{path}: entry {i} lacks field {key!r}; needs {list(fields)}")
            value = entry[key]
            if not isinstance(value, kind) or (key != "relative_saturation" and isinstance(value, bool)):
                raise DatasetError(f"{path}: entry {i} field {key!r} has wrong type {type(value).__name__}")
        defect = LocoDefect(entry["defect_name"], entry["pixel_value"], float(entry["saturation_threshold"]),
                            entry["relative_saturation"])
        if defect.pixel_value in defects:
            raise DatasetError(f"{path}: pixel_value {defect.pixel_value} appears twice")
        defects[defect.pixel_value] = defect
    return defects


def spro_channel(mask_png: ArrayLike, defects: Mapping[int, LocoDefect], source: str = "mask") -> SproChannel:
    """Build a channel from one LOCO GT PNG (H, W) holding 0 and exactly one defect value.

    ``source`` (e.g. the PNG path) is named in errors.
    """
    arr = np.asarray(mask_png)
    values = np.unique(arr[arr != 0])
    if values.size != 1:
        raise DatasetError(f"{source}: expected exactly one nonzero value, found {values.tolist()[:5]}")
    value = int(values[0])
    if value not in defects:
        raise DatasetError(f"{source}: pixel value {value} not in defects config; known: {sorted(defects)}")
    d = defects[value]
    return SproChannel(arr == value, d.saturation_threshold, d.relative_saturation)
