"""MVTecDataset on tiny generated layouts, plus the shared MVTec AD bottle and Magnetic Tile data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdad.data import MVTecDataset
from kdad.data.transforms import load_mask
from kdad.errors import DatasetError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # <repo>/../shared/data


def _img(path: Path, size: tuple[int, int] = (10, 12), value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _mask(path: Path, size: tuple[int, int] = (10, 12), box: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    if box:
        arr[2:8, 2:8] = 255
    Image.fromarray(arr).save(path)


@pytest.fixture
def category(tmp_path: Path) -> Path:
    root = tmp_path / "widget"
    for name in ["000.png", "001.PNG", "002.jpg", ".003.png"]:
        _img(root / "train" / "good" / name)
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _img(root / "test" / "good" / "000.png")
    for stem in ["000", "001"]:
        _img(root / "test" / "scratch" / f"{stem}.png", value=30)
        _mask(root / "ground_truth" / "scratch" / f"{stem}_mask.png")
    _img(root / "test" / "dent" / "000.bmp")
    _mask(root / "ground_truth" / "dent" / "000_mask.png", box=False)  # empty mask, still label 1
    return root


def test_train_split(category: Path) -> None:
    ds = MVTecDataset(category, "train", image_size=8)
    assert [Path(ds[i]["path"]).name for i in range(len(ds))] == ["000.png", "001.PNG", "002.jpg"]
    item = ds[0]
    assert set(item) == {"image", "mask", "label", "path", "defect_type", "has_mask"}
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 8, 8) and item["mask"].sum() == 0
    assert item["label"] == 0 and item["defect_type"] == "good" and item["has_mask"] is True
    assert isinstance(item["path"], str)


def test_test_split_labels_from_folders(category: Path) -> None:
    ds = MVTecDataset(category, "test", image_size=(12, 10))
    assert ds.defect_types == ["dent", "good", "scratch", "scratch"]
    assert ds.labels == [1, 0, 1, 1]
    dent, good, scratch = ds[0], ds[1], ds[2]
    assert dent["mask"].sum() == 0 and dent["label"] == 1 and dent["has_mask"]
    assert good["mask"].sum() == 0
    assert scratch["mask"].shape == (1, 12, 10) and scratch["mask"].sum() == 36


def test_dataloader_collates(category: Path) -> None:
    batch = next(iter(DataLoader(MVTecDataset(category, "test", image_size=8), batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].tolist() == [1, 0, 1, 1]
    assert batch["defect_type"] == ["dent", "good", "scratch", "scratch"]


def test_category_argument_and_listing(category: Path) -> None:
    ds = MVTecDataset(category.parent, "train", category="widget", image_size=8)
    assert len(ds) == 3 and ds.category == "widget"
    (category.parent / "not_a_category").mkdir()
    assert MVTecDataset.categories(category.parent) == ["widget"]
    with pytest.raises(DatasetError, match="'gadget'.*widget"):
        MVTecDataset(category.parent, category="gadget")


def test_missing_mask_names_expected_path(category: Path) -> None:
    (category / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"ground_truth/scratch/001_mask\.png"):
        MVTecDataset(category, "test")
    ds = MVTecDataset(category, "test", image_size=8, allow_missing_masks=True)
    item = ds[3]
    assert item["label"] == 1 and item["has_mask"] is False and item["mask"].sum() == 0
    assert ds[2]["has_mask"] is True


def test_mask_without_suffix_is_accepted(category: Path) -> None:
    gt = category / "ground_truth" / "scratch"
    (gt / "001_mask.png").rename(gt / "001.png")
    assert MVTecDataset(category, "test", image_size=8)[3]["mask"].sum() > 0


def test_empty_and_missing_folders(tmp_path: Path, category: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*nowhere"):
        MVTecDataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    (empty / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train split is empty.*empty/train/good"):
        MVTecDataset(empty, "train")
    with pytest.raises(DatasetError, match=r"test split is empty.*empty/test"):
        MVTecDataset(empty, "test")
    with pytest.raises(DatasetError, match="train folder not found"):
        MVTecDataset(empty / "train", "train")
    with pytest.raises(DatasetError, match="split"):
        MVTecDataset(category, "val")  # type: ignore[arg-type]


def test_corrupt_and_missized_files_are_named(category: Path) -> None:
    (category / "train" / "good" / "001.PNG").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="001.PNG"):
        MVTecDataset(category, "train", image_size=8)[1]
    _mask(category / "ground_truth" / "scratch" / "000_mask.png", size=(16, 16))
    with pytest.raises(DatasetError, match=r"000_mask\.png.*scratch/000\.png"):
        MVTecDataset(category, "test", image_size=8)[2]


needs_bottle = pytest.mark.skipif(not (SHARED_DATA / "mvtec_ad" / "bottle").is_dir(),
                                  reason="shared/data/mvtec_ad/bottle not present")
needs_mtd = pytest.mark.skipif(not (SHARED_DATA / "mtd" / "magnetic_tile").is_dir(),
                               reason="shared/data/mtd/magnetic_tile not present")


@needs_bottle
def test_shared_data_mvtec_bottle() -> None:
    root = SHARED_DATA / "mvtec_ad"
    assert MVTecDataset.categories(root) == ["bottle"]
    train = MVTecDataset(root, "train", category="bottle")
    test = MVTecDataset(root, "test", category="bottle")
    assert len(train) == 209
    counts = {t: test.defect_types.count(t) for t in set(test.defect_types)}
    assert counts == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    item = train[0]
    assert item["image"].shape == (3, 256, 256) and 0 <= item["image"].min() and item["image"].max() <= 1
    for s in test.samples:
        if s.label:
            assert s.mask_path is not None and load_mask(s.mask_path, 256).sum() > 0, s.image_path
    assert test[0]["defect_type"] == "broken_large" and test[0]["mask"].sum() > 0


@needs_mtd
def test_shared_data_magnetic_tile() -> None:
    root = SHARED_DATA / "mtd" / "magnetic_tile"
    train = MVTecDataset(root, "train")
    test = MVTecDataset(root, "test")
    assert len(train) == 400
    counts = {t: test.defect_types.count(t) for t in set(test.defect_types)}
    assert counts == {"good": 100, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    # gray, non-square sources come out as square RGB
    item = train[0]
    assert item["image"].shape == (3, 256, 256) and torch.equal(item["image"][0], item["image"][1])
    empty = set()
    for s in test.samples:
        if s.label and load_mask(s.mask_path, 256).sum() == 0:  # type: ignore[arg-type]
            empty.add(s.image_path.stem)
    # the only empty masks are the four all-zero Uneven masks of the source (shared/data/README.md)
    assert empty == {"exp3_num_45042", "exp4_num_124690", "exp4_num_352527", "exp4_num_45057"}
    crack = test[test.defect_types.index("crack")]
    assert crack["label"] == 1 and crack["has_mask"] and crack["mask"].sum() > 0
