"""BTAD (beanTech Anomaly Detection) in its native layout; the MVTec-converted form goes to MVTecDataset.

Native layout of one product (``01``, ``02`` or ``03``)::

    <product>/train/ok/*.bmp|png
    <product>/test/ok/*.bmp|png
    <product>/test/ko/*.bmp|png
    <product>/ground_truth/ko/<stem>.png|bmp      matched by stem, whatever the extension

``ok`` images are normal (label 0, defect type ``good``), ``ko`` images defective (label 1, defect
type ``ko``). Items follow docs/design.md.
"""

from __future__ import annotations

from pathlib import Path

from kdad.data.mvtec import (
    GOOD,
    MISSING_MASK_HINT,
    MVTecDataset,
    Sample,
    SampleDataset,
    find_mask,
    mask_index,
    resolve_category_dir,
)
from kdad.data.transforms import IMAGE_EXTENSIONS, PathLike, Size, list_images
from kdad.errors import DatasetError

BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
"""The three BTAD products."""

OK, KO = "ok", "ko"


def resolve_product(root: PathLike, category: str | None) -> Path:
    """The product folder: ``root/category`` when a category is given, else ``root`` itself."""
    return resolve_category_dir(root, category, "train", "BTAD product", "products")


def is_native(product: Path) -> bool:
    """True for the native layout (``train/ok``), False for the MVTec-converted one (``train/good``)."""
    return (product / "train" / OK).is_dir() or (product / "test" / OK).is_dir()


class BTADDataset(SampleDataset):
    """One BTAD product in the native ``ok`` / ``ko`` layout.

    Args:
        root: the product folder (``.../01``), or the BTAD folder when ``category`` is given.
        split: ``"train"`` (``train/ok``) or ``"test"`` (``test/ok`` then ``test/ko``).
        image_size: output size, int for a square or (H, W).
        category: product sub-folder of ``root`` (``"01"``, ``"02"``, ``"03"``).
        allow_missing_masks: if False (default) a ``ko`` image without a mask raises
            :class:`DatasetError`; if True it gets a zero mask and ``has_mask=False``.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        image_size: Size = 256,
        category: str | None = None,
        allow_missing_masks: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"BTAD split must be 'train' or 'test', got {split!r}")
        self.root = resolve_product(root, category)
        self.category = category or self.root.name
        self.split = split
        self.allow_missing_masks = allow_missing_masks
        samples = self._train() if split == "train" else self._test()
        super().__init__(samples, image_size)

    def _images(self, folder: Path) -> list[Path]:
        if not folder.is_dir():
            raise DatasetError(f"BTAD folder not found: {folder} (expected <product>/train/ok, test/ok, test/ko)")
        return list_images(folder)

    def _train(self) -> list[Sample]:
        folder = self.root / "train" / OK
        paths = self._images(folder)
        if not paths:
            raise DatasetError(f"train split is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
        return [Sample(p, None, 0, GOOD, True) for p in paths]

    def _test(self) -> list[Sample]:
        test = self.root / "test"
        samples = [Sample(p, None, 0, GOOD, True) for p in self._images(test / OK)]
        mask_dir = self.root / "ground_truth" / KO
        masks = mask_index(mask_dir)
        for path in self._images(test / KO):
            mask = find_mask(masks, path.stem)
            if mask is None and not self.allow_missing_masks:
                raise DatasetError(f"mask not found for {path}: expected {mask_dir / path.stem}.<png|bmp> "
                                   f"({MISSING_MASK_HINT})")
            samples.append(Sample(path, mask, 1, KO, mask is not None))
        if not samples:
            raise DatasetError(f"test split is empty: no images in {test / OK} or {test / KO}")
        return samples

    def __repr__(self) -> str:
        return f"BTADDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def btad_dataset(root: PathLike, split: str, image_size: Size = 256, category: str | None = None,
                 allow_missing_masks: bool = False) -> SampleDataset:
    """BTAD in either layout: native (``ok``/``ko``) -> :class:`BTADDataset`, converted -> MVTecDataset."""
    product = resolve_product(root, category)
    if is_native(product):
        return BTADDataset(product, split, image_size, allow_missing_masks=allow_missing_masks)
    if split not in ("train", "test"):
        raise DatasetError(f"BTAD split must be 'train' or 'test', got {split!r}")
    return MVTecDataset(product, split=split, image_size=image_size,  # type: ignore[arg-type]
                        allow_missing_masks=allow_missing_masks)
