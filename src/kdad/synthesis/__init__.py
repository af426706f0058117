"""Synthetic anomalies for training: one config, one entry point.

- ``"perlin_texture"``: DRAEM Perlin mask + DTD texture blend (URD, Liu et al., AAAI 2025, eq. 7),
  optionally restricted to the object's foreground (URD's per-category Otsu / GrabCut).
- ``"simplex"``: a simplex-noise box added to the image (RD++, Tien et al., CVPR 2023).
- ``"cutpaste"``: CutPaste normal / scar (Li et al., CVPR 2021).

Defaults follow the official codes (see docs in each module); paper values are options:
texture opacity beta in (0.2, 1] (URD/DRAEM code; URD paper eq. 7 says [0.15, 1]: ``BETA_RANGE_PAPER``),
every sample augmented (``clean_prob=0``; DRAEM used 0.5).
Outputs are clamped to [0, 1] (kdad's image contract); RD++ adds its simplex noise without clipping.

Example::

    cfg = SynthesisConfig(kind="perlin_texture", texture_dir="data/dtd/images")
    bank = TextureBank(cfg.texture_dir, 256)
    images_aug, masks = synthesize(images, cfg, torch.Generator().manual_seed(0), bank, "bottle")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from kdad.errors import ConfigError
from kdad.synthesis.cutpaste import cutpaste_normal, cutpaste_scar
from kdad.synthesis.foreground import (
    FOREGROUND_METHODS,
    OTSU_POLARITIES,
    URD_FOREGROUND,
    URD_FOREGROUND_MVTEC,
    URD_FOREGROUND_VISA,
    compute_foreground,
)
from kdad.synthesis.perlin import perlin_masks, perlin_noise_2d
from kdad.synthesis.simplex import fractal_simplex_3d, simplex_noise_3d, simplex_patches
from kdad.synthesis.textures import TextureBank, augment_textures, blend, sample_beta

__all__ = [
    "BETA_RANGE_CODE",
    "BETA_RANGE_PAPER",
    "KINDS",
    "PERLIN_TEXTURE_EVERY_IMAGE",
    "URD_FOREGROUND",
    "URD_FOREGROUND_MVTEC",
    "URD_FOREGROUND_VISA",
    "SynthesisConfig",
    "TextureBank",
    "augment_textures",
    "blend",
    "compute_foreground",
    "cutpaste_normal",
    "cutpaste_scar",
    "fractal_simplex_3d",
    "perlin_masks",
    "perlin_noise_2d",
    "simplex_noise_3d",
    "simplex_patches",
    "synthesize",
]

KINDS = ("perlin_texture", "simplex", "cutpaste")
BETA_RANGE_CODE = (0.2, 1.0)
"""URD/DRAEM official code: texture opacity 1 - b, b ~ U[0, 0.8)."""
BETA_RANGE_PAPER = (0.15, 1.0)
"""URD paper eq. 7 ("following DeSTSeg")."""
CUTPASTE_VARIANTS = ("normal", "scar", "both")
SIMPLEX_FIELDS = ("fixed", "fresh")


@dataclass(frozen=True)
class SynthesisConfig:
    """Every synthesis option; defaults are the official codes' values.

    General:
        kind: "perlin_texture" | "simplex" | "cutpaste".
        clean_prob: probability that an image is left clean (mask 0). URD, RD++, CFRG: 0 (DRAEM: 0.5).
        foreground: "none" | "otsu" | "grabcut", a mapping category -> method (missing categories: "none"),
            or None = the kind's official default (URD's MVTec AD and VisA tables for perlin_texture,
            "none" otherwise).
        otsu_polarity: "dark" (URD's THRESH_BINARY_INV) | "bright" | "auto".
        grabcut_iterations: URD: 11.
    perlin_texture (URD / DRAEM):
        beta_range: texture opacity range (lo, hi]; code (0.2, 1.0), paper (0.15, 1.0).
        perlin_scale_exp: [lo, hi) exponent of the per-axis Perlin resolution 2^k.
        perlin_rotation: rotation U(-r, r) degrees.
        perlin_threshold: noise > threshold is anomalous.
        texture_dir: folder of texture images (DTD layout), used to build a TextureBank.
        texture_augment: DRAEM's 3 random texture ops (URD and CFRG: off).
    simplex (RD++):
        simplex_size_range: [lo, hi) box side in px at 256 px; hi scales with the image (official 10..31).
        simplex_amplitude, simplex_octaves, simplex_persistence, simplex_frequency: 0.2, 6, 0.6, 32.
        simplex_field: "fixed" (official: one field per dataset, top-left crops) | "fresh".
        simplex_seed: seed of the fixed field.
    cutpaste:
        cutpaste_variant: "normal" | "scar" | "both" (50/50 per image).
        cutpaste_area_ratio, cutpaste_aspect_ratio: (0.02, 0.15), 0.3.
        scar_width, scar_length, scar_rotation: (2, 16), (10, 25), 45 degrees.
        cutpaste_jitter: colour jitter strength 0.1.
    """

    kind: str = "perlin_texture"
    clean_prob: float = 0.0
    foreground: str | Mapping[str, str] | None = None
    otsu_polarity: str = "dark"
    grabcut_iterations: int = 11
    beta_range: tuple[float, float] = BETA_RANGE_CODE
    perlin_scale_exp: tuple[int, int] = (0, 6)
    perlin_rotation: float = 90.0
    perlin_threshold: float = 0.5
    texture_dir: str | None = None
    texture_augment: bool = False
    simplex_size_range: tuple[int, int] = (10, 32)
    simplex_amplitude: float = 0.2
    simplex_octaves: int = 6
    simplex_persistence: float = 0.6
    simplex_frequency: float = 32.0
    simplex_field: str = "fixed"
    simplex_seed: int = 0
    cutpaste_variant: str = "normal"
    cutpaste_area_ratio: tuple[float, float] = (0.02, 0.15)
    cutpaste_aspect_ratio: float = 0.3
    scar_width: tuple[int, int] = (2, 16)
    scar_length: tuple[int, int] = (10, 25)
    scar_rotation: float = 45.0
    cutpaste_jitter: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML gives lists; keep tuples so the config stays hashable and frozen.
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        if isinstance(self.foreground, Mapping):  # a plain dict copy, so asdict / YAML dumping work
            object.__setattr__(self, "foreground", dict(self.foreground))
        self._validate()

    def _validate(self) -> None:
        def choice(key: str, valid: tuple[str, ...]) -> None:
            if getattr(self, key) not in valid:
                raise ConfigError(
                    f"synthesis.{key}={getattr(self, key)!r} is not valid; choose one of {valid}"
                )

        choice("kind", KINDS)
        choice("otsu_polarity", OTSU_POLARITIES)
        choice("simplex_field", SIMPLEX_FIELDS)
        choice("cutpaste_variant", CUTPASTE_VARIANTS)
        if not 0.0 <= self.clean_prob <= 1.0:
            raise ConfigError(f"synthesis.clean_prob={self.clean_prob} must lie in [0, 1]")
        lo, hi = self.beta_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"synthesis.beta_range={self.beta_range} must satisfy 0 <= lo <= hi <= 1")
        if not 0 <= self.perlin_scale_exp[0] < self.perlin_scale_exp[1]:
            raise ConfigError(f"synthesis.perlin_scale_exp={self.perlin_scale_exp} must satisfy 0 <= lo < hi")
        methods = self.foreground.values() if isinstance(self.foreground, Mapping) else [self.foreground]
        for m in methods:
            if m is not None and m not in FOREGROUND_METHODS:
                raise ConfigError(f"synthesis.foreground has {m!r}; valid methods are {FOREGROUND_METHODS}")

    def foreground_method(self, category: str | None) -> str:
        """The foreground method ("none" | "otsu" | "grabcut") for a category."""
        fg = self.foreground
        if fg is None:
            fg = URD_FOREGROUND if self.kind == "perlin_texture" else "none"
        if isinstance(fg, str):
            return fg
        return fg.get(category, "none") if category is not None else "none"


def _foreground(images: Tensor, cfg: SynthesisConfig, category: str | Sequence[str] | None) -> Tensor | None:
    """(B, 1, H, W) foreground, or None when no image is restricted; one category or one per image."""
    if category is None or isinstance(category, str):
        method = cfg.foreground_method(category)
        return compute_foreground(images, method, cfg.otsu_polarity, cfg.grabcut_iterations)
    if len(category) != images.shape[0]:
        raise ConfigError(f"got {len(category)} categories for a batch of {images.shape[0]} images")
    methods = [cfg.foreground_method(c) for c in category]
    if all(m == "none" for m in methods):
        return None
    fg = torch.ones(images.shape[0], 1, *images.shape[2:], dtype=images.dtype)
    for method in set(methods) - {"none"}:
        rows = torch.tensor([m == method for m in methods])
        part = compute_foreground(images[rows], method, cfg.otsu_polarity, cfg.grabcut_iterations)
        assert part is not None
        fg[rows] = part.to(fg.dtype)
    return fg


PERLIN_TEXTURE_EVERY_IMAGE = SynthesisConfig(kind="perlin_texture", beta_range=BETA_RANGE_CODE, foreground="none",
                                             clean_prob=0.0)
"""DRAEM Perlin mask filled with a texture, opacity (0.2, 1], on every image, no foreground: CFRG's official
synthesis (3CAD data_utils.py), also what PatchST's denoising pastes."""


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"synthesize expects images of shape (B, 3, H, W), got {tuple(images.shape)}")


