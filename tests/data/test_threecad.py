"""3CAD loader on a generated fixture in the release layout (English category folders, masks without suffix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdad.config import DataConfig
from kdad.data.factory import build_dataset, dataset_parts
from kdad.data.threecad import THREECAD_CATEGORIES, ThreeCADDataset, category_folder
from kdad.errors import DatasetError
from tests.fakes import make_threecad

SIZE = 32


@pytest.fixture(scope="module")
def threecad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_threecad(tmp_path_factory.mktemp("threecad") / "3CAD")


def test_train_split_reads_png_only(threecad: Path) -> None:
    ds = ThreeCADDataset(threecad, "train", SIZE, "Aluminum_Camera_Cover")
    assert [Path(ds[i]["path"]).name for i in range(len(ds))] == ["0000.png", "0001.png", "0002.png"]
    for i in range(len(ds)):  # 288-1024 px, non-square -> SIZE x SIZE without keeping the aspect ratio
        assert ds[i]["image"].shape == (3, SIZE, SIZE)
    assert ds.category == "Aluminum_Camera_Cover"


def test_test_split_masks_without_suffix(threecad: Path) -> None:
    ds = ThreeCADDataset(threecad, "test", SIZE, "ACC")
    assert ds.defect_types == ["bump", "bump", "good", "scratch"]
    assert ds.labels == [1, 1, 0, 1]
    items = {Path(ds[i]["path"]).parent.name + "/" + Path(ds[i]["path"]).name: ds[i] for i in range(len(ds))}
    two_regions = items["scratch/0000.png"]["mask"][0]
    assert two_regions[1:8, 1:8].all() and two_regions[20:30, 17:28].all()  # both boxes survive
    assert two_regions[12:18, :].sum() == 0  # and stay apart
    assert items["bump/0001.png"]["mask"].sum() > 0  # 3-channel mask read as one channel
    tiny = items["bump/0002.png"]
    assert tiny["mask"].sum() == 0 and tiny["label"] == 1  # vanished mask, still defective
    assert items["good/0000.png"]["mask"].sum() == 0


def test_category_names_and_roots(threecad: Path) -> None:
    assert category_folder("cs") == "Copper_Stator"
    assert category_folder("Aluminum_Middle-Frame") == "Aluminum_Middle_Frame"  # the official script's spelling
    assert len(THREECAD_CATEGORIES) == 8
    by_folder = ThreeCADDataset(threecad / "Copper_Stator", "test", SIZE)  # root = the category folder
    by_abbr = ThreeCADDataset(threecad, "test", SIZE, "CS")
    assert [s.image_path for s in by_folder.samples] == [s.image_path for s in by_abbr.samples]
    assert ThreeCADDataset.categories(threecad) == ["Aluminum_Camera_Cover", "Copper_Stator"]
    with pytest.raises(DatasetError, match="ACC"):
        ThreeCADDataset(threecad, "train", SIZE, "bottle")
    with pytest.raises(DatasetError, match="Aluminum_Pc"):
        ThreeCADDataset(threecad, "train", SIZE, "AP")  # valid name, folder absent


def test_missing_mask_names_the_expected_file(tmp_path: Path) -> None:
    root = make_threecad(tmp_path / "3CAD")
    (root / "Copper_Stator" / "ground_truth" / "iron_core_airflow" / "0000.png").unlink()
    with pytest.raises(DatasetError, match=r"iron_core_airflow[/\\]0000\.png"):
        ThreeCADDataset(root, "test", SIZE, "CS")
    ds = ThreeCADDataset(root, "test", SIZE, "CS", allow_missing_masks=True)
    assert [s.has_mask for s in ds.samples] == [True, False]


def test_factory_format_3cad(threecad: Path) -> None:
    ds = build_dataset(DataConfig(root=str(threecad), format="3cad", category="ACC", image_size=SIZE), "test")
    assert isinstance(ds, ThreeCADDataset) and len(ds) == 4
    parts = dataset_parts(DataConfig(root=str(threecad), format="3cad", image_size=SIZE,
                                     categories=["Aluminum_Camera_Cover", "CS"]), "train")
    assert [(name, len(d)) for name, d in parts] == [("Aluminum_Camera_Cover", 3), ("CS", 2)]
