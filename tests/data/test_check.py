"""`kdad data check`: layout detection, counts, and each kind of problem seeded into small fixtures."""

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdad.cli import main
from kdad.data.check import check_dataset, detect_format
from tests.fakes import defect_mask, forged_png, make_btad, make_mvtec_ad2, make_realiad, make_visa, part_image

SIZE = (48, 40)


def make_mvtec(root: Path) -> Path:
    """MVTec AD layout, category ``widget``: 3 train, test good 1 + scratch 2 (with masks)."""
    c = root / "widget"
    for i in range(3):
        part_image(c / "train" / "good" / f"{i:03d}.png", seed=i, size=SIZE)
    part_image(c / "test" / "good" / "000.png", seed=10, size=SIZE)
    for i in range(2):
        part_image(c / "test" / "scratch" / f"{i:03d}.png", seed=20 + i, defect=True, size=SIZE)
        defect_mask(c / "ground_truth" / "scratch" / f"{i:03d}_mask.png", size=SIZE)
    return root


def make_loco(root: Path) -> Path:
    """MVTec LOCO layout: one folder of masks per defective image."""
    c = root / "pushpins"
    for split in ["train", "validation", "test"]:
        part_image(c / split / "good" / "000.png", seed=len(split), size=SIZE)
    part_image(c / "test" / "logical_anomalies" / "000.png", seed=5, defect=True, size=SIZE)
    defect_mask(c / "ground_truth" / "logical_anomalies" / "000" / "000.png", size=SIZE)
    return root


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "mvtec": make_mvtec, "loco": make_loco, "visa": make_visa, "btad": make_btad,
    "mvtec_ad2": make_mvtec_ad2, "realiad": make_realiad,
}


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_clean_layouts_pass(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = LAYOUTS[fmt](tmp_path / fmt)
    assert detect_format(root) == fmt
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"format {fmt}" in out and "0 error(s), 0 warning(s)" in out
    report = check_dataset(root, fmt)
    assert report.problems == [] and len(report.entries) > 0


def test_counts_per_split_and_defect_type(tmp_path: Path) -> None:
    counts = check_dataset(make_visa(tmp_path / "visa"), category="candle").counts()
    assert counts == {("candle", "test", "anomaly"): 2, ("candle", "test", "good"): 1, ("candle", "train", "good"): 3}
    counts = check_dataset(make_mvtec_ad2(tmp_path / "ad2")).counts()
    assert counts[("can", "validation", "good")] == 2 and counts[("can", "test_private", "unlabeled")] == 1
    counts = check_dataset(make_realiad(tmp_path / "riad")).counts()
    assert counts == {("audiojack", "test", "QS"): 2, ("audiojack", "test", "good"): 8,
                      ("audiojack", "train", "good"): 10}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(c: Path) -> Path:
    path = c / "test" / "good" / "000.png"
    jpg = path.with_suffix(".jpg")
    Image.open(path).save(jpg, quality=95)
    path.unlink()
    _truncate(jpg)
    return jpg


def _orphan_mask(c: Path) -> Path:
    defect_mask(c / "ground_truth" / "scratch" / "007_mask.png", size=SIZE)
    return c / "ground_truth" / "scratch" / "007_mask.png"


def _missing_mask(c: Path) -> Path:
    (c / "ground_truth" / "scratch" / "001_mask.png").unlink()
    return c / "test" / "scratch" / "001.png"


def _mask_size(c: Path) -> Path:
    defect_mask(c / "ground_truth" / "scratch" / "000_mask.png", size=(SIZE[0] + 2, SIZE[1]))
    return c / "ground_truth" / "scratch" / "000_mask.png"


def _non_binary(c: Path) -> Path:
    arr = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    arr[5:10, 5:10], arr[12:20, 12:20] = 128, 255
    Image.fromarray(arr).save(c / "ground_truth" / "scratch" / "000_mask.png")
    return c / "ground_truth" / "scratch" / "000_mask.png"


def _empty_train(c: Path) -> Path:
    for p in (c / "train" / "good").iterdir():
        p.unlink()
    return c


def _train_test_duplicate(c: Path) -> Path:
    shutil.copy(c / "test" / "scratch" / "000.png", c / "train" / "good" / "009.png")
    return c / "train" / "good" / "009.png"  # reported on the training copy; the message names the test file


def _in_split_duplicate(c: Path) -> Path:
    shutil.copy(c / "train" / "good" / "000.png", c / "train" / "good" / "009.png")
    return c / "train" / "good" / "000.png"


def _too_large(c: Path) -> Path:
    return forged_png(c / "train" / "good" / "001.png", 13000, 13000)


def _narrow_16bit(c: Path) -> Path:
    arr = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0]), dtype=np.uint16)
    Image.fromarray(arr).save(c / "train" / "good" / "001.png")
    return c / "train" / "good" / "001.png"


