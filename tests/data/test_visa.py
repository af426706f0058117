"""VisADataset on a generated copy of the released layout (Data/Images, Data/Masks, split_csv/1cls.csv)."""

from pathlib import Path

import pytest
import torch

from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.data.transforms import load_image
from kdad.data.visa import VisADataset, load_image_and_mask_draft
from kdad.errors import DatasetError
from tests.fakes import make_visa


@pytest.fixture
def visa(tmp_path: Path) -> Path:
    return make_visa(tmp_path / "VisA")


def test_train_split_from_csv(visa: Path) -> None:
    ds = VisADataset(visa, "train", image_size=16, category="candle")
    assert [Path(ds[i]["path"]).relative_to(visa).as_posix() for i in range(len(ds))] == [
        "candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
        "candle/Data/Images/Normal/0002.JPG"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == 0 and item["defect_type"] == "good" and item["has_mask"] is True
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert item["mask"].shape == (1, 16, 16) and item["mask"].sum() == 0


def test_test_split_labels_and_masks_image_by_image(visa: Path) -> None:
    ds = VisADataset(visa, "test", image_size=(32, 48), category="candle")
    expected = [("Normal/0003.JPG", 0, "good"), ("Anomaly/000.JPG", 1, "anomaly"), ("Anomaly/001.JPG", 1, "anomaly")]
    assert len(ds) == len(expected)
    for i, (name, label, defect) in enumerate(expected):
        item = ds[i]
        assert item["path"].endswith(name) and item["label"] == label and item["defect_type"] == defect
        assert item["mask"].shape == (1, 32, 48)
        assert (item["mask"].sum() > 0) == bool(label)  # mask value 1 counts as defect like 255
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert ds.labels == [0, 1, 1]


def test_category_folder_as_root_and_factory(visa: Path) -> None:
    ds = VisADataset(visa / "pcb1", "test", image_size=16)
    assert ds.category == "pcb1" and ds.labels == [0, 1, 1] and "pcb1" in ds[0]["path"]
    built = build_dataset(DataConfig(root=str(visa), format="visa", category="pcb1", image_size=16), "train")
    assert len(built) == 3 and all("pcb1/Data/Images/Normal" in built[i]["path"] for i in range(3))  # type: ignore[arg-type]


def test_defect_names_from_image_anno(visa: Path) -> None:
    (visa / "candle" / "image_anno.csv").write_text(
        "image,label,mask\ncandle/Data/Images/Anomaly/000.JPG,\"wax melded out,extra wax\",x.png\n")
    ds = VisADataset(visa, "test", image_size=16, category="candle")
    assert ds.defect_types == ["good", "wax melded out,extra wax", "anomaly"]


def test_draft_decoding_matches_full_decode(visa: Path) -> None:
    path = visa / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG"
    fast, _ = load_image_and_mask_draft(path, None, 24)
    full = load_image(path, 24)
    assert fast.shape == full.shape == (3, 24, 24)
    assert float((fast - full).abs().mean()) < 0.03


def test_errors_name_the_file(visa: Path) -> None:
    (visa / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(DatasetError, match="001.png"):
        VisADataset(visa, "test", category="candle")
    assert len(VisADataset(visa, "test", category="candle", allow_missing_masks=True)) == 3
    with pytest.raises(DatasetError, match="categories there"):
        VisADataset(visa, "train", category="capsules")
    text = (visa / "split_csv" / "1cls.csv").read_text().replace("anomaly", "defect", 1)
    (visa / "split_csv" / "1cls.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"1cls.csv line \d+: label 'defect'"):
        VisADataset(visa, "test", category="candle")
