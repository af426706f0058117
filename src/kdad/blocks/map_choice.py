"""How far a map's division by the normals' mean map is shrunk, chosen from the held-out normals alone
(``model.map_norm_shrink: auto``; docs/methods/rd.md, "Map normalisation", and docs/quality.md, "Session 43").

The best shrink depends on the product: the plain division (0) finds the faint stains of an aligned part whose
normals err in a fixed pattern; the raw map (1: a division by one constant) is better on textures and localises a
part on a backdrop the student reconstructs almost exactly. A user has no defects to choose with, so the choice is
made on synthetic anomalies pasted onto the held-out normals: RD++'s simplex-noise boxes (full and a quarter of
the amplitude), CutPaste patches and scars, and Perlin-masked patches of other held-out normals (no texture folder
needed). Two-fold: the mean map comes from one half of the normals, each candidate is scored on the other half and
its synthetic variants (as fit's cross-fitted thresholds), then the halves swap. The candidate with the best image
AUROC (clean normals against their variants) wins; candidates within ``TIE`` of it are told apart by AU-PRO.
Session 43 checked the choice on kept runs against the selection sets' real defects (docs/quality.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kdad.metrics import au_pro, image_auroc
from kdad.synthesis import SynthesisConfig, TextureBank, synthesize

AUTO_SHRINKS = (0.0, 0.25, 0.5, 1.0)
"""The candidates: the plain division, two shrunk ones, and 1.0 (a constant divisor: the raw map's ranking)."""
TIE = 0.001
KINDS = {
    "simplex": SynthesisConfig(kind="simplex", simplex_field="fresh", foreground="none"),
    "cutpaste": SynthesisConfig(kind="cutpaste", cutpaste_variant="both", foreground="none"),
    "simplex_faint": SynthesisConfig(kind="simplex", simplex_field="fresh", simplex_amplitude=0.05, foreground="none"),
    "perlin_self": SynthesisConfig(kind="perlin_texture", foreground="none"),
}
MAX_IMAGES = 80  # normals that get synthetic variants: a larger held-out set adds cost, not information
SEED = 0


@dataclass(frozen=True)
class ShrinkChoice:
    """The chosen shrink and every candidate's synthetic image AUROC and AU-PRO (what train_info.json records)."""

    shrink: float
    image_auroc: dict[float, float] = field(default_factory=dict)
    au_pro: dict[float, float] = field(default_factory=dict)
    normals: int = 0
    synthetic: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"shrink": self.shrink, "normals": self.normals, "synthetic": self.synthetic,
                "candidates": {str(s): {"image_auroc": self.image_auroc[s], "au_pro": self.au_pro[s]}
                               for s in self.image_auroc}}


def shrunk_divisor(mean: Tensor, shrink: float, floor: float = 0.0) -> Tensor:
    """What ``map_norm: position`` divides by: the normals' mean map shrunk towards its global mean by `shrink`
    (``map_norm_shrink``), so positions where the normals barely err (a student that reconstructs them well) are
    not divided by near zero, which turns noise into anomalies; then held above `floor` (``map_norm_floor``) times
    the global mean, which unlike the shrink leaves the positions where the normals err about as much as anywhere
    (a texture's frame edges) as they are. Double precision, as the mean is accumulated."""
    mean = mean.double()
    mean = (1.0 - shrink) * mean + shrink * mean.mean()
    return mean.clamp_min(floor * mean.mean())


