"""BTAD: the native ok/ko layout (bmp or png, masks matched by stem) and the MVTec-converted one."""

from pathlib import Path

import pytest

from kdad.config import DataConfig
from kdad.data import MVTecDataset
from kdad.data.btad import BTADDataset, btad_dataset
from kdad.data.factory import build_dataset
from kdad.errors import DatasetError
from tests.fakes import BTAD_SIZE as SIZE
from tests.fakes import defect_mask, make_btad, part_image


@pytest.fixture
def btad(tmp_path: Path) -> Path:
    return make_btad(tmp_path / "BTAD")


@pytest.mark.parametrize("product,ext", [("01", "bmp"), ("03", "png")])
def test_native_splits_image_by_image(btad: Path, product: str, ext: str) -> None:
    train = BTADDataset(btad, "train", image_size=16, category=product)
    assert [Path(train[i]["path"]).name for i in range(len(train))] == [f"{i:04d}.{ext}" for i in range(3)]
    assert train.labels == [0, 0, 0] and train.defect_types == ["good"] * 3
    test = BTADDataset(btad / product, "test", image_size=16)
    expected = [("ok", "0000", 0, "good"), ("ko", "0000", 1, "ko"), ("ko", "0001", 1, "ko")]
    for i, (folder, stem, label, defect) in enumerate(expected):
        item = test[i]
        assert Path(item["path"]).parent.name == folder and Path(item["path"]).stem == stem
        assert item["label"] == label and item["defect_type"] == defect and item["has_mask"] is True
        assert (item["mask"].sum() > 0) == bool(label)


def test_missing_mask_and_bad_split(btad: Path) -> None:
    (btad / "01" / "ground_truth" / "ko" / "0001.png").unlink()
    with pytest.raises(DatasetError, match="0001"):
        BTADDataset(btad, "test", category="01")
    assert BTADDataset(btad, "test", category="01", allow_missing_masks=True)[2]["has_mask"] is False
    with pytest.raises(DatasetError, match="'train' or 'test'"):
        BTADDataset(btad, "validation", category="01")
    with pytest.raises(DatasetError, match="products there"):
        BTADDataset(btad, "train", category="02")


def test_factory_reads_native_and_converted(btad: Path, tmp_path: Path) -> None:
    native = build_dataset(DataConfig(root=str(btad), format="btad", category="01", image_size=16), "test")
    assert isinstance(native, BTADDataset) and native.labels == [0, 1, 1]
    conv = tmp_path / "btad_mvtec" / "02"  # the MVTec-converted form: train/good, test/<type>, ground_truth
    part_image(conv / "train" / "good" / "000.png", seed=1, size=SIZE)
    part_image(conv / "test" / "good" / "000.png", seed=2, size=SIZE)
    part_image(conv / "test" / "ko" / "000.png", seed=3, defect=True, size=SIZE)
    defect_mask(conv / "ground_truth" / "ko" / "000_mask.png", size=SIZE)
    ds = btad_dataset(conv, "test", image_size=16)
    assert isinstance(ds, MVTecDataset) and ds.labels == [0, 1]
