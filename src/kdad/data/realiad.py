"""Real-IAD: 30 objects, each sample photographed by 5 cameras (views C1..C5), split by JSON files.

Released layout::

    <root>/realiad_256/<category>/OK/S0001/<category>_0001_OK_C1_<time>.jpg       (also realiad_512,
    <root>/realiad_256/<category>/NG/<type>/S0010/<category>_0010_NG_<type>_C2_<time>.jpg   realiad_1024,
    <root>/realiad_256/<category>/NG/<type>/S0010/<category>_0010_NG_<type>_C2_<time>.png   realiad_raw)
    <root>/realiad_jsons/realiad_jsons/<category>.json         multi-view setting (default)
    <root>/realiad_jsons/realiad_jsons_sv/<category>.json      single-view setting
    <root>/realiad_jsons/realiad_jsons_fuiad_0.X/<category>.json   fully unsupervised (noisy train)

A JSON file holds ``meta`` (``prefix``: the category folder, ``normal_class``: ``"OK"``) and the
lists ``train`` and ``test`` of per-view entries ``{category, anomaly_class, image_path, mask_path}``,
paths relative to ``<resolution folder>/<prefix>``. A view is anomalous (label 1) when its
``anomaly_class`` is not the normal class; the views of a defective sample where the defect is not
visible are labelled ``OK`` and have no mask.

Each view is one dataset item (docs/design.md). The protocol (:func:`realiad_protocol`) scores
images per view and per sample: a sample is anomalous if any of its views is, and its score is the
maximum over its views. The sample key is the file-name prefix before ``_C<n>_``, as in ADEval's
``--sample_key_pat``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdad.data.mvtec import GOOD, MISSING_MASK_HINT, Sample
from kdad.data.transforms import PathLike, Size, _hw
from kdad.data.visa import DraftSampleDataset
from kdad.errors import DatasetError

REALIAD_CATEGORIES: tuple[str, ...] = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
    "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)
"""The 30 Real-IAD objects."""

VIEWS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5")
RESOLUTIONS: tuple[str, ...] = ("256", "512", "1024", "raw")
JSON_DIR = Path("realiad_jsons") / "realiad_jsons"
"""Default split-file folder (multi-view setting), relative to the Real-IAD root."""

SAMPLE_KEY = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_(C[0-9])_")
"""ADEval's sample key pattern; group 2 is the view."""


def sample_key(path: PathLike) -> tuple[str, str]:
    """(sample id, view) of a Real-IAD file, e.g. ('audiojack_0001_OK', 'C1').

    Files that do not follow the naming get their folder as the sample id and view ``""``.
    """
    p = Path(path)
    m = SAMPLE_KEY.match(p.name)
    if m is None:
        return str(p.parent), ""
    return m.group(1), m.group(2)


