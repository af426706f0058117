"""Real-IAD: per-view items from the released JSON split files, and the per-view / per-sample protocol."""

from pathlib import Path

import numpy as np
import pytest

from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.data.realiad import (
    RealIADDataset,
    find_image_dir,
    protocol_from_scores_csv,
    realiad_protocol,
    sample_key,
    sample_level,
)
from kdad.errors import DatasetError
from kdad.metrics import MetricWarning
from tests.fakes import REALIAD_STAMP as STAMP
from tests.fakes import REALIAD_VIEWS as VIEWS
from tests.fakes import make_realiad


@pytest.fixture
def realiad(tmp_path: Path) -> Path:
    return make_realiad(tmp_path / "Real-IAD")


def test_train_split_per_view(realiad: Path) -> None:
    ds = RealIADDataset(realiad, "train", image_size=16, category="audiojack")
    assert len(ds) == 10 and ds.labels == [0] * 10 and ds.defect_types == ["good"] * 10
    assert ds.views == VIEWS * 2
    assert ds.sample_ids == ["audiojack_0001_OK"] * 5 + ["audiojack_0003_OK"] * 5
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].sum() == 0 and item["has_mask"] is True
    assert item["path"].endswith(f"realiad_256/audiojack/OK/S0001/audiojack_0001_OK_C1_{STAMP}.jpg")


def test_test_split_labels_image_by_image(realiad: Path) -> None:
    ds = RealIADDataset(realiad, "test", image_size=16, category="audiojack")
    assert len(ds) == 10
    for i in range(10):
        item = ds[i]
        view = VIEWS[i % 5]
        anomalous = i >= 5 and view in ("C1", "C3")
        assert item["label"] == int(anomalous), item["path"]
        assert item["defect_type"] == ("QS" if anomalous else "good")
        assert (item["mask"].sum() > 0) == anomalous
        assert sample_key(item["path"]) == (("audiojack_0002_NG_QS" if i >= 5 else "audiojack_0004_OK"), view)


def test_view_filter_and_factory(realiad: Path) -> None:
    ds = RealIADDataset(realiad, "test", image_size=16, category="audiojack", views="C1,c3")
    assert ds.views == ["C1", "C3", "C1", "C3"] and ds.labels == [0, 0, 1, 1]
    cfg = DataConfig(root=str(realiad), format="realiad", category="audiojack", view="C2", image_size=16)
    built = build_dataset(cfg, "test")
    assert isinstance(built, RealIADDataset) and built.views == ["C2", "C2"] and built.labels == [0, 0]
    with pytest.raises(DatasetError, match="valid views"):
        RealIADDataset(realiad, "test", category="audiojack", views="C6")


def test_resolution_folder_and_split_file(realiad: Path) -> None:
    (realiad / "realiad_1024" / "audiojack").mkdir(parents=True)
    assert find_image_dir(realiad, "audiojack", 256).parent.name == "realiad_256"
    assert find_image_dir(realiad, "audiojack", 512).parent.name == "realiad_1024"
    assert find_image_dir(realiad / "realiad_256", "audiojack", 512).parent.name == "realiad_256"
    ds = RealIADDataset(realiad / "realiad_256", "train", image_size=16, category="audiojack",
                        split_file="realiad_jsons/realiad_jsons/audiojack.json")
    assert len(ds) == 10
    with pytest.raises(DatasetError, match="split file not found"):
        RealIADDataset(realiad, "train", category="audiojack", split_file="realiad_jsons/realiad_jsons_sv")


def test_missing_mask_names_file(realiad: Path) -> None:
    next((realiad / "realiad_256" / "audiojack" / "NG").rglob("*_C3_*.png")).unlink()
    with pytest.raises(DatasetError, match="audiojack_0002_NG_QS_C3"):
        RealIADDataset(realiad, "test", category="audiojack")


def test_protocol_per_view_and_per_sample(realiad: Path, tmp_path: Path) -> None:
    ds = RealIADDataset(realiad, "test", image_size=16, category="audiojack")
    paths = [s.image_path for s in ds.samples]
    # sample 0004 (OK) scores 0.3 on every view; sample 0002 (NG) scores 0.1 except 0.9 on C3
    scores = [0.3] * 5 + [0.1, 0.1, 0.9, 0.1, 0.1]
    ids, labels, sample_scores = sample_level(paths, ds.labels, scores)
    assert ids == ["audiojack_0002_NG_QS", "audiojack_0004_OK"]
    assert labels.tolist() == [1, 0] and sample_scores.tolist() == [0.9, 0.3]
    with pytest.warns(MetricWarning):  # C2, C4, C5 have no anomalous view
        res = realiad_protocol(paths, ds.labels, scores)
    assert res["per_sample"]["image_auroc"] == 1.0 and res["per_sample"]["n"] == 2
    assert res["per_view"]["C3"]["image_auroc"] == 1.0 and res["per_view"]["C1"]["image_auroc"] == 0.0
    assert np.isnan(res["per_view"]["C2"]["image_auroc"])  # no anomalous C2 view: undefined
    assert res["all_views"]["n"] == 10 and res["all_views"]["n_anomalous"] == 2
    csv_path = tmp_path / "scores.csv"
    csv_path.write_text("path,defect_type,label,score,decision\n" + "".join(
        f"{p},x,{lab},{s},0\n" for p, lab, s in zip(paths, ds.labels, scores)))
    with pytest.warns(MetricWarning):
        assert protocol_from_scores_csv(csv_path)["per_sample"] == res["per_sample"]
