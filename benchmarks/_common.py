"""What every benchmark script shares: where the data lives, the quality study's seeded test-split halves, the
RD family's train-and-test run (rd_family.py, levers_seeds.py), the run metadata and the results JSON.

Scripts run as ``python benchmarks/X.py`` (with kdad installed, or ``PYTHONPATH=src``); Python puts
``benchmarks/`` on the path for the script itself, so ``import _common`` needs no path manipulation.
Every results file records the command that made it (``meta.command``) next to the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDAD_SHARED", str(ROOT.parent / "shared")))  # a copy elsewhere (GPU machine)
CATEGORIES = {
    "bottle": SHARED / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": SHARED / "data" / "mtd" / "magnetic_tile",
}
# the hard generated category (benchmarks/make_hard_category.py --out <this> --seed 0); never committed
CATEGORIES["brushed"] = Path(os.environ.get("KDAD_HARD", "/tmp/kdad_hard/brushed"))
# the same surface at 512 px, defects keeping their px sizes (make_hard_category.py --size 512 --test-good 40
# --per-defect 30 --out <this>): a 256-px resize halves them; the tiling study (issue 18, point 3) reads it
# an object category no preset was chosen on (make_hard_category.py --kind screws --train 300 --test-good 60
# --per-defect 30 --out <this>): thin screws at random angles, small defects (docs/quality.md, "Session 18");
# as a check its report half is the number; a choice made on it uses its selection half only
CATEGORIES["screws"] = Path(os.environ.get("KDAD_SCREWS", "/tmp/kdad_hard/screws"))
# the same screws half as large, under light 0.15 darker in the corners, with 8 dust specks per image (the same command
# with --part-scale 0.5 --vignette 0.15 --specks 8): does data.align: auto still find the part (docs/align.md)
CATEGORIES["screws_lit"] = Path(os.environ.get("KDAD_SCREWS_LIT", "/tmp/kdad_hard/screws_lit"))
# a selection-only set for choices made for small parts under uneven light (make_hard_category.py --kind screws
# --seed 1 --train 300 --test-good 60 --per-defect 30 --part-scale 0.6 --vignette 0.2 --specks 12 --out <this>):
# other images, part size, fall-off and dust than screws_lit, so screws_lit's both halves stay a report
CATEGORIES["screws_dusty"] = Path(os.environ.get("KDAD_SCREWS_DUSTY", "/tmp/kdad_hard/screws_dusty"))
# a selection-only registered object on a dark, nearly flat backdrop, like bottle (make_hard_category.py --kind caps
# --train 200 --test-good 60 --per-defect 30 --out <this>): for choosing how a map is read out (session 42);
# every test image counts, nothing is reported on it
CATEGORIES["caps"] = Path(os.environ.get("KDAD_CAPS", "/tmp/kdad_hard/caps"))
# the same kind with other images and defects at 0.4 of the contrast (the caps command with --seed 1 --contrast 0.4):
# every reading scored caps at 0.993-1.000, too easy to choose anything on; selection-only as well
CATEGORIES["caps_faint"] = Path(os.environ.get("KDAD_CAPS_FAINT", "/tmp/kdad_hard/caps_faint"))
CATEGORIES["brushed512"] = Path(os.environ.get("KDAD_HARD_512", "/tmp/kdad_hard/brushed512"))
TEXTURES = SHARED / "data" / "dtd" / "images"
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = {"rd": "rd_cpu", "rdpp": "rdpp_cpu", "urd": "urd_cpu", "cfrg": "cfrg_cpu"}  # the RD family's CPU presets
# rd_cpu distils Lite0 layers 2-4 since 2026-12-03 and divides its map by the held-out normals' mean map since
# 2026-12-04; comparisons with the other methods (and the results files made before) use the papers' layers 1-3 and
# raw map, those of rdpp_cpu, urd_cpu and cfrg_cpu; fp32, as rd_cpu trained until session 26; and a constant learning
# rate, as until session 39 (its epochs are set by each script's budget); RD4AD's ReLU readout, as until session 40
RD_PAPER_OVERRIDES = ("model.layers=[1,2,3]", "model.map_norm=none", "train.cpu_bf16=false", "train.lr_decay_from=1",
                      "model.readout=relu")

# The quality study: presets are chosen on the selection half (and on generated data) and reported on the other
# half, so no number in docs/benchmarks.md comes from the images it was tuned on. Halves are stratified by defect type.
SPLIT_SEED = 20261202

# /proc/cpuinfo flags that decide which CPU kernels torch can use (AMX and AVX-512 bf16 matmuls, VNNI)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def halves(ds: Any, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(selection indices, report indices) of a test dataset: each defect type split in two at random, seeded."""
    types = [s.defect_type for s in ds.samples]
    rng = np.random.default_rng(seed)
    sel: list[int] = []
    rep: list[int] = []
    for t in sorted(set(types)):
        idx = [i for i, tt in enumerate(types) if tt == t]
        rng.shuffle(idx)
        k = len(idx) // 2
        sel += idx[:k]
        rep += idx[k:]
    return sorted(sel), sorted(rep)


