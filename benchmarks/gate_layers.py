"""Why the invalid-input gate is per layer (docs/operating_point.md, "Why per layer"): with few normals, how far
real bottle photos lie from a demo model's normals, as a multiple of the held-out normals' highest score, per
Lite0 layer and for the concatenated and per-layer statistics.

Setting of tests/test_gate.py::test_demo_model_calls_real_bottle_photos_invalid: make_demo_dataset(n_train=24),
the first 18 training images fit, the last 6 are held out; 10 real bottle test normals are the foreign images.
Frozen teacher only (no training), so it runs in about a minute on one core.

    OMP_NUM_THREADS=1 python benchmarks/gate_layers.py --out benchmarks/results/gate_layers.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common
import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from kdad.blocks.teachers import build_encoder
from kdad.data.demo import make_demo_dataset
from kdad.data.transforms import load_image
from kdad.gate import block_precision, pool_layers

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test" / "good"


def _load(folder: Path, n: int) -> torch.Tensor:
    return torch.stack([load_image(f, 256) for f in sorted(folder.glob("*.png"))[:n]])


def _scores(fit: np.ndarray, widths: list[int], *others: np.ndarray) -> list[np.ndarray]:
    mean, precision = block_precision(fit, widths)
    return [np.sqrt(np.einsum("ij,jk,ik->i", x - mean, precision, x - mean)) for x in others]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gate_layers.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_dataset(Path(tmp) / "d", n_train=24, n_test_good=2, n_test_bad=2, kind="object")
        train, bottle = _load(demo / "train" / "good", 24), _load(BOTTLE, 10)
    enc = build_encoder("efficientnet_lite0", [1, 2, 3, 4])
    with torch.no_grad():
        feats = {k: [pool_layers([f]).double().numpy() for f in enc.features(x)]
                 for k, x in (("fit", train[:18]), ("held_out", train[18:]), ("bottle", bottle))}
    rows = []
    for i in range(4):  # each layer alone
        lw = LedoitWolf().fit(feats["fit"][i])
        cal, bot = (np.sqrt(np.einsum("ij,jk,ik->i", f[i] - lw.location_, lw.precision_, f[i] - lw.location_))
                    for f in (feats["held_out"], feats["bottle"]))
        rows.append({"layers": [i + 1], "statistic": "one layer", "dims": int(feats["fit"][i].shape[1]),
                     "bottle_min_over_held_out_max": round(float(bot.min() / cal.max()), 2)})
    for layers in ([1, 2, 3], [2, 3, 4], [2, 3], [1, 2, 3, 4]):
        cat = {k: np.concatenate([v[i - 1] for i in layers], axis=1) for k, v in feats.items()}
        widths = [feats["fit"][i - 1].shape[1] for i in layers]
        for name, blocks in (("concatenated", [sum(widths)]), ("per layer", widths)):
            cal, bot = _scores(cat["fit"], blocks, cat["held_out"], cat["bottle"])
            rows.append({"layers": layers, "statistic": name, "dims": sum(widths),
                         "bottle_min_over_held_out_max": round(float(bot.min() / cal.max()), 2)})
    for r in rows:
        print(json.dumps(r))
    doc = {"command": "OMP_NUM_THREADS=1 python benchmarks/gate_layers.py --out " + args.out,
           "question": __doc__.split("\n")[0], "margin_of_the_gate": 8, "rows": rows, "meta": _common.metadata()}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