SEEDS = [  # (seed, kind, level)
    (lambda c: (_truncate(c / "train" / "good" / "001.png"), c / "train" / "good" / "001.png")[1],
     "unreadable", "error"),
    (_truncated_jpeg, "unreadable", "error"),
    (_orphan_mask, "orphan_mask", "error"),
    (_missing_mask, "missing_mask", "error"),
    (_mask_size, "mask_size", "error"),
    (_non_binary, "mask_values", "warning"),
    (_empty_train, "empty_split", "error"),
    (_train_test_duplicate, "duplicate", "error"),
    (_in_split_duplicate, "duplicate", "warning"),
    (_too_large, "too_large", "error"),
    (_narrow_16bit, "narrow_16bit", "warning"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open; we refuse
@pytest.mark.parametrize("seed,kind,level", SEEDS, ids=[f"{k}-{lv}-{i}" for i, (_, k, lv) in enumerate(SEEDS)])
def test_each_problem_is_found(seed: Callable[[Path], Path], kind: str, level: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    culprit = seed(root / "widget")
    report = check_dataset(root)
    assert [(p.level, p.kind) for p in report.problems] == [(level, kind)], report.text()
    assert report.problems[0].path == str(culprit)
    code = main(["data", "check", str(root / "widget"), "--format", "mvtec"])
    assert code == (1 if level == "error" else 0)
    out = capsys.readouterr().out
    assert f"{level.upper()}" in out and str(culprit) in out


def test_split_file_problems(tmp_path: Path) -> None:
    visa = make_visa(tmp_path / "visa")
    (visa / "candle" / "Data" / "Images" / "Normal" / "0001.JPG").unlink()
    part_image(visa / "pcb1" / "Data" / "Images" / "Normal" / "0099.JPG", seed=99)
    kinds = {(p.kind, Path(p.path).name) for p in check_dataset(visa).problems}
    assert kinds == {("missing_file", "0001.JPG"), ("unlisted", "0099.JPG")}
    riad = make_realiad(tmp_path / "riad")
    mask = next((riad / "realiad_256" / "audiojack" / "NG").rglob("*_C1_*.png"))
    mask.unlink()
    problems = check_dataset(riad).problems
    assert [(p.kind, p.path) for p in problems] == [("missing_mask", str(mask.with_suffix(".jpg")))]


def test_pixel_cap_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_mvtec(tmp_path / "mvtec")  # 48x40 images: 0.00192 MP
    assert main(["data", "check", str(root), "--max-megapixels", "0.01"]) == 0
    assert main(["data", "check", str(root), "--max-megapixels", "0.001"]) == 1
    assert "above the 0.001 MP limit" in capsys.readouterr().out


def test_bad_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["data", "check", str(tmp_path / "empty")]) == 2
    assert "--format" in capsys.readouterr().err


def test_zero_byte_file_message_names_no_memory_object(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "d")
    (root / "widget" / "test" / "good" / "000.png").write_bytes(b"")
    text = check_dataset(root).text()
    assert "empty file (0 bytes)" in text and "BytesIO" not in text and "0x" not in text
    (root / "widget" / "test" / "good" / "000.png").write_bytes(b"not an image at all")
    text = check_dataset(root).text()
    assert "not an image PIL can read" in text and "BytesIO" not in text


# ---------------------------------------------------------------------- fit checks every split before training

def _fit_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--preset", "rd_cpu", "--data", str(root / "widget"), "--out", str(out), "--test",
            "--set", "model.weights=random", "--set", "model.backbone=resnet18", *extra]


@pytest.mark.parametrize("fault", ["zero_byte", "mask_size", "missing_mask", "bomb"])
def test_fit_test_reports_bad_test_files_before_training(fault: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_mvtec(tmp_path / "d")
    c = root / "widget"
    expect = {"zero_byte": "empty file (0 bytes)", "mask_size": "mask is 20x20",
              "missing_mask": "data.allow_missing_masks=true", "bomb": "decompression bomb"}[fault]
    culprit = {"zero_byte": c / "test" / "good" / "000.png",
               "mask_size": c / "ground_truth" / "scratch" / "001_mask.png",
               "missing_mask": c / "test" / "scratch" / "001.png", "bomb": c / "test" / "good" / "000.png"}[fault]
    if fault == "zero_byte":
        culprit.write_bytes(b"")
    elif fault == "mask_size":
        Image.new("L", (20, 20)).save(culprit)
    elif fault == "missing_mask":
        (c / "ground_truth" / "scratch" / "001_mask.png").unlink()
    else:  # PIL refuses images above 2 x MAX_IMAGE_PIXELS; lower the limit instead of writing a huge file
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE[0] * SIZE[1] // 3)
    out = tmp_path / "run"
    assert main(_fit_argv(root, out)) == 2
    err = capsys.readouterr().err
    assert expect in err and str(culprit) in err and "allow_missing_masks=True" not in err
    assert not out.exists()  # nothing trained, and no config.yaml left behind


def test_failed_fit_leaves_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["fit", "--preset", "rd_cpu", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err and not out.exists()


def test_missing_masks_can_be_allowed_by_config(tmp_path: Path) -> None:
    from kdad.config import load_config
    from kdad.data.factory import build_dataset, check_splits

    root = make_mvtec(tmp_path / "d")
    (root / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    cfg = load_config("rd_cpu", [], [f"data.root={root / 'widget'}", "data.allow_missing_masks=true"])
    check_splits(cfg.data, ["train", "test"])
    assert [s.has_mask for s in build_dataset(cfg.data, "test").samples] == [True, True, False]  # type: ignore[attr-defined]
