"""`kdad feedback` (issue 21.4): fine-tune on good images marked as false alarms, recalibrate, compare, and
leave the old run untouched; bad inputs exit 2 and write nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdad.checkpoint import load_bundle
from kdad.cli import main
from kdad.feedback import MIN_IMAGES, feedback_run, repeats_for, split_feedback
from kdad.train import fit
from tests.fakes import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("fb"), "stfpm_cpu", 16, 3,
                    ["train.epochs=6", "train.val_fraction=0.3", "train.alpha=0.2"])


def _striped(run: Path, dst: Path, n: int) -> Path:
    """`n` good parts with a blue tint and a bright stripe: a look the run has never seen, which it flags."""
    src = sorted((Path(load_bundle(run)["config"]["data"]["root"]) / "train" / "good").glob("*.png"))
    dst.mkdir(parents=True)
    for i in range(n):
        a = np.asarray(Image.open(src[i % len(src)]).convert("RGB"), np.float32)
        a[:, :, 2] = a[:, :, 2] * 0.5 + 60
        a[28:34] = 200
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(dst / f"{i:03d}.png")
    return dst


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_feedback_lowers_the_fed_back_scores_and_leaves_the_old_run_unchanged(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _striped(run, tmp_path / "good", 6)
    before = _hashes(run)
    out = tmp_path / "new"
    assert main(["feedback", str(run), "--good", str(good), "--out", str(out), "--epochs", "10", "--share", "0.5",
                 "--device", "cpu"]) == 0
    assert _hashes(run) == before  # nothing of the old run is overwritten, nothing added
    printed = capsys.readouterr().out
    summary = json.loads((out / "feedback.json").read_text())
    b, a = summary["before"], summary["after"]
    assert len(summary["feedback_images_trained"]) == 3 and len(summary["feedback_images_held_out"]) == 3
    assert not set(summary["feedback_images_trained"]) & set(summary["feedback_images_held_out"])
    # the run flags every striped image; the fine-tuned run, at its own recalibrated threshold, none it trained on
    assert b["feedback_trained"]["rate"] == 1.0 and b["feedback_held_out"]["rate"] == 1.0
    assert a["feedback_trained"]["rate"] == 0.0
    ratio_b = np.array(b["feedback_held_out"]["scores"]) / b["image_threshold"]
    ratio_a = np.array(a["feedback_held_out"]["scores"]) / a["image_threshold"]
    assert ratio_a.mean() < 0.9 * ratio_b.mean()  # the images it never saw move towards normal too
    assert a["calibration_normals"]["n"] == b["calibration_normals"]["n"] == 5  # the run's own held-out normals
    assert b["test"]["image_auroc"] is not None and b["test"]["excluded_feedback_images"] == 0
    new = load_bundle(out)  # a complete run: recalibrated thresholds, gate, provenance
    assert new["thresholds"]["n_calibration"] == 5 and new["thresholds"]["image"] == a["image_threshold"]
    assert new["gate"] is not None and new["feedback"]["parent_sha256"] == before["model.ckpt"]
    assert new["config"]["train"]["epochs"] == 10
    assert "good images held out" in printed and "3/3 = 100.0%" in printed and "is unchanged" in printed
    assert not list(tmp_path.glob(".new.tmp-*"))


def test_too_few_images_are_all_trained_on_and_the_summary_says_so(run: Path, tmp_path: Path) -> None:
    good = _striped(run, tmp_path / "good", MIN_IMAGES - 1)
    summary = feedback_run(run, good, out=tmp_path / "new", epochs=1, device="cpu")
    assert summary["feedback_images_held_out"] == [] and summary["after"]["feedback_held_out"] is None
    assert any("optimistic" in n for n in summary["notes"])


def test_bad_inputs_exit_2_name_the_culprit_and_write_nothing(run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "notes.txt").write_text("not an image")
    broken = _striped(run, tmp_path / "broken", 4)
    (broken / "999.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    before_run, before_tmp = _hashes(run), sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["feedback", str(tmp_path / "nope"), "--good", str(broken)], "not found"),
        (["feedback", str(run), "--good", str(tmp_path / "missing")], "--good"),
        (["feedback", str(run), "--good", str(empty)], "--good"),
        (["feedback", str(run), "--good", str(text_only)], "no images"),
        (["feedback", str(run), "--good", str(broken)], "999.png"),
        (["feedback", str(run), "--good", str(broken), "--out", str(empty)], "exists"),
        (["feedback", str(run), "--good", str(broken), "--out", str(run / "inside")], "inside RUN"),
        (["feedback", str(run), "--good", str(broken), "--epochs", "0"], "--epochs"),
    ]
    for argv, culprit in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert culprit in capsys.readouterr().err, argv
    assert _hashes(run) == before_run
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp
    assert not list(run.parent.glob(f"{run.name}-feedback-*"))


def test_a_failure_during_the_fine_tune_leaves_no_folder(run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import kdad.feedback

    def broken(bundle: dict, cfg: object, extra: object, tmp: Path) -> None:
        (tmp / "half").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(kdad.feedback, "_finetune", broken)
    good = _striped(run, tmp_path / "good", 4)
    with pytest.raises(RuntimeError, match="disk full"):
        feedback_run(run, good, out=tmp_path / "new", epochs=1, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def test_split_and_repeats() -> None:
    fit_idx, held = split_feedback(9, 0.5, seed=0)
    assert len(held) == 4 and sorted(fit_idx + held) == list(range(9))
    assert split_feedback(9, 0.5, seed=0) == (fit_idx, held)  # seeded
    assert split_feedback(MIN_IMAGES - 1, 0.5, 0) == ([0, 1, 2], [])
    assert split_feedback(6, 0.0, 0) == (list(range(6)), [])
    assert repeats_for(188, 5, 0.2) == 9  # 45 of 233 images per epoch: about a fifth
    assert repeats_for(10, 50, 0.2) == 1  # at least once each


def test_fit_from_a_start_state_begins_at_those_weights(run: Path, tmp_path: Path) -> None:
    """fit(start=...) fine-tunes the given weights: with a zero learning rate they come back unchanged (batch
    norm statistics aside), where a fresh model would not."""
    import torch

    from kdad.config import build_config

    old = load_bundle(run)
    cfg = build_config({**old["config"], "model": {**old["config"]["model"], "lr": 0.0},
                        "train": {**old["config"]["train"], "epochs": 1}})
    new = load_bundle(fit(cfg, tmp_path / "ft", start=old["model"]))
    weights = [k for k in old["model"] if "running_" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(new["model"][k], old["model"][k]) for k in weights)
