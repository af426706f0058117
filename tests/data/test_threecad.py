"""3CAD loader on a generated fixture in the release layout (English category folders, masks without suffix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdad.config import DataConfig
from kdad.data.factory import build_dataset, dataset_parts
from kdad.data.threecad import THREECAD_CATEGORIES, ThreeCADDataset, category_folder
from kdad.errors import DatasetError

SIZE = 32


def _img(path: Path, wh: tuple[int, int], value: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((wh[1], wh[0], 3), value, np.uint8)).save(path)


def _mask(path: Path, wh: tuple[int, int], boxes: list[tuple[int, int, int, int]], rgb: bool = False) -> None:
    """Mask with one filled box per (x0, y0, x1, y1); rgb=True stores it with 3 channels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((wh[1], wh[0]), np.uint8)
    for x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = 255
    Image.fromarray(np.repeat(arr[..., None], 3, axis=2) if rgb else arr).save(path)


def make_threecad(root: Path) -> Path:
    """Two categories in the 3CAD release layout, at real 3CAD sizes (288-1024 px, non-square)."""
    acc = root / "Aluminum_Camera_Cover"  # sizes vary per image in this category
    for i, wh in enumerate([(288, 320), (400, 288), (1024, 960)]):
        _img(acc / "train" / "good" / f"{i:04d}.png", wh)
    _img(acc / "train" / "good" / "0099.jpg", (288, 288))  # not PNG: ignored, as the official loader
    (acc / "train" / "good" / "Thumbs.db").write_bytes(b"\0")
    _img(acc / "test" / "good" / "0000.png", (300, 288))
    # several regions (up to 23 in 3CAD) in one image, and a 3-channel mask
    _img(acc / "test" / "scratch" / "0000.png", (288, 320), 60)
    _mask(acc / "ground_truth" / "scratch" / "0000.png", (288, 320), [(10, 10, 80, 80), (150, 200, 260, 300)])
    _img(acc / "test" / "bump" / "0001.png", (320, 288), 60)
    _mask(acc / "ground_truth" / "bump" / "0001.png", (320, 288), [(100, 100, 200, 200)], rgb=True)
    # a tiny defect: vanishes at 32 px, but the image stays defective (label from the folder)
    _img(acc / "test" / "bump" / "0002.png", (320, 288), 60)
    _mask(acc / "ground_truth" / "bump" / "0002.png", (320, 288), [(5, 5, 7, 7)])
    cs = root / "Copper_Stator"  # CS and IS are 1024 x 1024
    _img(cs / "train" / "good" / "0000.png", (1024, 1024))
    _img(cs / "train" / "good" / "0001.png", (1024, 1024))
    _img(cs / "test" / "good" / "0000.png", (1024, 1024))
    _img(cs / "test" / "iron_core_airflow" / "0000.png", (1024, 1024), 30)
    _mask(cs / "ground_truth" / "iron_core_airflow" / "0000.png", (1024, 1024), [(0, 0, 512, 512)])
    return root


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
