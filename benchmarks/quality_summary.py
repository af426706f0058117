"""Mean and spread over seeds of benchmarks/results/quality.json, per cell and category, as a Markdown table.

Run: python benchmarks/quality_summary.py [--half report]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import RESULTS, quality_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--half", default="report", choices=["selection", "report", "all"])
    ap.add_argument("--file", default=str(RESULTS / "quality.json"))
    args = ap.parse_args()
    print(quality_table(json.loads(Path(args.file).read_text())["runs"], args.half))


if __name__ == "__main__":
    main()
