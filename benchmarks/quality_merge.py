"""Add the rows of quality.py runs (files written with --out elsewhere) to the committed study.

A row replaces the study's row with the same (cell, category, seed) wherever that row is; new rows go to the last
study file (_common.quality_files) while it stays under _common.QUALITY_MAX_BYTES, else to a new quality-N.json.

Run: python benchmarks/quality_merge.py /tmp/exp/run1.json [/tmp/exp/run2.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import QUALITY_MAX_BYTES, RESULTS, dumps_rows, quality_files


def key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["cell"], row["category"], row["seed"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path)
    args = ap.parse_args()
    new: dict[tuple[str, str, int], dict[str, Any]] = {}
    for src in args.sources:
        for row in json.loads(src.read_text())["runs"]:
            new[key(row)] = row
    files = quality_files() or [RESULTS / "quality.json"]  # the first run of a fresh study starts quality.json
    docs = {f: json.loads(f.read_text()) if f.is_file() else {"runs": []} for f in files}
    for doc in docs.values():  # a rerun replaces its row in place
        doc["runs"] = [new.pop(key(r)) if key(r) in new else r for r in doc["runs"]]
    last = files[-1]
    for row in new.values():
        if len(dumps_rows(docs[last])) + len(json.dumps(row)) > QUALITY_MAX_BYTES:
            head = {k: v for k, v in docs[files[0]].items() if k != "runs"}
            last = RESULTS / f"quality-{len(files) + 1}.json"
            files.append(last)
            docs[last] = {**head, "runs": []}
        docs[last]["runs"].append(row)
    for f, doc in docs.items():
        f.write_text(dumps_rows(doc))
        print(f"{f.name}: {len(doc['runs'])} rows, {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
