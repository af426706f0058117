"""How an RD-family model's map is read out, varied after training (no retraining): does another image score
or another way of adding up the teacher layers close the gap to the probe? (docs/quality.md, "Session 28")

Fits the cell (quality.py's syntax) into --run unless a model is there already, then computes each teacher
layer's distance map (resized to the input and blurred, as the preset's head does) for the held-out normals of
fit's split and for the test images, and scores on the quality study's selection and report halves:
- the image score: the map's max (the presets'), or the mean of its top 0.1 %, 1 % or 3 % of pixels;
- the layers' sum: raw; over the normals' mean of the sum (the preset's `map_norm: position`); each layer over
  its own normals' mean; each layer standardised by the normals' mean and std per position; the sum standardised;
  each single layer and each pair over its normals' mean;
- with --features (session 29): the distance between teacher and student features, as cosine (the preset's), as
  the squared distance of the raw features or of features standardised per channel by the held-out normals'
  teacher statistics, as the log ratio of their norms, and cosine plus each of these (each layer over its normals'
  mean); and the cosine map averaged over horizontally and vertically flipped inputs (test-time flips).

Run: python benchmarks/map_readout.py --cell rd_cpu --category magnetic_tile --seed 0 --run /tmp/x --out F [--features]
(the rows append to F; models with `data.align` on are refused: the layers would have to be warped back too)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F
from quality import add_cell_args, fitted_cell
from sklearn.metrics import roc_auc_score
from torch import Tensor

from kdad.blocks.maps import cosine_distance
from kdad.data.factory import build_dataset
from kdad.train import train_val_datasets

TOPS = (0.0, 0.001, 0.01, 0.03)  # 0 = the max


@torch.inference_mode()
def layer_maps(model: Any, ds: Any, batch: int = 16) -> np.ndarray:
    """(N, L, H, W) float32: each layer's blurred distance map at the input size, before any normalisation."""
    head, out = model.head, []
    for i in range(0, len(ds), batch):
        x = torch.stack([ds[j]["image"] for j in range(i, min(i + batch, len(ds)))])
        teacher, student = model.pairs(x)
        maps = [head.blur(F.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear",
                                        align_corners=head.align_corners)) for m in head.layer_maps(teacher, student)]
        out.append(torch.cat(maps, 1).numpy())
    return np.concatenate(out)


FLIPS = {"none": (), "horizontal": (-1,), "vertical": (-2,), "both": (-2, -1)}


@torch.inference_mode()
def features(model: Any, ds: Any, flip: tuple[int, ...] = (), batch: int = 16) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher and student features (fp32, per layer, all images) of `ds`, the inputs flipped along `flip`."""
    teach: list[list[Tensor]] = []
    stud: list[list[Tensor]] = []
    for i in range(0, len(ds), batch):
        x = torch.stack([ds[j]["image"] for j in range(i, min(i + batch, len(ds)))])
        t, s = model.pairs(x.flip(flip) if flip else x)
        teach.append([a.float() for a in t])
        stud.append([a.float() for a in s])
    return [torch.cat(a) for a in zip(*teach)], [torch.cat(a) for a in zip(*stud)]


def distances(t: Sequence[Tensor], s: Sequence[Tensor], sd: Sequence[Tensor]) -> dict[str, list[Tensor]]:
    """Per-layer (N, 1, h, w) distance maps by kind; `sd`: the normals' per-channel teacher std per layer."""
    def lognorm(a: Tensor) -> Tensor:
        return a.norm(dim=1, keepdim=True).clamp_min(1e-6).log()
    return {"cosine": [cosine_distance(a, b) for a, b in zip(t, s)],
            "squared, raw": [(a - b).square().mean(1, keepdim=True) for a, b in zip(t, s)],
            "squared, standardised": [((a - b) / d).square().mean(1, keepdim=True) for a, b, d in zip(t, s, sd)],
            "log norm ratio": [(lognorm(a) - lognorm(b)).abs() for a, b in zip(t, s)]}


@torch.inference_mode()
def resized(head: Any, maps: Sequence[Tensor], size: tuple[int, int], flip: tuple[int, ...] = ()) -> np.ndarray:
    """(N, L, H, W): per-layer maps resized to the input and blurred as the head does, flipped back."""
    out = [head.blur(F.interpolate(m, size=size, mode="bilinear", align_corners=head.align_corners)) for m in maps]
    cat = torch.cat(out, 1)
    return (cat.flip(flip) if flip else cat).numpy()


