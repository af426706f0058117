"""Mean and spread over seeds of the quality study (benchmarks/results/quality.json and its continuations), per
cell and category, as a Markdown table.

Run: python benchmarks/quality_summary.py [--half report] [--presets]  (--presets: one row per shipped CPU preset)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import preset_grid, quality_runs, quality_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--half", default="report", choices=["selection", "report", "all"])
    ap.add_argument("--file", nargs="*", type=Path, help="results files (default: the committed study)")
    ap.add_argument("--presets", action="store_true", help="image AUROC of each shipped CPU preset per category")
    args = ap.parse_args()
    runs = quality_runs(args.file)
    print(preset_grid(runs, args.half) if args.presets else quality_table(runs, args.half))


if __name__ == "__main__":
    main()
