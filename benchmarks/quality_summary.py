"""Mean and spread over seeds of benchmarks/results/quality.json, per cell and category, as a Markdown table.

Run: python benchmarks/quality_summary.py [--half report]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--half", default="report", choices=["selection", "report", "all"])
    ap.add_argument("--file", default=str(RESULTS))
    args = ap.parse_args()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in json.loads(Path(args.file).read_text())["runs"]:
        groups[(r["cell"], r["category"])].append(r)
    print("| cell | category | seeds | train min (1 core) | image AUROC | pixel AUROC | AU-PRO | good images flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for (cell, cat), rows in sorted(groups.items()):
        def fmt(vals: list[float]) -> str:
            a = np.asarray(vals, float)
            return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if len(a) > 1 else f"{a.mean():.3f}"
        cols = [fmt([r[args.half][k] for r in rows]) for k in ("image_auroc", "pixel_auroc", "au_pro")]
        flagged = fmt([r["good_images_flagged"]["rate"] for r in rows if r.get("good_images_flagged")])
        print(f"| {cell} | {cat} | {len(rows)} | {fmt([r['train_minutes'] for r in rows])} | " + " | ".join(cols)
              + f" | {flagged} |")


if __name__ == "__main__":
    main()
