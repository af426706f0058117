"""A PNG grid of originals, synthetic anomalies and their masks, for eyeballing a SynthesisConfig."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from kdad.errors import ConfigError
from kdad.fileio import atomic_write_bytes
from kdad.synthesis import SynthesisConfig, TextureBank, synthesize

_ROW_LABELS = ("original", "synthetic", "mask")
_LABEL_WIDTH = 72
_PAD = 2


def _to_pil(img: Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) in [0, 1] -> RGB PIL image."""
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()
    return Image.fromarray(arr)


def render_gallery(originals: Tensor, synthetic: Tensor, masks: Tensor) -> Image.Image:
    """Three rows (original, synthetic, mask) of N tiles each.

    Args:
        originals, synthetic: (N, 3, H, W) in [0, 1].
        masks: (N, 1, H, W) in {0, 1}.
    """
    n, _, height, width = originals.shape
    canvas = Image.new(
        "RGB", (_LABEL_WIDTH + n * (width + _PAD) + _PAD, 3 * (height + _PAD) + _PAD), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for row, (label, batch) in enumerate(zip(_ROW_LABELS, (originals, synthetic, masks), strict=True)):
        top = _PAD + row * (height + _PAD)
        draw.text((4, top + height // 2 - 5), label, fill="black")
        for col in range(n):
            canvas.paste(_to_pil(batch[col]), (_LABEL_WIDTH + _PAD + col * (width + _PAD), top))
    return canvas


def save_gallery(
    images: Tensor,
    cfg: SynthesisConfig,
    out_path_png: str | Path,
    n: int = 8,
    seed: int = 0,
    textures: TextureBank | None = None,
    category: str | None = None,
) -> Path:
    """Synthesise anomalies for the first ``n`` images and write the grid as a PNG, atomically.

    Args:
        images: (B, 3, H, W) in [0, 1]; the first min(n, B) are used.
        cfg: the synthesis to show.
        out_path_png: destination (parent folders are created); written via a temp file + os.replace.
        n: number of columns.
        seed: seed of the generator given to :func:`synthesize`.
        textures: texture bank for "perlin_texture"; built from ``cfg.texture_dir`` when None.
        category: passed to :func:`synthesize` (foreground choice).

    Returns:
        The written path.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ConfigError(
            f"save_gallery expects images of shape (B, 3, H, W) with B >= 1, got {tuple(images.shape)}"
        )
    originals = images[:n].detach().cpu().to(torch.float32)
    if cfg.kind == "perlin_texture" and textures is None:
        if cfg.texture_dir is None:
            raise ConfigError(
                "synthesis.texture_dir must be set to show kind 'perlin_texture' (or pass textures=)"
            )
        textures = TextureBank(cfg.texture_dir, (int(originals.shape[-2]), int(originals.shape[-1])))
    synthetic, masks = synthesize(originals, cfg, torch.Generator().manual_seed(seed), textures, category)
    grid = render_gallery(originals, synthetic, masks)

    out = Path(out_path_png)
    png = io.BytesIO()
    grid.save(png, format="PNG")
    atomic_write_bytes(out, png.getvalue())
    return out
