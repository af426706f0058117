"""Datasets from plain folders: one of good images, optionally one of defective images and one of masks.

Items are the same dicts as :class:`kdad.data.mvtec.MVTecDataset` yields (docs/design.md).
"""

from __future__ import annotations

from pathlib import Path

from kdad.data.mvtec import GOOD, Sample, SampleDataset, Split, find_mask, mask_index
from kdad.data.transforms import IMAGE_EXTENSIONS, PathLike, Size, list_images
from kdad.errors import DatasetError


def _images_in(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{what} folder not found: {folder}")
    paths = list_images(folder)
    if not paths:
        raise DatasetError(f"{what} folder is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return paths


class FolderDataset(SampleDataset):
    """Good images (label 0) and, for the test split, defective images (label 1) from flat folders.

    Args:
        good_dir: folder of defect-free images; may be None for a test split that has ``bad_dir``.
        bad_dir: folder of defective images; only read when the split is ``"test"``. Their
            ``defect_type`` is the folder's name.
        mask_dir: masks of the defective images, matched by stem: ``<stem>_mask.<ext>`` or
            ``<stem>.<ext>``. A defective image without a mask gets a zero mask and ``has_mask=False``.
        image_size: output size, int for a square or (H, W).
        split: ``"train"`` (good images only) or ``"test"`` (good, then bad images); None (default)
            means ``"test"`` when ``bad_dir`` is given, else ``"train"``.
    """

    def __init__(
        self,
        good_dir: PathLike | None,
        bad_dir: PathLike | None = None,
        mask_dir: PathLike | None = None,
        image_size: Size = 256,
        split: Split | None = None,
    ) -> None:
        if split is None:
            split = "test" if bad_dir is not None else "train"
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        self.good_dir = Path(good_dir) if good_dir is not None else None
        self.bad_dir = Path(bad_dir) if bad_dir is not None else None
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self.split = split
        if self.good_dir is None and (split == "train" or self.bad_dir is None):
            raise DatasetError(f"FolderDataset split {split!r} needs a good_dir (and bad_dir for 'test')")
        samples = []
        if self.good_dir is not None:
            samples = [Sample(p, None, 0, GOOD, True) for p in _images_in(self.good_dir, "good images")]
        if split == "test" and self.bad_dir is not None:
            samples += self._bad_samples(self.bad_dir)
        super().__init__(samples, image_size)

    def _bad_samples(self, bad_dir: Path) -> list[Sample]:
        masks: dict[str, Path] = {}
        if self.mask_dir is not None:
            if not self.mask_dir.is_dir():
                raise DatasetError(f"mask folder not found: {self.mask_dir}")
            masks = mask_index(self.mask_dir)
        defect_type = bad_dir.name
        samples = []
        for path in _images_in(bad_dir, "defective images"):
            mask = find_mask(masks, path.stem)
            samples.append(Sample(path, mask, 1, defect_type, mask is not None))
        return samples

    def __repr__(self) -> str:
        good = str(self.good_dir) if self.good_dir is not None else None
        bad = str(self.bad_dir) if self.bad_dir is not None else None
        return f"FolderDataset(good_dir={good!r}, bad_dir={bad!r}, split={self.split!r}, n={len(self)})"