def urd_foreground(category: str) -> str:
    """URD's per-category foreground (bottle: GrabCut), or "none" where OpenCV is missing (recorded)."""
    from kdad.synthesis import URD_FOREGROUND_MVTEC

    method = URD_FOREGROUND_MVTEC.get(category, "none")
    if method == "grabcut" and importlib.util.find_spec("cv2") is None:
        return "none"
    return method


def run_one(method: str, category: str, args: argparse.Namespace, work: Path,
            extra_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train with the method's CPU preset under the shared budget (plus `extra_overrides`), then evaluate on
    the test split."""
    from kdad.config import load_config  # here, so that importing _common does not load torch
    from kdad.evaluate import evaluate_run
    from kdad.train import fit

    overrides = [
        f"data.root={CATEGORIES[category]}", "data.image_size=256", f"train.device={args.device}",
        "train.progress=false",
        f"train.max_iters={args.iters}", f"train.batch_size={args.batch}", "train.epochs=1000",
        f"train.seed={args.seed}", "train.val_fraction=0.1", "model.backbone=efficientnet_lite0",
        f"train.max_seconds={args.max_seconds}",
    ]
    extra: dict[str, Any] = {}
    if method == "urd":
        extra["foreground"] = urd_foreground(category)
        overrides += [f"data.texture_dir={TEXTURES}", f"model.synthesis.foreground={extra['foreground']}"]
    if method == "cfrg":
        overrides += [f"data.texture_dir={TEXTURES}"]
    if method == "rd":
        overrides += RD_PAPER_OVERRIDES
    cfg = load_config(PRESETS[method], [], [*overrides, *extra_overrides])
    run_dir = work / f"{method}_{category}"
    fit(cfg, run_dir)
    res = evaluate_run(run_dir, device=args.device, report=False)
    info = res["train_info"]
    m = res["metrics"]
    return {
        "method": method, "category": category, "preset": PRESETS[method], **extra,
        "i_auroc": m.get("image_auroc"), "p_auroc": m.get("pixel_auroc"), "au_pro": m.get("au_pro"),
        "train_img_per_s": info.get("train_images_per_s"), "train_seconds": info.get("train_seconds"),
        "iters": info.get("iters"), "n_test_images": res["n_images"], "metrics": m,
    }


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (cores here are shared with other jobs, so every result records them)."""
    return [round(v, 2) for v in os.getloadavg()]


def command_line() -> str:
    """The command that is running, as one shell line (``python benchmarks/X.py --flag value``)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def git_commit() -> str:
    """HEAD of the repository, with ``+dirty`` when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPU count and which of :data:`CPU_FLAGS` it has (Linux; model only elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def metadata(**extra: Any) -> dict[str, Any]:
    """Facts about this run that a results file needs to be read later: the command, the commit, the machine,
    the thread count, the load, library versions and the date. ``extra`` adds script-specific fields."""
    import torch

    import kdad

    meta: dict[str, Any] = {
        "command": command_line(),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"arch": platform.machine(),
                    "system": platform.platform(), "cpu": cpu_info()},
        "threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kdad": kdad.__version__,
    }
    if torch.cuda.is_available():
        meta["cuda_device"] = torch.cuda.get_device_name(0)
    meta.update(extra)
    return meta


def dumps_rows(doc: dict[str, Any], key: str = "runs") -> str:
    """``doc`` as JSON text with each row of ``doc[key]`` on one line: a results file of hundreds of rows stays
    well under the repository's 1 MB per file, and a git diff shows whole rows. json.loads reads it back."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != key]
    rows = ",\n  ".join(json.dumps(r) for r in doc.get(key, []))
    return "{\n" + ",\n".join([*head, f" {json.dumps(key)}: [\n  {rows}\n ]"]) + "\n}\n"


def append_run(path: str | Path, question: str, run: dict[str, Any]) -> Path:
    """Add ``run`` to the results file ``path`` (created with ``question`` and :func:`metadata` if missing)."""
    path = Path(path)
    doc = json.loads(path.read_text()) if path.is_file() else {"question": question, "meta": metadata(), "runs": []}
    doc["runs"].append(run)
    return write_json(path, doc)


def write_json(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to ``path`` atomically (a reader never sees half a file; parallel runs may append).

    ``doc["meta"]`` gets ``loadavg_end``; a doc without ``meta`` gets :func:`metadata` so that every results
    file says which command made it."""
    path = Path(path)
    meta = doc.setdefault("meta", metadata())
    meta["loadavg_end"] = loadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def seed_study(run: Callable[[str, str, int, Path], dict[str, Any]], summary: Callable[[list[dict[str, Any]]], str],
               cell: str, category: str, out: Path) -> None:
    """The command line of a study that fits a cell once per seed and scores the same maps several ways
    (map_norm.py, tile_score.py): ``--summary`` prints the table of ``--out``; otherwise each seed's row,
    ``run(cell, category, seed, workdir)``, replaces the row of the same (cell, category, seed) in ``--out``,
    written after every seed so that a stopped study keeps the seeds it finished."""
    import tempfile

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--cell", default=cell, help="NAME=PRESET:key=value,... (benchmarks/quality.py's form)")
    ap.add_argument("--category", default=category, choices=sorted(CATEGORIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=out)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    if args.summary:
        print(summary(rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            row = run(args.cell, args.category, seed, Path(tmp))
            key = (row["cell"], row["category"], seed)
            rows = [r for r in rows if (r["cell"], r["category"], r["seed"]) != key] + [row]
            write_json(args.out, {"split_seed": SPLIT_SEED, "runs": rows})
            print(json.dumps(row["image_auroc"]), flush=True)


# The quality study's rows: quality.json, then its continuations quality-2.json, quality-3.json, ... (one file
# would pass the repository's 1 MB per committed file). benchmarks/quality_merge.py adds rows to the last one.
QUALITY_MAX_BYTES = 950_000


def quality_files() -> list[Path]:
    """The study's results files in order: quality.json first, then quality-N.json by N."""
    more = sorted(RESULTS.glob("quality-*.json"), key=lambda f: int(f.stem.split("-")[1]))
    return [f for f in [RESULTS / "quality.json", *more] if f.is_file()]


def quality_runs(files: list[str | Path] | None = None) -> list[dict[str, Any]]:
    """Every row of ``files`` (default: :func:`quality_files`), in file order."""
    return [r for f in (files or quality_files()) for r in json.loads(Path(f).read_text())["runs"]]


def mean_std(vals: list[float]) -> str:
    """"mean ± sample std" over seeds at 3 decimals; the value alone for one seed, "–" for none."""
    a = np.asarray(vals, float)
    return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if len(a) > 1 else (f"{a.mean():.3f}" if len(a) else "–")


# generated sets kept for choosing only: nothing is reported on them, and every test image counts (the rows' `all`)
SELECTION_ONLY = frozenset({"screws_dusty", "caps", "caps_faint"})


def quality_table(runs: list[dict[str, Any]], half: str = "report") -> str:
    """Markdown table of quality.json runs: mean ± sample std over seeds, per cell and category; a selection-only
    category (SELECTION_ONLY) shows every test image where its rows have them.

    Pixel metrics are at the images' native size where the run recorded them (`native`: a resized run on
    large images, maps upsampled); a tiled run's own maps are native already."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["cell"], r["category"]), []).append(r)

    lines = ["| cell | category | seeds | train min (1 core unless marked) | image AUROC | pixel AUROC | AU-PRO | "
             "good images flagged |",
             "|---|---|---|---|---|---|---|---|"]
    for (cell, cat), rows in sorted(groups.items()):
        part = "all" if cat in SELECTION_ONLY and all("all" in r for r in rows) else half
        cols = [mean_std([r[part]["image_auroc"] for r in rows])]
        cols += [mean_std([r.get("native", r)[part][k] for r in rows]) for k in ("pixel_auroc", "au_pro")]
        cat = f"{cat} (every image)" if part == "all" else cat
        flagged = mean_std([r["good_images_flagged"]["rate"] for r in rows if r.get("good_images_flagged")])
        threads = sorted({r["threads"] for r in rows} - {1})  # the study runs one thread per run
        marked = f" ({'/'.join(map(str, threads))} threads)" if threads else ""
        lines.append(f"| {cell} | {cat} | {len(rows)} | {mean_std([r['train_minutes'] for r in rows])}{marked} | "
                     + " | ".join(cols) + f" | {flagged} |")
    return "\n".join(lines)


# The cells of quality.json that measure each shipped CPU preset's current recipe (first listed wins a seed two
# cells share; the *_xpix cells rerun the same recipe for the cross-fitted pixel threshold). Presets with
# data.align=auto pick alignment on the generated screws only (docs/align.md): their screws cell is the aligned
# run (ALIGNED_CELLS; zoom in the name, 125 = 1.25, none = 1.5), and the unaligned one (the cells *_screws_none, run
# with data.align=none; for rdpp_cpu, urd_cpu and bkd_cpu also their preset cells, run before their data.align: auto)
# moves to its own column.
PRESET_CELLS: dict[str, tuple[str, ...]] = {
    "rd_cpu": ("rd_lin_auto", "rd_screws_none"), "stfpm_cpu": ("stfpm_cpu",),
    "rdpp_cpu": ("rdpp_cpu", "rdpp_cpu_xpix", "rdpp_screws_none"), "urd_cpu": ("urd_cpu",),
    "dskd_cpu": ("dskd_cpu", "dskd_cpu_xpix", "dskd_screws_none"), "cfrg_cpu": ("cfrg_cpu", "cfrg_screws_none"),
    "snl_cpu": ("snl_e100_bf16", "snl_screws_none"), "bkd_cpu": ("bkd_cpu_xpix", "bkd_screws_none"),
    "patchst_cpu": ("patchst_coreset", "patchst_coreset_xpix"),
    "patchst_memory_cpu": ("patchst_mem", "patchst_mem_xpix"),
}
# Cells whose screws rows score the part's envelope (data.align_region: part, run as shipped since session 30), not
# the whole aligned frame: the grid's two screws columns skip those rows (they belong in the envelope table), so
# rd_cpu's whole-frame screws cell stays its 100-epoch recipe of sessions 26-38
ENVELOPE_CELLS = frozenset({"rd_e80_dec60_1t", "rd_lin_fp32_1t", "rd_lin_auto"})
ALIGNED_CELLS: dict[str, tuple[str, ...]] = {
    "rd_cpu": ("rd_mn_e100_bf16",), "stfpm_cpu": ("stfpm_align",), "rdpp_cpu": ("rdpp_align",),
    "snl_cpu": ("snl_e100_bf16",), "urd_cpu": ("urd_auto125",), "bkd_cpu": ("bkd_auto125",),
    "dskd_cpu": ("dskd_auto125",), "cfrg_cpu": ("cfrg_auto125",), "patchst_cpu": ("patchst_align125",),
    "patchst_memory_cpu": ("patchst_mem_s28",)}  # rerun with session 28's pose (the preset as shipped)
GRID_CATEGORIES = ("magnetic_tile", "bottle", "brushed", "screws")


def preset_grid(runs: list[dict[str, Any]], half: str = "report") -> str:
    """Markdown table: each shipped CPU preset's image AUROC per category, mean ± sample std (seeds); '–' where the
    study has no run of the current recipe. The last column: the screws without alignment (data.align=none)."""
    def seeds(cells: tuple[str, ...], cat: str) -> list[dict[str, Any]]:
        by_seed: dict[int, dict[str, Any]] = {}
        for name in cells:
            for r in runs:
                if r["cell"] == name and r["category"] == cat and not (cat == "screws" and name in ENVELOPE_CELLS):
                    by_seed.setdefault(r["seed"], r)
        return list(by_seed.values())

    def cell(rows: list[dict[str, Any]]) -> str:
        return f"{mean_std([r[half]['image_auroc'] for r in rows])} ({len(rows)})" if rows else "–"

    lines = ["| preset | " + " | ".join(GRID_CATEGORIES) + " | screws, `data.align=none` |",
             "|---|" + "---|" * (len(GRID_CATEGORIES) + 1)]
    for preset, cells in PRESET_CELLS.items():
        cols = [cell(seeds(ALIGNED_CELLS[preset] if cat == "screws" and preset in ALIGNED_CELLS else cells, cat))
                + (" aligned" if cat == "screws" and preset in ALIGNED_CELLS else "") for cat in GRID_CATEGORIES]
        # an aligned cell listed in both dicts (the current recipe run as shipped) is no unaligned run
        unaligned = tuple(c for c in cells if c not in ALIGNED_CELLS.get(preset, ()))
        cols.append(cell(seeds(unaligned, "screws")) if preset in ALIGNED_CELLS else "(same)")
        lines.append(f"| `{preset}` | " + " | ".join(cols) + " |")
    return "\n".join(lines)


REGION_CATEGORIES = ("screws", "screws_lit")  # part_roi.json's report sets
REGION_SELECTION = "screws_dusty"  # the set the region was chosen on


def region_grid(rows: list[dict[str, Any]]) -> str:
    """Markdown table from part_roi.json's rows: each preset's image AUROC with the max over the whole aligned frame
    and over the part's envelope (data.align_region), the same fitted models; report half of the report sets,
    mean ± sample std (seeds), and every test image of the selection set screws_dusty."""
    def pair(sel: list[dict[str, Any]], half: str) -> str:
        frame, part = (mean_std([r[f"data.align_region={g}"][half]["image_auroc"] for r in sel]) for g in ("frame", "part"))
        return f"{frame} → **{part}** ({len(sel)})" if sel else "–"

    presets = sorted({r["preset"] for r in rows})
    lines = ["| preset | " + " | ".join(f"{c}, report half" for c in REGION_CATEGORIES)
             + f" | {REGION_SELECTION} (selection set), every image |", "|---|" + "---|" * (len(REGION_CATEGORIES) + 1)]
    for p in presets:
        cols = [pair([r for r in rows if r["preset"] == p and r["category"] == c], "report") for c in REGION_CATEGORIES]
        cols.append(pair([r for r in rows if r["preset"] == p and r["category"] == REGION_SELECTION], "all"))
        lines.append(f"| `{p}` | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def grow(mask: Any, px: int) -> Any:
    """(B, H, W) bool tensors dilated (px > 0) or eroded (px < 0) by a square of half-side |px|."""
    import torch.nn.functional as F

    if px < 0:
        return ~grow(~mask, -px)
    return mask if px == 0 else F.max_pool2d(mask.float()[:, None], 2 * px + 1, 1, px)[:, 0] > 0
