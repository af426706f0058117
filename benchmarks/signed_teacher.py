"""How far a non-negative student can get from a signed teacher (docs/methods/rd.md, "Signed teachers").

RD4AD's decoder blocks end in a ReLU, so the student's features are never negative. A ResNet teacher's features are
post-ReLU, so they can be matched; EfficientNet-Lite's stage outputs are linear projections (no activation), so
part of each feature vector can never be matched. This measures, on a category's training images, per teacher layer:
the share of negative values, and the best cosine a non-negative vector reaches to the teacher's (the ReLU of the
teacher vector is the closest non-negative vector in angle): per position (the paper's loss, the map) and of the
whole flattened C*H*W map (the official loss). Nothing is trained; no test image is read.

Run: python benchmarks/signed_teacher.py [--teachers efficientnet_lite0 efficientnet_lite2] [--categories
     magnetic_tile bottle] [--images 64] [--out benchmarks/results/signed_teacher.json]
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.nn.functional as F

from kdad.blocks.teachers import build_encoder
from kdad.config import DataConfig
from kdad.data.factory import build_dataset


def layer_stats(t: torch.Tensor) -> dict[str, float]:
    """Share of negative values and the cosines of t to its ReLU (per position, and whole flattened maps)."""
    r = t.clamp(min=0)
    per_position = F.cosine_similarity(t, r, dim=1, eps=1e-12)
    flat = F.cosine_similarity(t.flatten(1), r.flatten(1), dim=1, eps=1e-12)
    return {"channels": int(t.shape[1]), "negative_share": float((t < 0).float().mean()),
            "cos_to_relu_per_position": float(per_position.mean()), "cos_to_relu_flattened": float(flat.mean()),
            "loss_floor_flattened": float(1.0 - flat.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--layers", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--categories", nargs="+", default=["magnetic_tile", "bottle"])
    ap.add_argument("--images", type=int, default=64, help="the first N training images of each category")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(_common.RESULTS / "signed_teacher.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for category in args.categories:
        ds = build_dataset(DataConfig(root=str(_common.CATEGORIES[category]), image_size=256), "train")
        images = torch.stack([ds[i]["image"] for i in range(min(args.images, len(ds)))])
        for name in args.teachers:
            enc = build_encoder(name, tuple(args.layers), weights="imagenet", frozen=True).eval()
            with torch.no_grad():
                feats = [torch.cat(parts) for parts in zip(*(enc(enc.normalize(images[i:i + 16]))
                                                             for i in range(0, len(images), 16)))]
            for layer, t in zip(args.layers, feats):
                row = {"category": category, "teacher": name, "layer": layer, "images": len(images),
                       **layer_stats(t)}
                rows.append(row)
                print(f"{category} {name} layer {layer}: negative {row['negative_share']:.2f}, cos to ReLU "
                      f"{row['cos_to_relu_per_position']:.3f} per position, {row['cos_to_relu_flattened']:.3f} "
                      "flattened")
    _common.write_json(args.out, {"question": "how close a non-negative (ReLU) student can come to each teacher "
                                              "layer, by cosine", "meta": _common.metadata(), "rows": rows})


if __name__ == "__main__":
    main()
