"""Build datasets from a DataConfig (MVTec layout or plain folders)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from kdad.config import DataConfig
from kdad.errors import ConfigError
from kdad.formats import FORMATS


def build_dataset(data: DataConfig, split: str) -> Dataset:
    """Train or test dataset of items {image (3,H,W) in [0,1], mask, label, path, defect_type}."""
    if data.format == "mvtec":
        if not data.root:
            raise ConfigError("data.root is empty: give the dataset folder (e.g. --data path/to/bottle)")
        from kdad.data.mvtec import MVTecDataset

        return MVTecDataset(data.root, split=split, image_size=data.image_size,  # type: ignore[arg-type]
                            allow_missing_masks=data.allow_missing_masks)
    if data.format == "loco":
        if not data.root:
            raise ConfigError("data.root is empty: give the MVTec LOCO category folder (e.g. --data path/to/pushpins)")
        from kdad.data.loco import LocoDataset

        return LocoDataset(data.root, split=split, image_size=data.image_size,  # type: ignore[arg-type]
                           allow_missing_masks=data.allow_missing_masks)
    if data.format in LAYOUT_FORMATS:
        return _build_layout(data, split)
    if data.format == "folder":
        from kdad.data.folder import FolderDataset

        if split == "train":
            if not data.good_dir:
                raise ConfigError("data.good_dir is empty: the folder format needs a folder of good images")
            return FolderDataset(good_dir=data.good_dir, image_size=data.image_size)
        if not (data.test_good_dir or data.bad_dir):
            raise ConfigError("data.test_good_dir and data.bad_dir are empty: nothing to test on")
        return FolderDataset(good_dir=data.test_good_dir or None, bad_dir=data.bad_dir or None,
                             mask_dir=data.mask_dir or None, image_size=data.image_size)
    valid = list(FORMATS)
    raise ConfigError(f"data.format: unknown format {data.format!r}; valid: {valid}")


LAYOUT_FORMATS = ("visa", "btad", "mvtec_ad2", "realiad", "3cad")
"""Released layouts read from data.root (+ data.category): see docs/datasets.md."""


def _build_layout(data: DataConfig, split: str) -> Dataset:
    """VisA, BTAD (native or MVTec-converted), MVTec AD 2 or Real-IAD, from data.root and data.category."""
    if not data.root:
        raise ConfigError(f"data.root is empty: give the {data.format} dataset folder (--set data.root=...)")
    cat = data.category or None
    if data.format == "visa":
        from kdad.data.visa import VisADataset

        return VisADataset(data.root, split, data.image_size, cat, split_file=data.split_file or None,
                           allow_missing_masks=data.allow_missing_masks)
    if data.format == "btad":
        from kdad.data.btad import btad_dataset

        return btad_dataset(data.root, split, data.image_size, cat, data.allow_missing_masks)
    if data.format == "mvtec_ad2":
        from kdad.data.mvtec_ad2 import MVTecAD2Dataset

        return MVTecAD2Dataset(data.root, split, data.image_size, cat,
                               allow_missing_masks=data.allow_missing_masks)
    if data.format == "3cad":
        from kdad.data.threecad import ThreeCADDataset

        return ThreeCADDataset(data.root, split, data.image_size, cat,  # type: ignore[arg-type]
                               allow_missing_masks=data.allow_missing_masks)
    from kdad.data.realiad import RealIADDataset

    return RealIADDataset(data.root, split, data.image_size, cat, split_file=data.split_file or None,
                          views=data.view or None, allow_missing_masks=data.allow_missing_masks)


def category_name(data: DataConfig) -> str:
    """Name shown in reports: data.category, else the dataset folder's name."""
    if data.category:
        return data.category
    root = data.root or data.good_dir
    return Path(root).name if root else "data"


class _Tagged(Dataset):
    """Adds the category name to every item (multi-class runs report per category)."""

    def __init__(self, ds: Dataset, category: str) -> None:
        self.ds, self.category = ds, category

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "category": self.category}


def category_configs(data: DataConfig) -> list[DataConfig]:
    """One DataConfig per category: data.categories entries are names under data.root or folder paths."""
    import dataclasses

    if not data.categories:
        return [data]
    out = []
    for entry in data.categories:
        p = Path(entry)
        root = p if (p.is_absolute() or len(p.parts) > 1) else Path(data.root) / entry
        out.append(dataclasses.replace(data, root=str(root), category=p.name, categories=[]))
    return out


def check_splits(data: DataConfig, splits: list[str]) -> None:
    """Build each split of every category (a missing folder or mask, or an empty split, raises here) and
    check every image and mask file, so that bad files surface before training rather than after it."""
    from kdad.data.check import check_sample_files

    for c in category_configs(data):
        for split in splits:
            check_sample_files(build_dataset(c, split), f"{category_name(c)} {split}")


def dataset_parts(data: DataConfig, split: str) -> list[tuple[str, Dataset]]:
    """[(category, dataset with items tagged by category)] for one- or multi-category configs."""
    from kdad.tiling import tiled_dataset

    return [(category_name(c), _Tagged(tiled_dataset(build_dataset(c, split), c), category_name(c)))
            for c in category_configs(data)]
