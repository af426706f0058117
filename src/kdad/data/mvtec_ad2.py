"""MVTec AD 2 layout: train, validation and the public test set with ground truth.

Layout of one category::

    <category>/train/good/*.png
    <category>/validation/good/*.png                    held-out normals (thresholds, model selection)
    <category>/test_public/good/*.png
    <category>/test_public/bad/*.png
    <category>/test_public/ground_truth/bad/<stem>_mask.png
    <category>/test_private/*.png                        no ground truth: `kdad predict` only
    <category>/test_private_mixed/*.png                  no ground truth: `kdad predict` only

Split names are ``"train"``, ``"validation"`` and ``"test"`` (= ``test_public``). The private test
sets have no labels, so they are not a split: score them with ``kdad predict RUN <category>/test_private``
and submit the maps to the benchmark server. Items follow docs/design.md.
"""

from __future__ import annotations

from pathlib import Path

from kdad.data.mvtec import GOOD, MISSING_MASK_HINT, Sample, SampleDataset, find_mask, mask_index, resolve_category_dir
from kdad.data.transforms import IMAGE_EXTENSIONS, PathLike, Size, list_images
from kdad.errors import DatasetError

MVTEC_AD2_CATEGORIES: tuple[str, ...] = (
    "can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts",
)
"""The 8 MVTec AD 2 categories."""

SPLIT_FOLDERS: dict[str, str] = {"train": "train", "validation": "validation", "test": "test_public"}
"""Split name -> folder of the category."""

PRIVATE_SPLITS: tuple[str, ...] = ("test_private", "test_private_mixed")
BAD = "bad"


def resolve_category(root: PathLike, category: str | None) -> Path:
    """The category folder: ``root/category`` when a category is given, else ``root`` itself."""
    return resolve_category_dir(root, category, "train/good", "MVTec AD 2 category", "categories")


class MVTecAD2Dataset(SampleDataset):
    """One MVTec AD 2 category.

    Args:
        root: the category folder (``.../can``), or the dataset folder when ``category`` is given.
        split: ``"train"``, ``"validation"`` (normals only) or ``"test"`` (``test_public``: good then bad).
        image_size: output size, int for a square or (H, W).
        category: sub-folder of ``root`` to use, e.g. ``"can"``.
        allow_missing_masks: if False (default) a ``bad`` image without
            ``test_public/ground_truth/bad/<stem>_mask.png`` raises :class:`DatasetError`.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        image_size: Size = 256,
        category: str | None = None,
        allow_missing_masks: bool = False,
    ) -> None:
        if split in PRIVATE_SPLITS:
            raise DatasetError(f"split {split!r} has no ground truth, so it is not a dataset split; score it with "
                               f"`kdad predict RUN {Path(root) / (category or '') / split}`")
        if split not in SPLIT_FOLDERS:
            raise DatasetError(f"MVTec AD 2 split must be one of {list(SPLIT_FOLDERS)}, got {split!r}")
        self.root = resolve_category(root, category)
        self.category = category or self.root.name
        self.split = split
        self.allow_missing_masks = allow_missing_masks
        folder = self.root / SPLIT_FOLDERS[split]
        if not folder.is_dir():
            raise DatasetError(f"{split} folder not found: {folder}")
        samples = self._test(folder) if split == "test" else [Sample(p, None, 0, GOOD, True)
                                                              for p in list_images(folder / GOOD)]
        if not samples:
            raise DatasetError(f"{split} split is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        super().__init__(samples, image_size)

    def _test(self, folder: Path) -> list[Sample]:
        samples = [Sample(p, None, 0, GOOD, True) for p in list_images(folder / GOOD)]
        mask_dir = folder / "ground_truth" / BAD
        masks = mask_index(mask_dir)
        for path in list_images(folder / BAD):
            mask = find_mask(masks, path.stem)
            if mask is None and not self.allow_missing_masks:
                raise DatasetError(f"mask not found for {path}: expected {mask_dir / (path.stem + '_mask.png')} "
                                   f"({MISSING_MASK_HINT})")
            samples.append(Sample(path, mask, 1, BAD, mask is not None))
        return samples

    def __repr__(self) -> str:
        return f"MVTecAD2Dataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
