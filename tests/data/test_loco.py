"""MVTec LOCO AD layout: loader contract, channels for AU-sPRO, factory branch, LOCO metrics on a toy category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.data.loco import LocoDataset, write_toy_loco
from kdad.errors import DatasetError
from kdad.evaluate import Predictions, loco_metrics

SIZE = 64


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_loco(tmp_path_factory.mktemp("loco") / "discs", size=SIZE, n_train=5, n_validation=3,
                          n_test=(4, 3, 2), seed=0)


def test_layout_written(toy: Path) -> None:
    assert json.loads((toy / "defects_config.json").read_text())[0]["defect_name"] == "missing_disc"
    assert len(list((toy / "test" / "logical_anomalies").glob("*.png"))) == 3
    gt_dir = toy / "ground_truth" / "logical_anomalies" / "002"
    assert sorted(p.name for p in gt_dir.iterdir()) == ["000.png", "001.png"]


def test_splits_and_item_contract(toy: Path) -> None:
    assert len(LocoDataset(toy, "train", SIZE)) == 5
    assert len(LocoDataset(toy, "validation", SIZE)) == 3
    test = LocoDataset(toy, "test", 32)
    assert len(test) == 9 and test.labels == [0] * 4 + [1] * 5
    assert test.loco_kinds == ["good"] * 4 + ["structural_anomalies"] * 2 + ["logical_anomalies"] * 3
    item = test[len(test) - 1]
    assert set(item) == {"image", "mask", "label", "path", "defect_type", "has_mask"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert float(test[0]["mask"].sum()) == 0.0 and test[0]["defect_type"] == "good"
    batch = next(iter(DataLoader(test, batch_size=9)))  # collatable: no per-item channel lists
    assert batch["image"].shape == (9, 3, 32, 32)


def test_mask_is_union_of_channels(toy: Path) -> None:
    test = LocoDataset(toy, "test", SIZE)
    i = test.defect_types.index("logical_anomalies") + 2  # third logical image = swapped colours: 2 channels
    chans = test.spro_channels(i)
    assert len(chans) == 2 and all(c.relative_saturation for c in chans)
    union = np.logical_or(chans[0].mask, chans[1].mask)
    assert np.array_equal(test[i]["mask"][0].numpy() > 0.5, union)  # native size: no resize, exact union


def test_absolute_saturation_scales_with_evaluation_size(toy: Path) -> None:
    test = LocoDataset(toy, "test", SIZE)
    i = test.defect_types.index("structural_anomalies")
    native = test.spro_channels(i)[0]
    half = test.spro_channels(i, (SIZE // 2, SIZE // 2))[0]
    assert not native.relative_saturation and native.saturation_threshold == 60
    assert half.saturation_threshold == pytest.approx(15.0)  # 60 px at 64^2 -> 15 px at 32^2
    assert half.mask.shape == (32, 32) and half.mask.any()


def test_factory_branch_and_validation_split(toy: Path) -> None:
    data = DataConfig(root=str(toy), format="loco", image_size=SIZE)
    assert isinstance(build_dataset(data, "test"), LocoDataset)
    assert len(build_dataset(data, "validation")) == 3


def test_errors_name_the_culprit(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="split"):
        LocoDataset(toy, "val")  # type: ignore[arg-type]
    broken = write_toy_loco(tmp_path / "b", size=16, n_train=1, n_validation=1, n_test=(1, 1, 1))
    for p in (broken / "ground_truth" / "logical_anomalies" / "000").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="ground-truth channels"):
        LocoDataset(broken, "test", 16)
    kept = LocoDataset(broken, "test", 16, allow_missing_masks=True)
    assert kept[kept.defect_types.index("logical_anomalies")]["has_mask"] is False
    (broken / "defects_config.json").unlink()
    with pytest.raises(DatasetError, match="defects_config.json"):
        LocoDataset(broken, "test", 16)


def test_channel_with_unknown_pixel_value(toy: Path, tmp_path: Path) -> None:
    root = write_toy_loco(tmp_path / "u", size=16, n_train=1, n_validation=1, n_test=(1, 0, 1))
    png = root / "ground_truth" / "structural_anomalies" / "000" / "000.png"
    arr = np.asarray(Image.open(png)).copy()
    arr[arr > 0] = 7
    Image.fromarray(arr).save(png)
    with pytest.raises(DatasetError, match="pixel value 7"):
        LocoDataset(root, "test", 16).spro_channels(1)


def _preds(ds: LocoDataset, maps: np.ndarray) -> Predictions:
    scores = maps.reshape(len(maps), -1).max(1)
    return Predictions(scores=scores, labels=np.asarray(ds.labels), paths=[], defect_types=ds.defect_types,
                       map_means=maps.mean((1, 2)), maps=maps)


def test_loco_metrics_perfect_and_constant_maps(toy: Path) -> None:
    ds = LocoDataset(toy, "test", SIZE)
    masks = np.stack([ds[i]["mask"][0].numpy() for i in range(len(ds))]).astype(np.float32)
    perfect = loco_metrics(_preds(ds, masks), ds)
    for subset in ("structural", "logical", "mean"):
        for limit in ("0.01", "0.05", "0.1", "0.3", "1"):
            assert perfect[f"au_spro_{subset}@{limit}"] == pytest.approx(1.0)
    assert perfect["image_auroc_logical"] == perfect["image_auroc_structural"] == perfect["image_auroc_mean"] == 1.0
    flat = loco_metrics(_preds(ds, np.zeros_like(masks)), ds)
    # one tie block: the curve is the diagonal, so AU-sPRO@L = L / 2
    assert flat["image_auroc_mean"] == 0.5 and flat["au_spro_mean@0.05"] == pytest.approx(0.025)
