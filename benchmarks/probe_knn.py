"""The no-training bar every KD preset must beat: nearest-neighbour distance on frozen teacher features.

Frozen EfficientNet-Lite0 features of layers 2-3 (strides 8, 16), each 3x3 average-pooled, the stride-16 map
upsampled to stride 8 and concatenated; a memory of 40k random patches from the training images; a test
patch's score is its distance to the nearest memory patch; the map is upsampled to the image and blurred
(sigma 4); image score = max. No training, no selection: it reads neither half of the test split to choose.

Run: python benchmarks/probe_knn.py [--categories magnetic_tile bottle] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

import _common as quality_split  # the split logic and data paths live in _common
import numpy as np
import torch
import torch.nn.functional as F

from kdad.blocks.coreset import greedy_coreset
from kdad.blocks.maps import GaussianBlur
from kdad.blocks.teachers import build_encoder
from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.evaluate import Predictions, compute_metrics
from kdad.speed import cpu_has_fast_bf16


@torch.inference_mode()
def embed(enc: torch.nn.Module, images: torch.Tensor, pool: int = 3) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the encoder's layers, each pool x pool averaged (stride 1), upsampled to the first
    layer's grid and concatenated (layers 2-3: (B, C, H/8, W/8))."""
    fs = [F.avg_pool2d(f, pool, 1, pool // 2) if pool > 1 else f for f in enc.features(images)]
    return torch.cat([fs[0]] + [F.interpolate(f, size=fs[0].shape[-2:], mode="bilinear", align_corners=False)
                                for f in fs[1:]], 1)


def run(category: str, seed: int, n_memory: int = 40000, size: int = 256, sampling: str = "random") -> dict[str, object]:
    torch.manual_seed(seed)
    enc = build_encoder("efficientnet_lite0", (2, 3), weights="imagenet", frozen=True)
    data = DataConfig(root=str(quality_split.CATEGORIES[category]), image_size=size)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(train), 16):
        x = torch.stack([train[j]["image"] for j in range(i, min(i + 16, len(train)))])
        e = embed(enc, x)
        feats.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    bank = torch.cat(feats)
    if sampling == "coreset":  # greedy k-centre (kdad.blocks.coreset): rare training patches kept
        bank = bank[greedy_coreset(bank, n_memory, seed=seed, bf16=bool(cpu_has_fast_bf16()))]
    else:
        bank = bank[torch.randperm(len(bank))[:n_memory]]
    fit_s = time.perf_counter() - t0
    blur = GaussianBlur(4.0)
    maps, scores, labels, masks, types, paths = [], [], [], [], [], []
    for i in range(0, len(test), 8):
        items = [test[j] for j in range(i, min(i + 8, len(test)))]
        x = torch.stack([it["image"] for it in items])
        e = embed(enc, x)
        b, c, h, w = e.shape
        q = e.permute(0, 2, 3, 1).reshape(-1, c)
        d = torch.cdist(q, bank).min(1).values.view(b, 1, h, w)
        m = blur(F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False))
        maps.append(m[:, 0].numpy())
        scores.append(m.amax(dim=(1, 2, 3)).numpy())
        labels += [it["label"] for it in items]
        masks.append(np.stack([it["mask"][0].numpy() > 0.5 for it in items]))
        types += [it["defect_type"] for it in items]
        paths += [it["path"] for it in items]
    maps_a, scores_a, masks_a = np.concatenate(maps), np.concatenate(scores), np.concatenate(masks)
    labels_a = np.asarray(labels, dtype=np.int64)
    sel, rep = quality_split.halves(test)
    out: dict[str, object] = {"category": category, "seed": seed, "fit_seconds": fit_s, "memory": n_memory,
                              "sampling": sampling}
    for name, idx in (("selection", sel), ("report", rep)):
        p = Predictions(scores=scores_a[idx], labels=labels_a[idx], paths=[paths[i] for i in idx],
                        defect_types=[types[i] for i in idx], map_means=maps_a[idx].mean((1, 2)),
                        maps=maps_a[idx], masks=masks_a[idx], has_mask=np.ones(len(idx), bool))
        m = compute_metrics(p)
        out[name] = {k: m[k] for k in ("image_auroc", "pixel_auroc", "au_pro")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--categories", nargs="+", default=["magnetic_tile", "bottle"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", type=int, default=40000, help="memory rows (the probe: 40000)")
    ap.add_argument("--sampling", choices=("random", "coreset"), default="random",
                    help="how the memory is drawn from the training patches (the probe: random)")
    ap.add_argument("--out", default=str(quality_split.ROOT / "benchmarks" / "results" / "probe_knn.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for cat in args.categories:
        for s in args.seeds:
            r = run(cat, s, args.memory, sampling=args.sampling)
            print(json.dumps(r), flush=True)
            runs.append(r)
    meta = {"question": "the no-training kNN bar on frozen Lite0 layers 2-3 (3x3 pooled, 40k patches)",
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "split_seed": quality_split.SPLIT_SEED}
    quality_split.write_json(args.out, {**meta, "meta": quality_split.metadata(), "runs": runs})


if __name__ == "__main__":
    main()
