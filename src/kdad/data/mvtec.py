"""MVTec AD layout datasets (also MPDD, converted BTAD, converted Magnetic Tile, kdad demo data).

Layout of one category folder::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect_type>/*.png
    <category>/ground_truth/<defect_type>/<stem>_mask.png

Items follow docs/design.md: ``image`` (3, H, W) in [0, 1], ``mask`` (1, H, W) in {0, 1},
``label`` (0 for ``good``, 1 otherwise, taken from the folder), ``path``, ``defect_type`` and
``has_mask`` (False only for a defective image without a mask file, see ``allow_missing_masks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from kdad.data.transforms import IMAGE_EXTENSIONS, PathLike, Size, SizeRule, list_images, load_image_and_mask
from kdad.errors import DatasetError

Split = Literal["train", "test"]
GOOD = "good"
MISSING_MASK_HINT = ("set data.allow_missing_masks=true (--set data.allow_missing_masks=true) to test such images "
                     "for the image metrics only")


def resolve_category_dir(root: PathLike, category: str | None, marker: str, what: str, plural: str) -> Path:
    """``root/category`` when a category is given (or ``root`` itself when it already is that folder).

    marker: a sub-path every category folder has (e.g. "train"), used to list the valid ones in the error;
    what / plural: the words for one and several categories in messages ("BTAD product", "products").
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if not category or (root.name == category and not (root / category).is_dir()):
        return root
    if not (root / category).is_dir():
        found = sorted(d.name for d in root.iterdir() if (d / marker).is_dir())
        raise DatasetError(f"{what} {category!r} not found in {root}; {plural} there: {found}")
    return root / category


@dataclass(frozen=True)
class Sample:
    """One dataset entry before loading: where the image and its mask are, and its label."""

    image_path: Path
    mask_path: Path | None
    label: int
    defect_type: str
    has_mask: bool


def mask_index(mask_dir: Path) -> dict[str, Path]:
    """Files of ``mask_dir`` by lower-cased name ({} if it does not exist), for :func:`find_mask`."""
    if not mask_dir.is_dir():
        return {}
    return {p.name.lower(): p for p in mask_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def find_mask(by_name: dict[str, Path], stem: str) -> Path | None:
    """Mask of image ``stem``: ``<stem>_mask.<ext>``, else ``<stem>.<ext>`` (any image ext and case)."""
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            hit = by_name.get(f"{name}{ext}".lower())
            if hit is not None:
                return hit
    return None


class SampleDataset(Dataset[dict[str, Any]]):
    """A torch Dataset over a list of :class:`Sample`; loads and resizes on access."""

    def __init__(self, samples: list[Sample], image_size: Size | SizeRule = 256) -> None:
        self.samples = samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        image, mask = load_image_and_mask(s.image_path, s.mask_path, self.image_size)
        return {
            "image": image,
            "mask": mask,
            "label": s.label,
            "path": str(s.image_path),
            "defect_type": s.defect_type,
            "has_mask": s.has_mask,
        }

    @property
    def labels(self) -> list[int]:
        """Label (0 good, 1 defective) of every item, in order, without loading any image."""
        return [s.label for s in self.samples]

    @property
    def defect_types(self) -> list[str]:
        """Defect type of every item, in order ("good" for normals)."""
        return [s.defect_type for s in self.samples]


def _accepted() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


class MVTecDataset(SampleDataset):
    """One category of an MVTec-AD-layout dataset.

    Args:
        root: the category folder (``.../bottle``), or the dataset folder when ``category`` is given.
        split: ``"train"`` (``train/good`` only) or ``"test"`` (every folder under ``test/``).
        image_size: output size, int for a square or (H, W).
        category: sub-folder of ``root`` to use, e.g. ``"bottle"``.
        allow_missing_masks: if False (default) a defective test image without
            ``ground_truth/<type>/<stem>_mask.png`` raises :class:`DatasetError`; if True it gets a
            zero mask and ``has_mask=False``.
    """

    def __init__(
        self,
        root: PathLike,
        split: Split = "train",
        image_size: Size = 256,
        category: str | None = None,
        allow_missing_masks: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        if category is not None:
            if not (root / category).is_dir():
                found = self.categories(root)
                raise DatasetError(f"category {category!r} not found in {root}; categories there: {found}")
            root = root / category
        self.root = root
        self.split = split
        self.category = category if category is not None else root.name
        self.allow_missing_masks = allow_missing_masks
        samples = self._train_samples() if split == "train" else self._test_samples()
        super().__init__(samples, image_size)

    def _train_samples(self) -> list[Sample]:
        folder = self.root / "train" / GOOD
        if not folder.is_dir():
            raise DatasetError(f"train folder not found: {folder} (expected <category>/train/good)")
        paths = list_images(folder)
        if not paths:
            raise DatasetError(f"train split is empty: no images ({_accepted()}) in {folder}")
        return [Sample(p, None, 0, GOOD, True) for p in paths]

    def _test_samples(self) -> list[Sample]:
        test_dir = self.root / "test"
        if not test_dir.is_dir():
            raise DatasetError(f"test folder not found: {test_dir} (expected <category>/test/<defect_type>)")
        samples: list[Sample] = []
        type_dirs = sorted((d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                           key=lambda d: d.name)
        for type_dir in type_dirs:
            defect_type = type_dir.name
            masks = mask_index(self.root / "ground_truth" / defect_type) if defect_type != GOOD else {}
            for path in list_images(type_dir):
                samples.append(self._test_sample(path, defect_type, masks))
        if not samples:
            raise DatasetError(
                f"test split is empty: no images ({_accepted()}) in any sub-folder of {test_dir}"
            )
        return samples

    def _test_sample(self, path: Path, defect_type: str, masks: dict[str, Path]) -> Sample:
        if defect_type == GOOD:
            return Sample(path, None, 0, GOOD, True)
        mask_dir = self.root / "ground_truth" / defect_type
        mask = find_mask(masks, path.stem)
        if mask is None and not self.allow_missing_masks:
            raise DatasetError(
                f"mask not found for {path}: expected {mask_dir / (path.stem + '_mask.png')} "
                f"({MISSING_MASK_HINT})"
            )
        return Sample(path, mask, 1, defect_type, mask is not None)

    @staticmethod
    def categories(root: PathLike) -> list[str]:
        """Names of the sub-folders of ``root`` that hold an MVTec category (have ``train/good``), sorted."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        return sorted(d.name for d in root.iterdir() if (d / "train" / GOOD).is_dir())

    def __repr__(self) -> str:
        return f"MVTecDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
