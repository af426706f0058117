"""The papers' relative claims (issue 18.4), checked on the quality study's runs: URD > RD++ > RD.

Reads the quality study (benchmarks/results/quality.json and its continuations: the rows `benchmarks/quality.py`
wrote for the cells rd_cpu_l123, rdpp_cpu and urd_cpu; rd_cpu_l123 is `rd_cpu` at the papers' teacher layers 1-3, those of the other two, so the claims compare
the methods and not their layers) and, per category and metric on the report half, compares the two cells of each claim over their seeds:

    diff = mean(A) - mean(B),  se = sqrt(var(A)/n_A + var(B)/n_B)   (sample variances)
    holds     if diff >  2 se  (and both cells have >= 3 seeds)
    reversed  if diff < -2 se
    unresolved otherwise (the seeds cannot tell the two apart)

DSKD's claim (paper 004: the global student catches the logical anomalies a local student misses, and the two
together beat either) is checked the same way on the per-seed JSON files of `benchmarks/dskd_logical.py --parts
logical --seed S` given with --dskd (a generated MVTec-LOCO-style category; each file one seed).

SNL's claim (paper 003's abstract: in multi-class training SNL does better than multi-class RD, narrowing the gap
to one RD per category) is checked on the per-seed files of `benchmarks/multiclass.py --seed S --runs rd_multi
rd_one_<each category> snl_multi` given with --multiclass: the mean over categories of each run, per seed.

Two standard errors is a rough 95 % bar for 3 seeds a side, not a formal test; the JSON keeps every seed's
value so a reader can apply another rule. Nothing is reported as holding on fewer than 3 seeds.

Run: python benchmarks/claims.py [--out benchmarks/results/claims.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from _common import RESULTS, quality_files, quality_runs

# (better, worse, source): the relative claims of the papers in ../shared/papers/ on one-class MVTec-style data
CLAIMS = (
    ("urd_cpu", "rdpp_cpu", "URD (paper 001, Tables 1-2: above RD++ on every dataset)"),
    ("urd_cpu", "rd_cpu_l123", "URD (paper 001: above RD)"),
    ("rdpp_cpu", "rd_cpu_l123", "RD++ (Tien et al. 2023; paper 001's retrained RD/RD++ columns)"),
)
METRICS = ("image_auroc", "pixel_auroc", "au_pro")
MIN_SEEDS = 3


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else float("nan")
    return mean, var


def verdict(a: list[float], b: list[float]) -> dict[str, Any]:
    """The claim 'a > b' on per-seed values: means, difference, its standard error and the verdict."""
    (ma, va), (mb, vb) = _stats(a), _stats(b)
    diff = ma - mb
    out: dict[str, Any] = {"better": a, "worse": b, "mean_better": round(ma, 4), "mean_worse": round(mb, 4),
                           "diff": round(diff, 4)}
    if min(len(a), len(b)) < MIN_SEEDS:
        return {**out, "se": None, "verdict": f"not tested (fewer than {MIN_SEEDS} seeds)"}
    se = math.sqrt(va / len(a) + vb / len(b))
    word = "holds" if diff > 2 * se else "reversed" if diff < -2 * se else "unresolved"
    return {**out, "se": round(se, 4), "verdict": word}


def check(runs: list[dict[str, Any]], half: str = "report") -> list[dict[str, Any]]:
    """One row per (claim, category, metric) for the categories where both cells have runs."""
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(runs, key=lambda r: r["seed"]):
        for m in METRICS:
            v = r[half].get(m)
            if v is not None:
                values[(r["cell"], r["category"])][m].append(float(v))
    rows = []
    for better, worse, source in CLAIMS:
        for category in sorted({c for _, c in values}):
            a, b = values.get((better, category)), values.get((worse, category))
            if not a or not b:
                continue
            for m in METRICS:
                rows.append({"claim": f"{better} > {worse}", "source": source, "category": category, "metric": m,
                             **verdict(a[m], b[m])})
    return rows


DSKD_CLAIMS = (("global", "local"), ("combined", "local"), ("combined", "global"))
DSKD_METRICS = ("image_auroc_logical", "au_spro_logical@0.05", "image_auroc_structural")


def check_dskd(files: list[Path]) -> list[dict[str, Any]]:
    """One row per (training budget, DSKD claim, metric) over the seeds in `files` (each a dskd_logical.py
    result; files with different logical_iters are different budgets)."""
    per: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for f in files:
        doc = json.loads(f.read_text())
        for run in doc["runs"]:
            if run.get("part") == "logical":
                for student, metrics in run["per_student"].items():
                    for m in DSKD_METRICS:
                        per[int(run["iters"])][student][m].append(float(metrics[m]))
    return [{"claim": f"dskd {better} > {worse}", "source": "DSKD (paper 004)",
             "category": f"generated logical, {iters} steps", "metric": m, **verdict(st[better][m], st[worse][m])}
            for iters, st in sorted(per.items()) for better, worse in DSKD_CLAIMS if st[better] and st[worse]
            for m in DSKD_METRICS]


MULTICLASS_CLAIMS = (("snl_multi", "rd_multi", "SNL (paper 003, abstract): multi-class SNL above multi-class RD"),
                     ("rd_one", "rd_multi", "the premise: one RD per category above one multi-class RD"))


def check_multiclass(files: list[Path]) -> list[dict[str, Any]]:
    """One row per (budget, multi-class claim, metric) over the seeds in `files` (each a multiclass.py result;
    files with different multi_class_iters are different budgets)."""
    per: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for f in files:
        doc = json.loads(f.read_text())
        iters = int(doc["budget"]["multi_class_iters"])
        for run in ("snl_multi", "rd_multi", "rd_one"):
            if run in doc["table"] and doc["table"][run].get("complete", True):
                for m in METRICS:
                    per[iters][run][m].append(float(doc["table"][run]["mean"][m]))
    return [{"claim": f"{better} > {worse}", "source": source, "category": f"mean of 4 categories, {iters} steps",
             "metric": m, **verdict(st[better][m], st[worse][m])}
            for iters, st in sorted(per.items()) for better, worse, source in MULTICLASS_CLAIMS
            if st[better] and st[worse] for m in METRICS]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| claim | category | metric | better (mean) | worse (mean) | diff ± se | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        se = "" if r["se"] is None else f" ± {r['se']:.3f}"
        lines.append(f"| {r['claim']} | {r['category']} | {r['metric']} | {r['mean_better']:.3f} | "
                     f"{r['mean_worse']:.3f} | {r['diff']:+.3f}{se} | {r['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", nargs="*", type=Path, help="quality study files (default: the committed study)")
    ap.add_argument("--half", default="report", choices=["selection", "report", "all"])
    ap.add_argument("--out", default=str(RESULTS / "claims.json"))
    ap.add_argument("--dskd", nargs="*", type=Path, default=[], help="dskd_logical.py results, one per seed")
    ap.add_argument("--multiclass", nargs="*", type=Path, default=[], help="multiclass.py results, one per seed")
    args = ap.parse_args()
    files = args.file or quality_files()
    rows = (check(quality_runs(files), args.half) + check_dskd(args.dskd)
            + check_multiclass(args.multiclass))
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/claims.py", "question": "do the papers' relative claims hold here?",
        "source": [*(Path(f).name for f in files), *(f.name for f in args.dskd + args.multiclass)], "half": args.half, "rule": "holds if diff > 2 se, reversed if < -2 se, "
        f"else unresolved; at least {MIN_SEEDS} seeds a side", "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
