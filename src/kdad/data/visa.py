"""VisA (Visual Anomaly) in its released layout, split by ``split_csv/1cls.csv``.

Layout::

    <root>/split_csv/1cls.csv                          object,split,label,image,mask (paths relative to <root>)
    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png         any non-zero pixel is defect
    <root>/<category>/image_anno.csv                   optional: image,label,mask (defect names)

The CSV decides the split and the label (``normal`` -> 0, ``anomaly`` -> 1), not the folder. The
images are large (about 1.5k px), so :class:`DraftSampleDataset` lets libjpeg decode them straight
at a reduced scale (PIL ``draft``) before the usual bilinear resize: one decode per item, several
times faster than a full decode. Items follow docs/design.md.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kdad.data.mvtec import GOOD, MISSING_MASK_HINT, Sample, SampleDataset
from kdad.data.transforms import (
    PathLike,
    Size,
    _check_same_size,
    _hw,
    _mask_tensor,
    _to_rgb_float,
    open_header,
    open_image,
    read_error_text,
)
from kdad.errors import DatasetError

VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
"""The 12 VisA categories."""

SPLIT_FILE = Path("split_csv") / "1cls.csv"
"""Default split file, relative to the VisA root."""

CSV_COLUMNS = ("object", "split", "label", "image", "mask")
ANOMALY = "anomaly"


def open_image_draft(path: PathLike, size: Size) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image once, JPEGs directly at the smallest DCT scale still >= ``size``.

    Returns the decoded image and the file's full pixel size (W, H), which masks are checked
    against. Failures raise :class:`DatasetError` naming the file.
    """
    h, w = _hw(size)
    im = open_header(path)  # checks the pixel cap before anything is decoded
    full_size = im.size
    try:
        if im.format == "JPEG":
            im.draft(None, (w, h))  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
        im.load()
    except Exception as e:
        raise DatasetError(f"cannot read image file {path}: {read_error_text(e)}") from e
    return im, full_size


