"""Multi-class (unified) mode: one model over several categories, balanced sampling, per-category metrics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kdad.cli import main
from kdad.config import load_config
from kdad.data.demo import make_demo_dataset
from kdad.evaluate import evaluate_run
from kdad.train import fit, train_val_datasets

# layers 1-3: rd_cpu's layers 2-4 leave a 1x1 bottleneck at 64 px, where BatchNorm refuses a last batch of one
TINY = ["model.backbone=resnet18", "model.weights=random", "data.image_size=64", "train.batch_size=4",
        "train.progress=false", "train.epochs=1", "model.layers=[1,2,3]"]


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mc")
    make_demo_dataset(root / "washer", n_train=16, n_test_good=3, n_test_bad=4, size=64, kind="object")
    make_demo_dataset(root / "fabric", n_train=4, n_test_good=3, n_test_bad=4, size=64, kind="texture", seed=1)
    return root


def test_balanced_sampling_across_unequal_categories(two_categories: Path) -> None:
    cfg = load_config("rd_cpu", [], [f"data.root={two_categories}", "data.categories=[washer, fabric]",
                                      "train.val_fraction=0.25", *TINY])
    train_ds, val_ds, weights = train_val_datasets(cfg)
    assert len(train_ds) == 12 + 3 and val_ds is not None and len(val_ds) == 4 + 1
    assert weights is not None
    import torch

    sampler = torch.utils.data.WeightedRandomSampler(weights, 3000, generator=torch.Generator().manual_seed(0))
    cats = Counter(train_ds[i]["category"] for i in sampler)
    assert abs(cats["washer"] - cats["fabric"]) < 300  # about 1500 each despite 12 vs 3 images


def test_one_model_evaluated_per_category(two_categories: Path, tmp_path: Path) -> None:
    cfg = load_config("rd_cpu", [], [f"data.root={two_categories}", "data.categories=[washer, fabric]", *TINY])
    run = fit(cfg, tmp_path / "run")
    res = evaluate_run(run, report=True)
    assert set(res["per_category"]) == {"washer", "fabric"}
    for r in res["per_category"].values():
        assert r["n_images"] == 7
    mean = (res["per_category"]["washer"]["metrics"]["image_auroc"]
            + res["per_category"]["fabric"]["metrics"]["image_auroc"]) / 2
    assert res["metrics"]["image_auroc"] == pytest.approx(mean)
    assert (run / "report_washer.html").is_file() and (run / "report_fabric.html").is_file()
    assert json.loads((run / "metrics.json").read_text())["multi_class"]


def test_cli_per_category_mode_trains_one_model_each(two_categories: Path, tmp_path: Path) -> None:
    args = ["fit", "--preset", "rd_cpu", "--data", str(two_categories), "--categories", "washer,fabric",
            "--per-category", "--out", str(tmp_path / "runs")] + sum((["--set", o] for o in TINY), [])
    assert main(args) == 0
    assert (tmp_path / "runs" / "washer" / "model.ckpt").is_file()
    assert (tmp_path / "runs" / "fabric" / "model.ckpt").is_file()
