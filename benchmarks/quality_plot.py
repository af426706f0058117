"""Image AUROC and AU-PRO against training minutes, per cell, from benchmarks/results/quality.json (one point per
seed, report half), with the kNN probe's mean as a line. Writes docs/quality_vs_minutes.png.

Run: python benchmarks/quality_plot.py [--category magnetic_tile] [--out docs/quality_vs_minutes.png]
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import RESULTS, ROOT, quality_runs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality_vs_minutes.png"))
    args = ap.parse_args()
    runs = [r for r in quality_runs() if r["category"] == args.category]
    probe = [r for r in json.loads((RESULTS / "probe_knn.json").read_text())["runs"] if r["category"] == args.category]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    cells = sorted({r["cell"] for r in runs})
    for ax, key, label in ((axes[0], "image_auroc", "image AUROC"), (axes[1], "au_pro", "AU-PRO")):
        for i, cell in enumerate(cells):
            rows = [r for r in runs if r["cell"] == cell]
            ax.scatter([r["train_minutes"] for r in rows], [r["report"][key] for r in rows], label=cell,
                       color=f"C{i % 10}", marker="os^D"[i // 10 % 4], s=22)  # 10 colours, then a new marker
        if probe:
            ax.axhline(float(np.mean([r["report"][key] for r in probe])), color="k", ls="--", lw=1, label="kNN probe")
        ax.set_xlabel("training minutes (one pinned core, loaded machine)")
        ax.set_ylabel(f"{label}, report half")
        ax.grid(alpha=0.3)
    # beside the plots, not over them: the study has more cells than a corner holds
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 + len(cells) // 14)
    fig.suptitle(f"{args.category}: quality against training time, one point per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