def feature_readouts(model: Any, val: Any, test: Any) -> dict[str, np.ndarray]:
    """Name -> (N, H, W) test map: other feature distances and test-time flips, each over the normals' mean."""
    size = tuple(test[0]["image"].shape[-2:])
    head, out, per = model.head, {}, {}
    vt, vs = features(model, val)
    sd = [a.std((0, 2, 3), keepdim=True) + 1e-6 for a in vt]  # the teacher's spread per channel on the normals
    vd, td = distances(vt, vs, sd), distances(*features(model, test), sd)
    for kind in vd:
        v, t = resized(head, vd[kind], size), resized(head, td[kind], size)
        per[kind] = t / np.maximum(v.mean(0), 1e-8)
        if kind == "cosine":  # the unflipped sum over layers, for the flips below
            vflip, tflip = {"none": v.sum(1)}, {"none": t.sum(1)}
        out[f"{kind}, each layer over its normals' mean"] = per[kind].sum(1)
    for kind in ("squared, raw", "squared, standardised", "log norm ratio"):
        out[f"cosine + {kind}, each over its mean"] = per["cosine"].sum(1) + per[kind].sum(1)
    # the cosine summed over layers for each flip of the inputs, flipped back
    for name, flip in list(FLIPS.items())[1:]:
        for ds, into in ((val, vflip), (test, tflip)):
            t, s = features(model, ds, flip)
            into[name] = resized(head, [cosine_distance(a, b) for a, b in zip(t, s)], size, flip).sum(1)
    for name, keys in (("inputs flipped horizontally", ["horizontal"]),
                       ("averaged over no flip and horizontal", ["none", "horizontal"]),
                       ("averaged over the 4 flips", list(FLIPS))):
        v, t = np.mean([vflip[k] for k in keys], 0), np.mean([tflip[k] for k in keys], 0)
        out[f"cosine, {name}, sum over the normals' mean"] = t / np.maximum(v.mean(0), 1e-8)
    return out


def image_score(maps: np.ndarray, top: float) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    if top == 0:
        return flat.max(1)
    k = max(1, int(round(flat.shape[1] * top)))
    return -np.sort(-flat, 1)[:, :k].mean(1)


def readouts(val: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> (N, H, W) map of the test images, from the per-layer maps of the normals and the test images."""
    mu, sd = val.mean(0), val.std(0) + 1e-6
    vsum = val.sum(1)
    out = {"sum, raw": test.sum(1),
           "sum over the normals' mean (map_norm: position)": test.sum(1) / np.maximum(vsum.mean(0), 1e-6),
           "each layer over its normals' mean": (test / mu).sum(1),
           "each layer standardised": ((test - mu) / sd).sum(1),
           "sum standardised": (test.sum(1) - vsum.mean(0)) / (vsum.std(0) + 1e-6)}
    n = test.shape[1]
    for r in range(1, n):
        for sub in itertools.combinations(range(n), r):
            out[f"layers {[i + 1 for i in sub]} of {n}, each over its mean"] = (test[:, sub] / mu[list(sub)]).sum(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_cell_args(ap)
    ap.add_argument("--features", action="store_true", help="also the feature distances and test-time flips")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name, preset, overrides, model, cfg = fitted_cell(args)
    if cfg.data.align != "none":
        raise SystemExit(f"{args.run}: data.align={cfg.data.align}; this readout works on unaligned models only")
    _, val, _ = train_val_datasets(cfg)
    test = build_dataset(cfg.data, "test")
    labels = np.array([s.label for s in test.samples])
    sel, rep = _common.halves(test)
    vmaps, tmaps = layer_maps(model, val), layer_maps(model, test)
    rows = []
    maps_by = readouts(vmaps, tmaps)
    if args.features:
        maps_by |= feature_readouts(model, val, test)
    for readout, maps in maps_by.items():
        for top in TOPS:
            s = image_score(maps, top)
            rows.append({"readout": readout, "image_score": "max" if top == 0 else f"top {top:.1%} mean",
                         "selection": float(roc_auc_score(labels[sel], s[sel])),
                         "report": float(roc_auc_score(labels[rep], s[rep]))})
    for r in rows:
        print(f"{r['readout']:50s} {r['image_score']:15s} {r['selection']:.3f} / {r['report']:.3f}")
    _common.append_run(args.out, "does another image score or layer sum of a trained RD-family model beat its "
                       "preset's map (image AUROC on the selection / report halves)",
                       {"cell": name, "preset": preset, "overrides": overrides, "category": args.category,
                        "seed": args.seed, "held_out_normals": len(vmaps), "rows": rows, "features": args.features})


if __name__ == "__main__":
    main()
