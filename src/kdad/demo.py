"""`kdad demo`: synthetic inspection data -> train RD (CPU preset) -> evaluate -> report, in a few minutes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from kdad.config import load_config
from kdad.data.demo import make_demo_dataset
from kdad.evaluate import evaluate_run
from kdad.train import fit

DEMO_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "au_pro")
GOOD_DEMO_SCORE = 0.9  # below this on the demo data something is off (too few epochs, a broken install)


def demo_summary(result: dict[str, Any], out: Path, run_dir: Path, data_root: Path) -> str:
    """What the demo tells a first-time user: metrics with their scale, where every output went, what next."""
    from kdad.report import METRIC_LABELS

    metrics = result.get("metrics") or {}
    lines = ["", "demo: results (1.0 = perfect, 0.5 = chance; the demo usually scores above "
             f"{GOOD_DEMO_SCORE} on each):"]
    for key in DEMO_METRICS:
        value = float(metrics.get(key, math.nan))
        flag = "  <- low for the demo: try --epochs 12" if value < GOOD_DEMO_SCORE else ""
        lines.append(f"  {METRIC_LABELS[key]:20s} {value:.3f}{flag}")
    lines += [
        f"demo: everything is in {out}/",
        f"  {data_root}/  the synthetic dataset (train/good, test/<defect>, ground_truth/)",
        f"  {run_dir}/  model.ckpt, metrics.json (all metrics), scores.csv, report.html",
        f"demo: open {run_dir / 'report.html'} in a browser; re-test with `kdad test {run_dir}`",
        "demo: this model knows only the synthetic parts, so it flags every real photo as anomalous. "
        "For your parts, train on about 50 or more good images of them: "
        "kdad fit --preset rd_cpu --data path/to/category --test (see README, Data)",
    ]
    return "\n".join(lines)


def run_demo(out: Path, kind: Literal["texture", "object"] = "object", epochs: int | None = None,
             device: str = "auto") -> dict:
    """Run the whole pipeline under `out` and return the test result dict."""
    data_root = make_demo_dataset(out / "data" / kind, kind=kind, seed=0)
    overrides = [f"data.root={data_root}", f"train.device={device}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_config("rd_demo", [], overrides)
    run_dir = out / "run"
    print(f"demo: data in {data_root}, training {cfg.method} ({cfg.model['backbone']}) for {cfg.train.epochs} epochs")
    fit(cfg, run_dir)
    result = evaluate_run(run_dir, device=device)
    print(demo_summary(result, out, run_dir, data_root))
    return result
