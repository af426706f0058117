"""Synthetic demo dataset: layout, determinism, reuse, and defects that are visible and masked."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from kdad.data import DEFECT_TYPES, MVTecDataset, make_demo_dataset
from kdad.data.demo import MARKER, render_demo_image
from kdad.errors import ConfigError, DatasetError

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_bad": 5, "size": 64}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_layout_and_loading(tmp_path: Path, kind: str) -> None:
    root = make_demo_dataset(tmp_path / "demo", kind=kind, **SMALL)  # type: ignore[arg-type]
    assert root == tmp_path / "demo" and (root / MARKER).is_file()
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    train, test = MVTecDataset(root, "train", image_size=64), MVTecDataset(root, "test", image_size=64)
    assert len(train) == 3 and len(test) == 7
    # 5 defects round-robin over 4 types: the first type gets two
    assert sorted(test.defect_types) == sorted(["good"] * 2 + list(DEFECT_TYPES) + [DEFECT_TYPES[0]])
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (3, 64, 64)
        assert (item["mask"].sum() > 0) == (item["label"] == 1), item["path"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind


def test_deterministic_under_seed(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_reuse_and_refusals(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    stamp = (root / "train" / "good" / "000.png").stat().st_mtime_ns
    assert make_demo_dataset(root, **SMALL) == root
    assert (root / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="other|not"):
        make_demo_dataset(root, **{**SMALL, "seed": 1})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(DatasetError, match="foreign"):
        make_demo_dataset(foreign, **SMALL)
    (tmp_path / "empty").mkdir()
    assert (make_demo_dataset(tmp_path / "empty", **SMALL) / MARKER).is_file()
    with pytest.raises(ConfigError, match="texture"):
        make_demo_dataset(tmp_path / "bad", kind="fabric", **SMALL)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["texture", "object"])
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_is_visible_and_inside_its_mask(kind: str, defect: str) -> None:
    # the scene is drawn before the defect from the same stream, so seed k gives the same good image
    for k in range(3):
        good, _ = render_demo_image(np.random.default_rng(k), 128, kind)  # type: ignore[arg-type]
        bad, mask = render_demo_image(np.random.default_rng(k), 128, kind, defect)  # type: ignore[arg-type]
        diff = np.abs(bad.astype(np.float32) - good.astype(np.float32)).mean(axis=2) / 255
        assert 0 < mask.mean() < 0.05, (kind, defect, mask.mean())  # small, not trivial
        assert diff[mask].mean() > 0.08, (kind, defect, diff[mask].mean())
        assert diff[~mask].mean() < 0.01


def test_demo_summary_explains_metrics_outputs_and_limits(tmp_path: Path) -> None:
    from kdad.demo import demo_summary

    out = tmp_path / "kdad_demo"
    metrics = {"image_auroc": 0.98765432101234, "pixel_auroc": 0.95, "au_pro": 0.5}
    text = demo_summary({"metrics": metrics}, out, out / "run", out / "data" / "object")
    assert "0.988" in text and "0.98765" not in text  # 3 digits, not 16
    assert "1.0 = perfect, 0.5 = chance" in text
    assert text.count("low for the demo") == 1  # only AU-PRO 0.5 is flagged
    assert f"everything is in {out}/" in text and str(out / "run" / "report.html") in text
    assert "flags every real photo as anomalous" in text