def load_image_and_mask_draft(
    image_path: PathLike, mask_path: PathLike | None, size: Size = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`kdad.data.transforms.load_image_and_mask` with JPEG draft decoding.

    Image (3, H, W) float32 in [0, 1]; mask (1, H, W) in {0, 1}, zeros when ``mask_path`` is None.
    """
    hw = _hw(size)
    im, full_size = open_image_draft(image_path, hw)
    image = torch.from_numpy(np.ascontiguousarray(_to_rgb_float(im, hw, image_path).transpose(2, 0, 1)))
    if mask_path is None:
        return image, torch.zeros(1, *hw, dtype=torch.float32)
    mask_im = open_image(mask_path)
    _check_same_size(image_path, full_size, mask_path, mask_im.size)
    return image, _mask_tensor(mask_im, hw, mask_path)


class DraftSampleDataset(SampleDataset):
    """:class:`SampleDataset` that decodes JPEGs at reduced scale (``fast_jpeg=False`` for full decode)."""

    image_size: Size  # a fixed size: draft decoding needs the target size before it opens the file

    def __init__(self, samples: list[Sample], image_size: Size = 256, fast_jpeg: bool = True) -> None:
        super().__init__(samples, image_size)
        self.fast_jpeg = fast_jpeg

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.fast_jpeg:
            return super().__getitem__(index)
        s = self.samples[index]
        image, mask = load_image_and_mask_draft(s.image_path, s.mask_path, self.image_size)
        return {"image": image, "mask": mask, "label": s.label, "path": str(s.image_path),
                "defect_type": s.defect_type, "has_mask": s.has_mask}


@dataclass(frozen=True)
class VisaRow:
    """One line of a VisA split CSV, with paths made absolute."""

    category: str
    split: str
    label: int
    image: Path
    mask: Path | None
    line: int


def read_split_csv(csv_path: PathLike, root: PathLike) -> list[VisaRow]:
    """Parse a VisA split CSV (columns object, split, label, image, mask); paths are joined to ``root``.

    Raises :class:`DatasetError` naming the file (and line) for a missing file, missing columns or a
    label other than ``normal`` / ``anomaly``.
    """
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file not found: {csv_path} (expected <root>/{SPLIT_FILE})")
    rows: list[VisaRow] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
        for i, r in enumerate(reader, start=2):
            label = (r["label"] or "").strip().lower()
            if label not in ("normal", ANOMALY):
                raise DatasetError(f"{csv_path} line {i}: label {r['label']!r} is not 'normal' or 'anomaly'")
            mask = (r["mask"] or "").strip()
            rows.append(VisaRow(r["object"].strip(), r["split"].strip().lower(), int(label == ANOMALY),
                                root / r["image"].strip(), root / mask if mask else None, i))
    return rows


def resolve_root(root: PathLike, category: str | None) -> tuple[Path, str]:
    """(VisA root, category) from either the VisA root plus a category, or a category folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if (root / "Data").is_dir() and (not category or category == root.name):
        return root.parent, root.name
    if not category:
        found = sorted(d.name for d in root.iterdir() if (d / "Data").is_dir())
        raise DatasetError(f"VisA root {root} needs a category (data.category); categories there: {found}")
    if not (root / category / "Data").is_dir():
        found = sorted(d.name for d in root.iterdir() if (d / "Data").is_dir())
        raise DatasetError(f"VisA category {category!r} not found: no {root / category / 'Data'}; "
                           f"categories there: {found}")
    return root, category


def defect_names(category_dir: Path) -> dict[str, str]:
    """Defect name by image file name from the optional ``<category>/image_anno.csv`` ({} if absent)."""
    anno = category_dir / "image_anno.csv"
    if not anno.is_file():
        return {}
    with open(anno, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image", "label"} <= set(reader.fieldnames or []):
            return {}
        return {Path(r["image"]).name: r["label"].strip() for r in reader if r.get("label")}


class VisADataset(DraftSampleDataset):
    """One VisA category, split by the released CSV.

    Args:
        root: the VisA folder (holding ``split_csv/`` and the category folders), or one category folder.
        split: ``"train"`` or ``"test"``, as written in the CSV's ``split`` column.
        image_size: output size, int for a square or (H, W).
        category: e.g. ``"pcb1"``; taken from ``root`` when it is a category folder.
        split_file: the CSV (default ``<root>/split_csv/1cls.csv``); relative paths are under the root.
        allow_missing_masks: if False (default) an anomaly row without an existing mask file raises
            :class:`DatasetError`; if True it gets a zero mask and ``has_mask=False``.
        fast_jpeg: decode JPEGs at reduced scale (see :class:`DraftSampleDataset`).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        image_size: Size = 256,
        category: str | None = None,
        split_file: PathLike | None = None,
        allow_missing_masks: bool = False,
        fast_jpeg: bool = True,
    ) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"VisA split must be 'train' or 'test', got {split!r}")
        self.root, self.category = resolve_root(root, category)
        self.split = split
        csv_path = Path(split_file) if split_file else SPLIT_FILE
        self.split_file = csv_path if csv_path.is_absolute() else self.root / csv_path
        rows = [r for r in read_split_csv(self.split_file, self.root)
                if r.category == self.category and r.split == split]
        if not rows:
            raise DatasetError(f"{split} split is empty: no rows with object={self.category!r} and "
                               f"split={split!r} in {self.split_file}")
        names = defect_names(self.root / self.category)
        samples = [self._sample(r, names, allow_missing_masks) for r in rows]
        super().__init__(samples, image_size, fast_jpeg)

    def _sample(self, row: VisaRow, names: dict[str, str], allow_missing_masks: bool) -> Sample:
        if not row.image.is_file():
            raise DatasetError(f"image file not found: {row.image} (listed in {self.split_file} line {row.line})")
        if row.label == 0:
            return Sample(row.image, None, 0, GOOD, True)
        mask = row.mask if row.mask is not None and row.mask.is_file() else None
        if mask is None and not allow_missing_masks:
            raise DatasetError(f"mask not found for {row.image}: {row.mask or 'no mask column'} "
                               f"({self.split_file} line {row.line}; {MISSING_MASK_HINT})")
        return Sample(row.image, mask, 1, names.get(row.image.name, ANOMALY), mask is not None)

    def __repr__(self) -> str:
        return f"VisADataset(root={str(self.root)!r}, category={self.category!r}, split={self.split!r}, n={len(self)})"