def synthetic_variants(
    images: Tensor, gen: torch.Generator, variants: int, kinds: Mapping[str, SynthesisConfig] = KINDS,
    textures: TextureBank | None = None, foreground: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """(images (M, 3, H, W), masks (M, H, W) bool, source index (M,), kind name of each) of `variants` per kind
    per image, kind by kind; variants whose mask came out empty are dropped. The kind named "perlin_self" pastes
    patches of the other `images`; other perlin_texture kinds need `textures`. `foreground` (N, 1, H, W): where
    the masks may lie (synthesize's)."""
    own = TextureBank.from_tensor(images)
    imgs, masks, src, names = [], [], [], []
    for name, cfg in kinds.items():
        bank = own if name == "perlin_self" else textures if cfg.kind == "perlin_texture" else None
        for _ in range(variants):
            img, mask = synthesize(images, cfg, gen, bank, foreground=foreground)
            keep = mask.flatten(1).amax(1) > 0.5
            imgs.append(img[keep])
            masks.append(mask[keep, 0] > 0.5)
            src.append(torch.arange(len(images))[keep])
            names += [name] * int(keep.sum())
    return torch.cat(imgs), torch.cat(masks), torch.cat(src), names


@torch.no_grad()
def raw_maps(model: torch.nn.Module, images: Tensor, device: torch.device, batch: int = 16) -> Tensor:
    """(N, H, W) maps of `images`, on the CPU, batch by batch (before any division if `model`'s PositionNorms are
    empty)."""
    return torch.cat([model(images[i:i + batch].to(device)).anomaly_map[:, 0].float().cpu()
                      for i in range(0, len(images), batch)])


def choose_shrink(model: torch.nn.Module, images: Tensor, maps: Tensor, device: torch.device,
                  floor: float = 0.0, batch: int = 16) -> ShrinkChoice:
    """The shrink of :data:`AUTO_SHRINKS` under which synthetic anomalies on `images` (held-out normals in [0, 1],
    (N, 3, H, W)) stand out best; with fewer than 4 the plain division (0) and a warning. `maps`: their raw maps
    (N, H, W), from `model` with every PositionNorm empty, which is also how the synthetic variants are mapped."""
    n = len(images)
    if n < 4:  # e.g. one half of a small held-out set in fit's cross-fitting: nothing to choose on
        warnings.warn(f"map_norm_shrink: auto needs at least 4 held-out normals to choose on, got {n}; "
                      "dividing by the plain mean map", UserWarning, stacklevel=2)
        return ShrinkChoice(0.0, normals=n)
    gen = torch.Generator().manual_seed(SEED)
    pick = torch.randperm(n, generator=gen)[:MAX_IMAGES].sort().values
    variants = 2 if len(pick) <= 40 else 1
    parts = []
    for name, cfg in KINDS.items():  # kind by kind, mapped at once: only the maps and masks are kept (memory)
        img, mask, src, _ = synthetic_variants(images[pick], gen, variants, {name: cfg})
        parts.append((raw_maps(model, img, device, batch), mask, pick[src]))
    s_maps, s_mask, s_src = (torch.cat(p) for p in zip(*parts))
    perm = torch.randperm(n, generator=gen)
    halves = (perm[: n // 2], perm[n // 2:])
    clean_np = np.zeros((n, *maps.shape[1:]), dtype=np.float32)
    syn_np = np.zeros(tuple(s_maps.shape), dtype=np.float32)
    labels = np.concatenate([np.zeros(n), np.ones(len(s_maps))])
    masks = np.concatenate([np.zeros((n, *maps.shape[1:]), dtype=bool), s_mask.numpy()])
    aurocs: dict[float, float] = {}
    pros: dict[float, float] = {}
    for shrink in AUTO_SHRINKS:
        for stats, part in (halves, halves[::-1]):
            div = shrunk_divisor(maps[stats].mean(0), shrink, floor).float().clamp_min(1e-6)
            clean_np[part.numpy()] = (maps[part] / div).numpy()
            rows = torch.isin(s_src, part)
            syn_np[rows.numpy()] = (s_maps[rows] / div).numpy()
        every = np.concatenate([clean_np, syn_np])
        aurocs[shrink] = image_auroc(every.reshape(len(every), -1).max(1), labels)
        pros[shrink] = au_pro(every, masks)
    best = max(aurocs.values())
    near = [s for s in AUTO_SHRINKS if aurocs[s] >= best - TIE]
    return ShrinkChoice(max(near, key=lambda s: pros[s]), aurocs, pros, n, int(len(s_maps)))


__all__ = ["AUTO_SHRINKS", "KINDS", "ShrinkChoice", "choose_shrink", "raw_maps", "shrunk_divisor",
           "synthetic_variants"]
