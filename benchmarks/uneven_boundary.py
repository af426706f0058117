"""Where magnetic_tile's AU-PRO is lost (issue 18): the kNN probe's map on the "uneven" defects, which mark a whole
band of the tile, and one try at a map that could cover such a band. SELECTION half only (it explains a gap; it
chooses nothing for a preset).

The probe of benchmarks/probe_knn.py (frozen Lite0 layers 2-3, 3x3 pooled, 40k random training patches, blur
sigma 4). Rows:
- AU-PRO over all defect types and without "uneven";
- for uneven images, how far the map's peak lies from the mask's boundary (the frame of the image excluded);
- AU-PRO of uneven when its ground truth is replaced by a 12-px strip on both sides of the boundary;
- an intra-image reference map: each patch's distance to its own image's per-channel median feature (a band
  unlike the rest of its tile would stand out), alone and added to the probe's map, each divided by its mean over
  40 held-out training images.

Run: python benchmarks/uneven_boundary.py [--seed 0] [--out results/uneven_boundary.json]
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
from scipy import ndimage

from kdad.blocks.maps import GaussianBlur
from kdad.blocks.teachers import build_encoder
from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.metrics import au_pro, image_auroc

STRIP_PX = 12  # half-width of the boundary strip used as an alternative ground truth
NEAR_PX = 16  # a peak this close to the boundary counts as "on the boundary"


@torch.inference_mode()
def embed_all(enc: torch.nn.Module, ds: object, idx: list[int]) -> torch.Tensor:
    return torch.cat([embed(enc, torch.stack([ds[j]["image"] for j in idx[i:i + 16]]))  # type: ignore[index]
                      for i in range(0, len(idx), 16)])


def nn_map(e: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features -> (B, h, w) distance to the nearest memory row."""
    b, c, h, w = e.shape
    q = e.permute(0, 2, 3, 1).reshape(-1, c)
    return torch.cat([torch.cdist(q[k:k + 4096], bank).min(1).values for k in range(0, len(q), 4096)]).view(b, h, w)


def median_map(e: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w) distance of each patch to its own image's per-channel median feature."""
    b, c, h, w = e.shape
    x = e.reshape(b, c, -1)
    return (x - x.median(2, keepdim=True).values).norm(dim=1).view(b, h, w)


def boundary_distance(mask: np.ndarray) -> np.ndarray:
    """Distance (px) of every pixel to the mask's boundary inside the image (the image frame is not a boundary)."""
    edge = mask ^ ndimage.binary_erosion(mask, iterations=1)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = False
    return np.asarray(ndimage.distance_transform_edt(~edge))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_common.RESULTS / "uneven_boundary.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    enc = build_encoder("efficientnet_lite0", (2, 3), weights="imagenet", frozen=True)
    data = DataConfig(root=str(_common.CATEGORIES["magnetic_tile"]), image_size=256)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    sel, _ = _common.halves(test, seed=_common.SPLIT_SEED)
    perm = torch.randperm(len(train)).tolist()
    held, fit = perm[:40], perm[40:]
    f_fit = embed_all(enc, train, fit)
    bank = f_fit.permute(0, 2, 3, 1).reshape(-1, f_fit.shape[1])
    bank = bank[torch.randperm(len(bank))[:40000]]
    del f_fit
    f_held, f_sel = embed_all(enc, train, held), embed_all(enc, test, sel)
    types = np.asarray([test.samples[j].defect_type for j in sel])
    masks = np.stack([test[j]["mask"][0].numpy() > 0.5 for j in sel])
    labels = (types != "good").astype(int)
    blur = GaussianBlur(4.0)

    def up(m: torch.Tensor) -> np.ndarray:
        return blur(F.interpolate(m[:, None], size=(256, 256), mode="bilinear", align_corners=False))[:, 0].numpy()

    knn_sel, knn_held = nn_map(f_sel, bank), nn_map(f_held, bank)
    med_sel, med_held = median_map(f_sel), median_map(f_held)
    probe = up(knn_sel)
    uneven = np.where(types == "uneven")[0]
    good = types == "good"
    sub = good | (types == "uneven")
    strips, peaks = masks.copy(), []
    for i in uneven:
        if not masks[i].any():
            continue
        dist = boundary_distance(masks[i])
        strips[i] = dist <= STRIP_PX
        peaks.append(float(dist[np.unravel_index(probe[i].argmax(), probe[i].shape)]))
    keep = types != "uneven"

    def scores(mp: np.ndarray) -> dict[str, object]:
        return {"image_auroc": round(float(image_auroc(mp.reshape(len(mp), -1).max(1), labels)), 4),
                "au_pro": round(float(au_pro(mp, masks)), 4),
                "au_pro_uneven": round(float(au_pro(mp[sub], masks[sub])), 4)}

    combined = up(knn_sel / knn_held.mean(0) + med_sel / med_held.mean(0))
    doc = {
        "command": "python benchmarks/uneven_boundary.py", "question": __doc__.split("\n")[0],
        "category": "magnetic_tile", "half": "selection", "seed": args.seed, "n_uneven": int(len(peaks)),
        "probe": scores(probe),
        "probe_au_pro_without_uneven": round(float(au_pro(probe[keep], masks[keep])), 4),
        "uneven_peak_near_boundary_share": round(float(np.mean(np.asarray(peaks) <= NEAR_PX)), 3),
        "uneven_peak_boundary_distance_median_px": round(float(np.median(peaks)), 1),
        "uneven_au_pro_against_boundary_strip": round(float(au_pro(probe[sub], strips[sub])), 4),
        "median_reference": scores(up(med_sel)),
        "probe_plus_median_reference": scores(combined),
        "seconds": round(time.perf_counter() - t0), "meta": _common.metadata(),
    }
    print(json.dumps(doc, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
