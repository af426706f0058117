"""Can the held-out normals alone say how a kept RD run should read its map? (docs/quality.md, "Session 43")

`model.map_norm` and its shrink and floor act after training (benchmarks/renorm_cell.py). Which reading is best
depends on the product: the plain division finds the aligned screws' faint stains, the raw map is better on the
textures and localises bottle. A user has no defective images to choose with, only the held-out normals. This
script asks whether synthetic anomalies pasted onto those normals (kdad.synthesis: DRAEM's Perlin-masked DTD
textures, RD++'s simplex noise boxes, CutPaste patches and scars; generic, not drawn like any set's defects)
rank the readings as the real defects of the selection sets do.

For one kept run: the raw maps of the held-out normals (every PositionNorm emptied) and of synthetic variants of
them; two-fold cross-fitting (the mean map from one half, the readings scored on the other, as fit's
cross-fitted thresholds), so no normal is divided by a mean that contains it. Per reading: image AUROC of the
clean normals against their synthetic variants, and AU-PRO of the synthetic masks, per synthesis kind and over all.
With data.align_region part the synthetic masks lie on the part's envelope and the map is restricted to it, as
the deployed score is.

Run: python benchmarks/reading_by_synthetic.py --run RUN --category C --seed S --out F [--variants 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
from torch import Tensor

from kdad.align import AlignSpec, restrict_to_part
from kdad.blocks.map_choice import raw_maps, shrunk_divisor, synthetic_variants
from kdad.blocks.maps import PositionNorm
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.metrics import au_pro, image_auroc
from kdad.synthesis import SynthesisConfig, TextureBank
from kdad.train import train_val_datasets

# (shrink, floor, divide): the readings of sessions 41-42
READINGS: dict[str, tuple[float, float, bool]] = {
    "position": (0.0, 0.0, True),
    "shrink025": (0.25, 0.0, True),
    "shrink05": (0.5, 0.0, True),
    "floor05": (0.0, 0.5, True),
    "none": (0.0, 0.0, False),
}
KINDS: dict[str, SynthesisConfig] = {name: SynthesisConfig(**kw, foreground="none") for name, kw in {
    "perlin_texture": {"kind": "perlin_texture"},
    "simplex": {"kind": "simplex", "simplex_field": "fresh"},
    "cutpaste": {"kind": "cutpaste", "cutpaste_variant": "both"},
    # the same at a quarter or less of the strength: the full-strength ones are found by every reading
    "perlin_faint": {"kind": "perlin_texture", "beta_range": (0.8, 0.95)},
    "simplex_faint": {"kind": "simplex", "simplex_field": "fresh", "simplex_amplitude": 0.05},
    # Perlin-masked patches of other held-out normals: needs no texture folder (fit's kinds: map_choice.KINDS)
    "perlin_self": {"kind": "perlin_texture"},
}.items()}
# pooled sets of kinds: every kind, and the kinds that need no texture folder (what fit can always make)
POOLS = {"all": ("perlin_texture", "simplex", "cutpaste", "perlin_faint", "simplex_faint"),
         "no_texture": ("simplex", "cutpaste", "simplex_faint", "perlin_self")}


QUESTION = ("does the ranking of map readings on synthetic anomalies pasted onto the held-out normals follow the real "
            "defects? (docs/quality.md, \"Session 43\")")


def divisor(mean: Tensor, reading: str) -> Tensor | None:
    """What `reading` divides a raw map by (kdad's formula), None: raw."""
    shrink, floor, divide = READINGS[reading]
    return shrunk_divisor(mean, shrink, floor).float().clamp_min(1e-6) if divide else None


def read(maps: Tensor, div: Tensor | None, envelope: Tensor | None) -> Tensor:
    out = maps if div is None else maps / div
    return out if envelope is None else restrict_to_part(out[:, None], envelope)[:, 0]


def study(run: Path, variants: int, seed: int, region: bool = True) -> dict[str, Any]:
    model, cfg = model_from_bundle(load_bundle(run / "model.ckpt"))
    for m in model.modules():
        if isinstance(m, PositionNorm):
            m.mean = torch.zeros(0)
    _, val_ds, _ = train_val_datasets(cfg)
    if val_ds is None:
        raise SystemExit(f"{run}: no held-out normals (train.val_fraction 0)")
    clean = torch.stack([val_ds[i]["image"] for i in range(len(val_ds))])  # type: ignore[arg-type]
    spec = AlignSpec.from_data(cfg.data)
    envelope = None if spec is None or not region else spec.envelope_mask()
    fg = None if envelope is None else envelope[None, None].float().expand(len(clean), 1, *envelope.shape)
    n = len(clean)
    gen = torch.Generator().manual_seed(seed)
    textures = TextureBank(cfg.data.texture_dir or str(_common.TEXTURES), cfg.data.image_size)
    s_img, s_mask, s_src, syn_kind = synthetic_variants(clean, gen, variants, KINDS, textures, fg)
    cpu = torch.device("cpu")
    c_maps, s_maps = raw_maps(model, clean, cpu), raw_maps(model, s_img, cpu)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    halves = (perm[: n // 2], perm[n // 2:])
    kinds = np.array(syn_kind)
    out: dict[str, Any] = {"held_out": n, "synthetic": int(len(s_img)),
                           "per_kind": {k: int((kinds == k).sum()) for k in KINDS}, "readings": {}}
    for reading in READINGS:
        c_read = torch.empty_like(c_maps)
        s_read = torch.empty_like(s_maps)
        for stats, part in (halves, halves[::-1]):
            div = divisor(c_maps[stats].mean(0), reading)
            c_read[part] = read(c_maps[part], div, envelope)
            rows = torch.isin(s_src, torch.tensor(part))
            s_read[rows] = read(s_maps[rows], div, envelope)
        c_np, s_np, m_np = c_read.numpy(), s_read.numpy(), s_mask.numpy()
        c_sc, s_sc = c_np.reshape(n, -1).max(1), s_np.reshape(len(s_np), -1).max(1)
        res: dict[str, Any] = {}
        for kind in [*KINDS, *POOLS]:
            sel = np.isin(kinds, POOLS[kind]) if kind in POOLS else kinds == kind
            scores = np.concatenate([c_sc, s_sc[sel]])
            labels = np.concatenate([np.zeros(n), np.ones(int(sel.sum()))])
            maps = np.concatenate([c_np, s_np[sel]])
            masks = np.concatenate([np.zeros_like(c_np, dtype=bool), m_np[sel]])
            res[kind] = {"image_auroc": image_auroc(scores, labels), "au_pro": au_pro(maps, masks)}
        out["readings"][reading] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a kept study run folder (model.ckpt)")
    ap.add_argument("--category", required=True)
    ap.add_argument("--seed", type=int, required=True, help="the run's seed (its row's key)")
    ap.add_argument("--variants", type=int, default=2, help="synthetic variants of each normal per kind")
    ap.add_argument("--synth-seed", type=int, default=0)
    ap.add_argument("--no-region", action="store_true", help="ignore data.align_region (the whole frame)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = study(Path(args.run), args.variants, args.synth_seed, not args.no_region)
    row = {"run": args.run, "category": args.category, "seed": args.seed, "variants": args.variants,
           "synth_seed": args.synth_seed, "region": not args.no_region, **res, **_common.metadata(threads=args.threads)}
    print(json.dumps({r: {k: round(v["image_auroc"], 4) for k, v in d.items()}
                      for r, d in res["readings"].items()}), flush=True)
    _common.append_run(args.out, QUESTION, row)


if __name__ == "__main__":
    main()
