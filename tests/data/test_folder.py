"""FolderDataset: plain good/bad/mask folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdad.data import FolderDataset
from kdad.errors import DatasetError


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    good, bad, masks = tmp_path / "good", tmp_path / "scratches", tmp_path / "masks"
    for i in range(3):
        _write(good / f"g{i}.png", np.full((9, 9, 3), 120, np.uint8))
    box = np.zeros((9, 9), np.uint8)
    box[2:6, 2:6] = 255
    for stem in ["b0", "b1", "b2"]:
        _write(bad / f"{stem}.jpg", np.full((9, 9, 3), 60, np.uint8))
    _write(masks / "b0.png", box)  # <stem>.png
    _write(masks / "b1_mask.png", box)  # <stem>_mask.png; b2 has no mask
    return good, bad, masks


def test_train_split_is_good_only(folders: tuple[Path, Path, Path]) -> None:
    good, bad, masks = folders
    ds = FolderDataset(good, bad, masks, image_size=8, split="train")  # bad/mask dirs unused for train
    assert len(ds) == 3 and ds.labels == [0, 0, 0]
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["mask"].sum() == 0 and item["defect_type"] == "good"


def test_test_split_labels_and_masks(folders: tuple[Path, Path, Path]) -> None:
    good, bad, masks = folders
    ds = FolderDataset(good, bad, masks, image_size=9, split="test")
    assert ds.labels == [0, 0, 0, 1, 1, 1]
    assert ds.defect_types == ["good"] * 3 + ["scratches"] * 3
    b0, b1, b2 = ds[3], ds[4], ds[5]
    assert b0["has_mask"] and b0["mask"].sum() == 16
    assert b1["has_mask"] and b1["mask"].sum() == 16
    assert not b2["has_mask"] and b2["mask"].sum() == 0 and b2["label"] == 1


def test_bad_without_mask_dir(folders: tuple[Path, Path, Path]) -> None:
    good, bad, _ = folders
    ds = FolderDataset(good, bad, split="test", image_size=8)
    assert [ds[i]["has_mask"] for i in range(len(ds))] == [True] * 3 + [False] * 3


def test_errors_name_the_folder(tmp_path: Path, folders: tuple[Path, Path, Path]) -> None:
    good, bad, _ = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty.*empty"):
        FolderDataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found.*absent"):
        FolderDataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="not found.*no_masks"):
        FolderDataset(good, bad, tmp_path / "no_masks", split="test")
    with pytest.raises(DatasetError, match="defective images folder is empty"):
        FolderDataset(good, tmp_path / "empty", split="test")


def test_corrupt_image_is_named(folders: tuple[Path, Path, Path]) -> None:
    good, _, _ = folders
    (good / "g1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="g1.png"):
        FolderDataset(good, image_size=8)[1]


def test_split_inferred_and_good_dir_optional_for_test(folders: tuple[Path, Path, Path]) -> None:
    good, bad, masks = folders
    assert FolderDataset(good).split == "train"
    inferred = FolderDataset(good, bad, masks, image_size=8)
    assert inferred.split == "test" and inferred.labels == [0, 0, 0, 1, 1, 1]
    assert FolderDataset(None, bad, masks, image_size=8).labels == [1, 1, 1]
    with pytest.raises(DatasetError, match="good_dir"):
        FolderDataset(None, bad, split="train")