def parse_views(views: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"C1,C3"`` or ``["C1", "C3"]`` -> ("C1", "C3"); None or "" -> all five views."""
    if not views:
        return VIEWS
    items = [v.strip().upper() for v in (views.split(",") if isinstance(views, str) else views) if v.strip()]
    bad = [v for v in items if v not in VIEWS]
    if bad:
        raise DatasetError(f"unknown Real-IAD view(s) {bad}; valid views: {list(VIEWS)}")
    return tuple(items)


def _base(root: Path) -> tuple[Path, Path | None]:
    """(Real-IAD root, image folder if ``root`` itself is one such as ``realiad_1024``)."""
    if root.name.startswith("realiad_") and not (root / "realiad_jsons").exists():
        return root.parent, root
    return root, None


def find_split_file(root: PathLike, category: str, split_file: PathLike | None = None) -> Path:
    """The JSON of ``category``: ``split_file`` (a file, or a folder holding ``<category>.json``;
    relative paths are under the root), else ``realiad_jsons/realiad_jsons/<category>.json``."""
    base, _ = _base(Path(root))
    if split_file:
        p = Path(split_file)
        p = p if p.is_absolute() else base / p
        candidates = [p / f"{category}.json"] if p.is_dir() else [p]
    else:
        candidates = [base / JSON_DIR / f"{category}.json", base / "realiad_jsons" / f"{category}.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(f"Real-IAD split file not found: {candidates[0]} "
                       "(set data.split_file to the JSON or its folder)")


def find_image_dir(root: PathLike, prefix: str, image_size: Size = 256) -> Path:
    """``<root>/realiad_<res>/<prefix>``: the smallest resolution >= image_size, else the largest there.

    ``root`` may also be a resolution folder itself (``.../realiad_1024``).
    """
    base, given = _base(Path(root))
    if given is not None:
        folders = [given]
    else:
        present = [r for r in RESOLUTIONS if (base / f"realiad_{r}" / prefix).is_dir()]
        want = max(_hw(image_size))
        big = [r for r in present if r == "raw" or int(r) >= want]
        folders = [base / f"realiad_{(big or present[::-1] or ['256'])[0]}"]
    if not (folders[0] / prefix).is_dir():
        raise DatasetError(f"Real-IAD image folder not found: {folders[0] / prefix} "
                           f"(expected <root>/realiad_<256|512|1024|raw>/{prefix})")
    return folders[0] / prefix


def read_split_json(path: PathLike) -> dict[str, Any]:
    """Load and validate a Real-IAD JSON (``meta``, ``train``, ``test``); errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read Real-IAD split file {path}: {e}") from e
    if not isinstance(data, dict) or not any(isinstance(data.get(k), list) for k in ("train", "test")):
        raise DatasetError(f"{path}: expected a JSON object with 'train' and 'test' lists")
    for split in ("train", "test"):
        for i, entry in enumerate(data.get(split) or []):
            if not isinstance(entry, dict) or "image_path" not in entry or "anomaly_class" not in entry:
                raise DatasetError(f"{path}: {split}[{i}] needs 'image_path' and 'anomaly_class', got {entry!r}")
    return data


class RealIADDataset(DraftSampleDataset):
    """One Real-IAD object; one item per view image, in JSON order.

    Args:
        root: the Real-IAD folder (holding ``realiad_<res>/`` and ``realiad_jsons/``), or a resolution
            folder such as ``.../realiad_1024``.
        split: ``"train"`` or ``"test"`` (the JSON's lists).
        image_size: output size; also picks the smallest resolution folder at least this large.
        category: the object, e.g. ``"audiojack"``.
        split_file: JSON file or folder (default ``realiad_jsons/realiad_jsons``, the multi-view setting).
        views: keep only these cameras (``"C1"`` or ``"C1,C2"``); None = all five.
        allow_missing_masks: if False (default) an anomalous view without a mask file raises
            :class:`DatasetError`; if True it gets a zero mask and ``has_mask=False``.
        fast_jpeg: decode JPEGs at reduced scale (see :class:`kdad.data.visa.DraftSampleDataset`).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        image_size: Size = 256,
        category: str | None = None,
        split_file: PathLike | None = None,
        views: str | Sequence[str] | None = None,
        allow_missing_masks: bool = False,
        fast_jpeg: bool = True,
    ) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"Real-IAD split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        if category and root.name == category and (root.parent / "realiad_jsons").is_dir():
            root = root.parent  # multi-class configs give <root>/<category>
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        if not category:
            raise DatasetError(f"Real-IAD needs a category (data.category), one of {list(REALIAD_CATEGORIES)}")
        self.category, self.split, self.view_filter = category, split, parse_views(views)
        self.split_file = find_split_file(root, category, split_file)
        data = read_split_json(self.split_file)
        meta = data.get("meta") or {}
        self.normal_class = str(meta.get("normal_class", "OK"))
        self.image_dir = find_image_dir(root, str(meta.get("prefix") or category).strip("/"), image_size)
        samples = []
        for i, entry in enumerate(data.get(split) or []):
            s = self._sample(entry, f"{split}[{i}]", allow_missing_masks)
            if sample_key(s.image_path)[1] in self.view_filter or sample_key(s.image_path)[1] == "":
                samples.append(s)
        if not samples:
            raise DatasetError(f"{split} split is empty: no {split} entries for views {list(self.view_filter)} "
                               f"in {self.split_file}")
        super().__init__(samples, image_size, fast_jpeg)

    def _sample(self, entry: dict[str, Any], where: str, allow_missing_masks: bool) -> Sample:
        image = self.image_dir / entry["image_path"]
        if not image.is_file():
            raise DatasetError(f"image file not found: {image} ({self.split_file}: {where})")
        anomaly_class = str(entry["anomaly_class"])
        if anomaly_class == self.normal_class:
            return Sample(image, None, 0, GOOD, True)
        mask = self.image_dir / entry["mask_path"] if entry.get("mask_path") else None
        if mask is not None and not mask.is_file():
            mask = None
        if mask is None and not allow_missing_masks:
            raise DatasetError(f"mask not found for {image}: mask_path {entry.get('mask_path')!r} "
                               f"({self.split_file}: {where}; {MISSING_MASK_HINT})")
        return Sample(image, mask, 1, anomaly_class, mask is not None)

    @property
    def views(self) -> list[str]:
        """Camera (``"C1"``..``"C5"``) of every item, in order."""
        return [sample_key(s.image_path)[1] for s in self.samples]

    @property
    def sample_ids(self) -> list[str]:
        """Sample id of every item (shared by the views of one physical sample), in order."""
        return [sample_key(s.image_path)[0] for s in self.samples]

    def __repr__(self) -> str:
        return (f"RealIADDataset(image_dir={str(self.image_dir)!r}, split={self.split!r}, "
                f"views={list(self.view_filter)}, n={len(self)})")


def sample_level(
    paths: Sequence[PathLike], labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-sample (ids, labels, scores): label = max over the sample's views, score = max over its views."""
    label_of: dict[str, int] = {}
    score_of: dict[str, float] = {}
    for p, lab, s in zip(paths, np.asarray(labels).tolist(), np.asarray(scores, dtype=np.float64).tolist()):
        key = sample_key(p)[0]
        label_of[key] = max(label_of.get(key, 0), int(lab))
        score_of[key] = max(score_of.get(key, -math.inf), float(s))
    ids = sorted(label_of)
    return ids, np.array([label_of[k] for k in ids]), np.array([score_of[k] for k in ids])


def _image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from kdad.metrics import image_ap, image_auroc

    return {"n": len(labels), "n_anomalous": int(labels.sum()),
            "image_auroc": image_auroc(scores, labels), "image_ap": image_ap(scores, labels)}


def realiad_protocol(
    paths: Sequence[PathLike], labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """Real-IAD image-level results: ``per_view`` (C1..C5 apart), ``all_views`` (every image) and
    ``per_sample`` (a sample is anomalous if any view is; its score is the max over its views).

    Each entry holds ``n``, ``n_anomalous``, ``image_auroc`` and ``image_ap`` (nan with a warning when
    only one class is present).
    """
    labels_a = np.asarray(labels, dtype=np.int64)
    scores_a = np.asarray(scores, dtype=np.float64)
    if not (len(paths) == len(labels_a) == len(scores_a)):
        raise ValueError(f"paths, labels and scores differ in length: {len(paths)}, {len(labels_a)}, {len(scores_a)}")
    views = np.array([sample_key(p)[1] for p in paths])
    per_view = {v: _image_metrics(labels_a[views == v], scores_a[views == v])
                for v in sorted(set(views.tolist())) if v}
    _, s_labels, s_scores = sample_level(paths, labels_a, scores_a)
    return {"per_view": per_view, "all_views": _image_metrics(labels_a, scores_a),
            "per_sample": _image_metrics(s_labels, s_scores)}


def protocol_from_scores_csv(path: PathLike) -> dict[str, Any]:
    """:func:`realiad_protocol` on a run's ``scores.csv`` (columns path, label, score)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label", "score"} <= set(rows[0]):
        raise DatasetError(f"{path}: expected a scores.csv with columns path, label, score")
    return realiad_protocol([r["path"] for r in rows], [int(r["label"]) for r in rows],
                            [float(r["score"]) for r in rows])
