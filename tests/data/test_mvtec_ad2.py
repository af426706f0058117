"""MVTec AD 2: train / validation / test (= test_public), private test sets kept out of the splits."""

from pathlib import Path

import pytest

from kdad.config import load_config
from kdad.data.factory import build_dataset
from kdad.data.mvtec_ad2 import MVTecAD2Dataset
from kdad.errors import DatasetError
from kdad.train import train_val_datasets
from tests.fakes import make_mvtec_ad2


@pytest.fixture
def ad2(tmp_path: Path) -> Path:
    return make_mvtec_ad2(tmp_path / "mvtec_ad_2")


def test_splits_image_by_image(ad2: Path) -> None:
    train = MVTecAD2Dataset(ad2, "train", image_size=16, category="can")
    assert [Path(train[i]["path"]).relative_to(ad2).as_posix() for i in range(3)] == [
        f"can/train/good/{i:03d}_regular.png" for i in range(3)]
    assert train.labels == [0, 0, 0]
    val = MVTecAD2Dataset(ad2 / "can", "validation", image_size=16)
    assert [Path(val[i]["path"]).parent.parent.name for i in range(2)] == ["validation"] * 2 and val.labels == [0, 0]
    test = MVTecAD2Dataset(ad2, "test", image_size=16, category="can")
    expected = [("good/000_regular.png", 0, "good"), ("bad/000_regular.png", 1, "bad"),
                ("bad/001_regular.png", 1, "bad")]
    assert len(test) == 3
    for i, (name, label, defect) in enumerate(expected):
        item = test[i]
        assert item["path"].endswith(f"test_public/{name}") and item["label"] == label
        assert item["defect_type"] == defect and (item["mask"].sum() > 0) == bool(label)


def test_private_sets_are_not_splits(ad2: Path) -> None:
    for split in ["test_private", "test_private_mixed"]:
        with pytest.raises(DatasetError, match="kdad predict"):
            MVTecAD2Dataset(ad2, split, category="can")
    with pytest.raises(DatasetError, match="'train', 'validation', 'test'"):
        MVTecAD2Dataset(ad2, "test_public", category="can")
    (ad2 / "can" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png").unlink()
    with pytest.raises(DatasetError, match="001_regular_mask.png"):
        MVTecAD2Dataset(ad2, "test", category="can")


def test_val_split_replaces_random_hold_out(ad2: Path) -> None:
    cfg = load_config("rd_cpu", overrides=[f"data.root={ad2}", "data.format=mvtec_ad2", "data.category=can",
                                           "data.val_split=validation", "train.val_fraction=0.5"])
    train_ds, val_ds, _ = train_val_datasets(cfg)
    assert len(train_ds) == 3  # type: ignore[arg-type]
    assert val_ds is not None and len(val_ds) == 2  # type: ignore[arg-type]
    assert all("/validation/good/" in val_ds[i]["path"] for i in range(2))
    assert len(build_dataset(cfg.data, "test")) == 3  # type: ignore[arg-type]
