"""`kdad demo`: synthetic inspection data -> train RD (CPU preset) -> evaluate -> report, in a few minutes."""

from __future__ import annotations

import json
from pathlib import Path

from kdad.config import load_config
from kdad.data.demo import make_demo_dataset
from kdad.evaluate import evaluate_run
from kdad.train import fit


def run_demo(out: Path, kind: str = "object", epochs: int | None = None, device: str = "auto") -> dict:
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
    print(json.dumps(result["metrics"], indent=2))
    print(f"demo: report at {run_dir / 'report.html'}")
    return result
