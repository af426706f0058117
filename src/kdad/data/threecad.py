"""3CAD (Yang, Xing et al., AAAI 2025): 8 categories of real 3C production-line parts, MVTec-like layout.

Released layout (English folder names, the current release; REFERENCE §3.4 and the official ``Data_3CAD.py``)::

    <root>/<Category>/train/good/*.png
    <root>/<Category>/test/good/*.png
    <root>/<Category>/test/<defect_type>/*.png
    <root>/<Category>/ground_truth/<defect_type>/<same stem>.png      (no "_mask" suffix)

Differences from MVTec AD that the loader handles: masks carry the image's own stem; only ``.png`` files are
read (as the official loader; anything else in the folders is ignored); images are 288-1024 px per side and
non-square, resized to ``image_size`` without keeping the aspect ratio (the official ``Resize([256, 256])``);
masks may be stored with 3 channels (any non-zero channel is defect). Labels come from the folder, so a tiny
defect whose mask vanishes after resizing stays a defective image (the official code relabels it good).
Categories are named by folder or abbreviation (``ACC`` ... ``IS``); the official script's misspelling
``Aluminum_Middle-Frame`` is accepted too.
"""

from __future__ import annotations

from pathlib import Path

from kdad.data.mvtec import GOOD, MISSING_MASK_HINT, MVTecDataset, Sample, Split, mask_index
from kdad.data.transforms import PathLike, Size
from kdad.errors import DatasetError

THREECAD_CATEGORIES: dict[str, str] = {
    "ACC": "Aluminum_Camera_Cover",
    "AI": "Aluminum_Ipad",
    "AMF": "Aluminum_Middle_Frame",
    "ANMF": "Aluminum_New_Middle_Frame",
    "ANI": "Aluminum_New_Ipad",
    "AP": "Aluminum_Pc",
    "CS": "Copper_Stator",
    "IS": "Iron_Stator",
}
"""Abbreviation (as in the paper's tables) -> release folder name."""

_ALIASES = {"aluminum_middle-frame": "Aluminum_Middle_Frame"}  # the official train.py's 3CAD list
EXTENSION = ".png"


def category_folder(name: str) -> str:
    """Release folder of a 3CAD category given by folder name or abbreviation (case-insensitive)."""
    by_lower = {v.lower(): v for v in THREECAD_CATEGORIES.values()}
    by_lower.update({k.lower(): v for k, v in THREECAD_CATEGORIES.items()})
    by_lower.update(_ALIASES)
    folder = by_lower.get(name.lower())
    if folder is None:
        valid = [f"{k} ({v})" for k, v in THREECAD_CATEGORIES.items()]
        raise DatasetError(f"unknown 3CAD category {name!r}; valid: {', '.join(valid)}")
    return folder


def _resolve_root(root: Path, category: str | None) -> tuple[Path, str]:
    """The category folder: <root>/<folder>, or root itself when it is that folder (per-category configs)."""
    if category is None:
        if not root.is_dir():
            raise DatasetError(f"3CAD category folder not found: {root}")
        return root, root.name
    folder = category_folder(category)
    for candidate in (root / folder, root, root.parent / folder):
        if candidate.name == folder and candidate.is_dir():
            return candidate, folder
    # root may be <3CAD>/<abbreviation> when data.categories lists abbreviations: its parent is tried above
    found = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    raise DatasetError(f"3CAD category folder {folder!r} not found in {root}; folders there: {found}")


def _png_only(samples: list[Sample], where: Path) -> list[Sample]:
    kept = [s for s in samples if s.image_path.suffix.lower() == EXTENSION]
    if not kept:
        raise DatasetError(f"no {EXTENSION} images in {where} (3CAD ships PNG only)")
    return kept


class ThreeCADDataset(MVTecDataset):
    """One 3CAD category; items as :class:`MVTecDataset` (image (3, H, W) in [0, 1], mask (1, H, W), label...).

    Args:
        root: the 3CAD folder (with ``category``) or one category folder.
        split: ``"train"`` or ``"test"``. image_size: output size (int = square).
        category: folder name or abbreviation, e.g. ``"Aluminum_Camera_Cover"`` or ``"ACC"``.
        allow_missing_masks: as :class:`MVTecDataset` (default False: a defective image without mask raises).
    """

    def __init__(self, root: PathLike, split: Split = "train", image_size: Size = 256, category: str | None = None,
                 allow_missing_masks: bool = False) -> None:
        folder, name = _resolve_root(Path(root), category)
        super().__init__(folder, split, image_size, None, allow_missing_masks)
        self.category = name

    def _train_samples(self) -> list[Sample]:
        return _png_only(super()._train_samples(), self.root / "train" / GOOD)

    def _test_samples(self) -> list[Sample]:
        return _png_only(super()._test_samples(), self.root / "test")

    def _test_sample(self, path: Path, defect_type: str, masks: dict[str, Path]) -> Sample:
        """Mask = ground_truth/<type>/<stem>.png exactly (3CAD has no ``_mask`` suffix)."""
        if defect_type == GOOD:
            return Sample(path, None, 0, GOOD, True)
        mask_dir = self.root / "ground_truth" / defect_type
        mask = (masks or mask_index(mask_dir)).get(f"{path.stem}{EXTENSION}".lower())
        if mask is None and not self.allow_missing_masks:
            raise DatasetError(f"mask not found for {path}: expected {mask_dir / (path.stem + EXTENSION)} "
                               f"({MISSING_MASK_HINT})")
        return Sample(path, mask, 1, defect_type, mask is not None)

    @staticmethod
    def categories(root: PathLike) -> list[str]:
        """3CAD category folders present under ``root`` (release order)."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"3CAD folder not found: {root}")
        return [f for f in THREECAD_CATEGORIES.values() if (root / f / "train" / GOOD).is_dir()]

    def __repr__(self) -> str:
        return f"ThreeCADDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
