"""A floor for the pixel metrics: a map that knows nothing of defects, only how far each pixel's grey level lies
from the training images' median grey level (blurred, sigma 2). On an object on a plain backdrop it lights up the
object, so its pixel AUROC and AU-PRO show how much of a trained map's localisation score the object's own
outline already earns (AU-PRO's false-positive budget of 0.3 is spent on the backdrop before the object).

Run: python benchmarks/trivial_map.py --categories screws brushed magnetic_tile bottle [--out results/trivial_map.json]
No training; both halves of the quality study's split (benchmarks/_common.py) are reported.
"""

from __future__ import annotations

import argparse

import _common
import numpy as np
from scipy.ndimage import gaussian_filter

from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.metrics import au_pro, image_auroc, pixel_auroc


def grey(item: dict) -> np.ndarray:
    return item["image"].mean(0).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["screws", "brushed", "magnetic_tile", "bottle"])
    ap.add_argument("--sigma", type=float, default=2.0)
    ap.add_argument("--out", default=str(_common.RESULTS / "trivial_map.json"))
    args = ap.parse_args()
    rows = []
    for cat in args.categories:
        data = DataConfig(root=str(_common.CATEGORIES[cat]), image_size=256)
        train, test = build_dataset(data, "train"), build_dataset(data, "test")
        level = float(np.median(np.stack([grey(train[i]) for i in range(len(train))])))
        row: dict = {"category": cat, "train_median_grey": round(level, 4)}
        for half, idx in zip(("selection", "report"), _common.halves(test)):
            items = [test[i] for i in idx]
            maps = np.stack([gaussian_filter(np.abs(grey(it) - level), args.sigma) for it in items])
            masks = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
            labels = np.array([int(it["label"]) for it in items])
            row[half] = {"image_auroc": float(image_auroc(maps.reshape(len(maps), -1).max(1), labels)),
                         "pixel_auroc": float(pixel_auroc(maps, masks)), "au_pro": float(au_pro(maps, masks))}
        print(row, flush=True)
        rows.append(row)
    _common.write_json(args.out, {"question": __doc__.split("\n")[0], "sigma": args.sigma, "rows": rows,
                                  "meta": _common.metadata()})


if __name__ == "__main__":
    main()
