"""Is RD's or STFPM's failure on an object at random angles (generated screws) a matter of map normalisation?
(issue 18; SELECTION half only: it explains a failure, it chooses nothing.)

Reads a trained run (`kdad fit` / `benchmarks/quality.py` folder holding model.ckpt) and rescores its per-layer
distance maps on the selection half four ways, each layer divided before the head's own fusion and blur:
- raw: no division;
- position: by the held-out normals' mean distance at the same position (``model.map_norm: position``);
- clusterK: by the held-out normals' mean distance among the positions whose teacher feature (L2-normalised,
  pooled as the map's) falls in the same of K k-means clusters, so a screw patch is compared with screw patches
  wherever the screw lies, and the backdrop with the backdrop.
The held-out normals are the run's own (train.val_fraction, its seed). Image score = the map's max.

Run: python benchmarks/cluster_norm.py RUN_DIR [--clusters 8 32 128] [--out results/cluster_norm.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common
import numpy as np
import torch
import torch.nn.functional as F

from kdad.blocks.maps import pool_features
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.data.factory import build_dataset
from kdad.metrics import image_auroc
from kdad.train import train_val_datasets


@torch.inference_mode()
def layer_features(model: torch.nn.Module, ds: object, idx: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pooled teacher features and per-layer distance maps of `ds[idx]`, each a list over layers."""
    head = model.head  # type: ignore[attr-defined]
    feats: list[list[torch.Tensor]] = []
    maps: list[list[torch.Tensor]] = []
    for i in range(0, len(idx), 8):
        x = torch.stack([ds[j]["image"] for j in idx[i:i + 8]])  # type: ignore[index]
        t, s = model.pairs(x)  # type: ignore[attr-defined]
        feats.append([f.float() for f in pool_features(t, head.pool)])
        maps.append(head.layer_maps(t, s))
    return ([torch.cat([b[k] for b in feats]) for k in range(len(feats[0]))],
            [torch.cat([b[k] for b in maps]) for k in range(len(maps[0]))])


def kmeans(x: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Plain Lloyd iterations from k random rows (seeded by the caller); (k, C) centres."""
    c = x[torch.randperm(len(x))[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    return c


def rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + 8192], c).argmin(1) for i in range(0, len(x), 8192)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--clusters", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_common.RESULTS / "cluster_norm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, cfg = model_from_bundle(load_bundle(Path(args.run) / "model.ckpt"))
    model.eval()
    head = model.head  # type: ignore[attr-defined]
    _, val, _ = train_val_datasets(cfg)
    if val is None:
        raise SystemExit(f"{args.run}: the run has no held-out normals (train.val_fraction=0)")
    test = build_dataset(cfg.data, "test")
    sel, _ = _common.halves(test, seed=_common.SPLIT_SEED)
    t_val, m_val = layer_features(model, val, list(range(len(val))))  # type: ignore[arg-type]
    t_sel, m_sel = layer_features(model, test, sel)
    types = np.asarray([test.samples[j].defect_type for j in sel])
    labels = (types != "good").astype(int)
    size = (cfg.data.image_size, cfg.data.image_size)

    def score(maps: list[torch.Tensor]) -> dict[str, object]:
        s = head.fuse_maps(maps, size).flatten(1).amax(1).numpy()  # the head's own fusion (STFPM multiplies)
        by_type = {t: round(float(image_auroc(s[(types == t) | (types == "good")],
                                              labels[(types == t) | (types == "good")])), 3)
                   for t in sorted(set(types)) if t != "good"}
        return {"image_auroc": round(float(image_auroc(s, labels)), 4), "by_type": by_type}

    result: dict[str, object] = {"raw": score(m_sel),
                                 "position": score([m / v.mean(0, keepdim=True) for m, v in zip(m_sel, m_val)])}
    for k in args.clusters:
        normed = []
        for tv, mv, ts, ms in zip(t_val, m_val, t_sel, m_sel):
            xv, xs = F.normalize(rows_of(tv), dim=1), F.normalize(rows_of(ts), dim=1)
            centres = kmeans(xv[torch.randperm(len(xv))[:50000]], k)
            assign, dist = nearest(xv, centres), rows_of(mv)[:, 0]
            means = torch.stack([dist[assign == j].mean() if (assign == j).any() else dist.mean()
                                 for j in range(k)]).clamp_min(1e-6)
            normed.append(ms / means[nearest(xs, centres)].view(ms.shape[0], 1, *ms.shape[-2:]))
        result[f"cluster{k}"] = score(normed)
    row = {"run": str(args.run), "method": cfg.method, "category": Path(cfg.data.root).name,
           "train_seed": cfg.train.seed, "half": "selection", "scores": result, "meta": _common.metadata()}
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {
        "command": "python benchmarks/cluster_norm.py RUN_DIR", "question": __doc__.split("\n")[0], "rows": []}
    doc["rows"].append(row)
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
