"""The quality study's rows span quality.json and its continuations (benchmarks/_common.py, quality_merge.py):
a rerun replaces its row wherever it is, new rows start a new file before one passes the size cap, and every
reader sees all rows in order; the every-cell table reads a set kept for choosing on every image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import quality_merge  # noqa: E402


def _row(cell: str, seed: int, value: float = 0.5) -> dict[str, object]:
    return {"cell": cell, "category": "c", "seed": seed, "report": {"image_auroc": value}, "pad": "x" * 200}


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text(_common.dumps_rows({"split_seed": 1, "runs": rows}))


def test_merge_replaces_in_place_and_continues_in_a_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(quality_merge, "RESULTS", tmp_path)
    _write(tmp_path / "quality.json", [_row("a", 0), _row("a", 1)])
    size = (tmp_path / "quality.json").stat().st_size
    monkeypatch.setattr(quality_merge, "QUALITY_MAX_BYTES", size + 400)  # room for one more row, not two
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"runs": [_row("a", 1, 0.9), _row("b", 0), _row("b", 1)]}))
    monkeypatch.setattr(sys, "argv", ["quality_merge.py", str(src)])
    quality_merge.main()
    assert [f.name for f in _common.quality_files()] == ["quality.json", "quality-2.json"]
    first = json.loads((tmp_path / "quality.json").read_text())
    assert first["split_seed"] == 1
    assert [(r["cell"], r["seed"]) for r in first["runs"]] == [("a", 0), ("a", 1), ("b", 0)]
    assert first["runs"][1]["report"]["image_auroc"] == 0.9  # the rerun replaced seed 1 where it was
    assert json.loads((tmp_path / "quality-2.json").read_text())["split_seed"] == 1  # the head travels along
    runs = _common.quality_runs()
    assert [(r["cell"], r["seed"]) for r in runs] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    quality_merge.main()  # merging the same rows again changes nothing
    assert _common.quality_runs() == runs


def test_continuations_are_read_in_numeric_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    for name, cell in (("quality.json", "a"), ("quality-10.json", "c"), ("quality-2.json", "b")):
        _write(tmp_path / name, [_row(cell, 0)])
    (tmp_path / "quality_explore_mt.json").write_text("{}")  # another study's file, not a continuation
    assert [f.name for f in _common.quality_files()] == ["quality.json", "quality-2.json", "quality-10.json"]
    assert [r["cell"] for r in _common.quality_runs()] == ["a", "b", "c"]


def test_the_first_merge_of_a_fresh_study_writes_quality_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(quality_merge, "RESULTS", tmp_path)
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"runs": [_row("a", 0)]}))
    monkeypatch.setattr(sys, "argv", ["quality_merge.py", str(src)])
    quality_merge.main()
    assert [f.name for f in _common.quality_files()] == ["quality.json"]
    assert [r["cell"] for r in _common.quality_runs()] == ["a"]


def test_region_grid_pairs_frame_and_part_per_preset_and_set() -> None:
    """docs/benchmarks.md's aligned-parts table: the same models' whole-frame and envelope scores, mean ± sample std
    over seeds on the report sets' report half, and every image of the selection set."""
    def roi(preset: str, category: str, seed: int, frame: float, part: float) -> dict[str, object]:
        return {"preset": preset, "category": category, "seed": seed,
                "data.align_region=frame": {h: {"image_auroc": frame} for h in ("report", "all")},
                "data.align_region=part": {h: {"image_auroc": part} for h in ("report", "all")}}

    rows = [roi("b_cpu", "screws", 0, 0.5, 0.8), roi("b_cpu", "screws", 1, 0.7, 0.9),
            roi("b_cpu", "screws_dusty", 0, 0.4, 0.6), roi("a_cpu", "screws_lit", 0, 0.6, 0.65)]
    lines = _common.region_grid(rows).splitlines()
    assert lines[0].startswith("| preset | screws, report half | screws_lit, report half | screws_dusty")
    assert lines[2] == "| `a_cpu` | – | 0.600 → **0.650** (1) | – |"
    assert lines[3] == "| `b_cpu` | 0.600 ± 0.141 → **0.850 ± 0.071** (2) | – | 0.400 → **0.600** (1) |"


def test_quality_table_marks_minutes_not_run_on_one_thread() -> None:
    def row(cell: str, threads: int) -> dict[str, object]:
        metrics = {"image_auroc": 0.9, "pixel_auroc": 0.8, "au_pro": 0.7}
        return {"cell": cell, "category": "c", "seed": 0, "train_minutes": 15.4, "threads": threads, "report": metrics}

    lines = _common.quality_table([row("one", 1), row("two", 2)]).splitlines()
    by_cell = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "15.400 (2 threads) |" in by_cell["two"]
    assert "15.400 |" in by_cell["one"] and "threads" not in by_cell["one"]


def test_quality_table_reads_selection_only_sets_on_every_image() -> None:
    """A set kept for choosing (_common.SELECTION_ONLY) is shown on all its test images, not on a report half."""
    def row(cat: str, report: float, every: float) -> dict:
        half = {"image_auroc": report, "pixel_auroc": report, "au_pro": report}
        return {"cell": "c", "category": cat, "seed": 0, "train_minutes": 1.0, "threads": 1, "report": half,
                "all": {"image_auroc": every, "pixel_auroc": every, "au_pro": every}}
    table = _common.quality_table([row("caps", 0.111, 0.222), row("bottle", 0.333, 0.444)])
    assert "| c | caps (every image) | 1 | 1.000 | 0.222 | 0.222 | 0.222 |" in table
    assert "| c | bottle | 1 | 1.000 | 0.333 | 0.333 | 0.333 |" in table