def _perlin_texture(
    images: Tensor, cfg: SynthesisConfig, gen: torch.Generator, textures: TextureBank | None
) -> tuple[Tensor, Tensor]:
    if textures is None:
        raise ConfigError(
            "synthesis kind 'perlin_texture' needs a TextureBank: "
            "pass textures=TextureBank(cfg.texture_dir, size)"
            f" (synthesis.texture_dir={cfg.texture_dir!r})"
        )
    batch, _, height, width = images.shape
    masks = perlin_masks(
        batch, (height, width), gen, cfg.perlin_scale_exp, cfg.perlin_rotation, cfg.perlin_threshold
    ).to(images.dtype)
    tex = textures.sample(batch, gen, (height, width)).to(images.dtype)
    if cfg.texture_augment:
        tex = augment_textures(tex, gen)
    beta = sample_beta(batch, cfg.beta_range, gen)
    # With M = 1 everywhere, eq. 7 is the fully blended image; the mask is applied by the caller.
    return blend(images, tex, torch.ones_like(masks), beta), masks


def _cutpaste(images: Tensor, cfg: SynthesisConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    def normal() -> tuple[Tensor, Tensor]:
        return cutpaste_normal(
            images, gen, cfg.cutpaste_area_ratio, cfg.cutpaste_aspect_ratio, cfg.cutpaste_jitter
        )

    def scar() -> tuple[Tensor, Tensor]:
        return cutpaste_scar(
            images, gen, cfg.scar_width, cfg.scar_length, cfg.scar_rotation, cfg.cutpaste_jitter
        )

    if cfg.cutpaste_variant == "normal":
        return normal()
    if cfg.cutpaste_variant == "scar":
        return scar()
    pick_scar = (torch.rand(images.shape[0], generator=gen) < 0.5).view(-1, 1, 1, 1)
    (img_n, m_n), (img_s, m_s) = normal(), scar()
    return torch.where(pick_scar, img_s, img_n), torch.where(pick_scar, m_s, m_n)


def synthesize(
    images: Tensor,
    cfg: SynthesisConfig,
    gen: torch.Generator,
    textures: TextureBank | None = None,
    category: str | Sequence[str] | None = None,
    *,
    foreground: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Make synthetic anomalies.

    Args:
        images: (B, 3, H, W) float in [0, 1]; computed on CPU, returned on the input's device.
        cfg: what to synthesise.
        gen: the only random source; the same seed gives identical outputs.
        textures: required for kind "perlin_texture".
        category: picks the foreground method when ``cfg.foreground`` is a per-category mapping; one name
            for the batch, or one per image (multi-class batches).
        foreground: optional precomputed (B, 1, H, W) foreground in {0, 1} (URD computes it once per training
            image; pass it to avoid recomputing GrabCut every step). Overrides the configured method.

    Returns:
        (images_aug (B, 3, H, W) in [0, 1], masks (B, 1, H, W) float in {0, 1}). Pixels outside the mask
        equal the input; clean images (``clean_prob``) and empty masks return the input unchanged.
    """
    _check_images(images)
    device = images.device  # the generator is a CPU one, so the work happens on CPU
    images = images.detach().cpu()
    if foreground is not None:
        foreground = foreground.detach().cpu()
    batch = images.shape[0]
    keep_clean = torch.rand(batch, generator=gen) < cfg.clean_prob
    if cfg.kind == "perlin_texture":
        augmented, masks = _perlin_texture(images, cfg, gen, textures)
    elif cfg.kind == "simplex":
        augmented, masks = simplex_patches(
            images,
            gen,
            _scaled_range(cfg.simplex_size_range, images.shape[-2]),
            cfg.simplex_amplitude,
            cfg.simplex_octaves,
            cfg.simplex_persistence,
            cfg.simplex_frequency,
            cfg.simplex_field,
            cfg.simplex_seed,
        )
    else:
        augmented, masks = _cutpaste(images, cfg, gen)

    if foreground is None:
        foreground = _foreground(images, cfg, category)
    if foreground is not None:
        if foreground.shape != masks.shape:
            raise ConfigError(
                f"foreground must have shape {tuple(masks.shape)}, got {tuple(foreground.shape)}"
            )
        masks = masks * (foreground > 0.5).to(masks.dtype)
    masks = masks * (~keep_clean).to(masks.dtype).view(-1, 1, 1, 1)
    # Clamp: RD++ adds its noise without clipping; kdad's image contract is [0, 1].
    out = torch.where(masks > 0.5, augmented, images).clamp(0.0, 1.0)
    return out.to(device), masks.to(device)


def _scaled_range(size_range: tuple[int, int], height: int) -> tuple[int, int]:
    """RD++ draws box sides from randint(10, size // 8) at 256 px; scale hi with the image size."""
    lo, hi = size_range
    return lo, max(lo + 1, round(hi * height / 256))
