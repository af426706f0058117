"""Build datasets from a DataConfig (MVTec layout or plain folders)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from kdad.config import DataConfig
from kdad.errors import ConfigError


def build_dataset(data: DataConfig, split: str) -> Dataset:
    """Train or test dataset of items {image (3,H,W) in [0,1], mask, label, path, defect_type}."""
    if data.format == "mvtec":
        if not data.root:
            raise ConfigError("data.root is empty: give the dataset folder (e.g. --data path/to/bottle)")
        from kdad.data.mvtec import MVTecDataset

        return MVTecDataset(data.root, split=split, image_size=data.image_size)
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
    raise ConfigError(f"data.format: unknown format {data.format!r}; valid: ['mvtec', 'folder']")


def category_name(data: DataConfig) -> str:
    """Name shown in reports: data.category, else the dataset folder's name."""
    if data.category:
        return data.category
    root = data.root or data.good_dir
    return Path(root).name if root else "data"
