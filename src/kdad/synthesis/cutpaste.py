"""CutPaste pseudo-anomalies (Li, Sohn, Yoon, Pfister, CVPR 2021), batched in torch.

- **normal**: cut a rectangle of area ratio U(0.02, 0.15) of the image and aspect ratio log-uniform in
  [0.3, 1/0.3] from a random place, colour-jitter it, paste it at another random place.
- **scar**: a thin rectangle, width U{2..16}, length U{10..25} px, colour-jittered, rotated by
  U(-45, 45) degrees, pasted at a random place (fully inside the image).

Colour jitter: brightness, contrast, saturation and hue, each with strength 0.1 (the paper's setting),
applied in that fixed order. Hue is shifted by rotating the chroma in YIQ space, an approximation of
torchvision's HSV hue shift. Contrast pivots on the patch's mean grey, as ColorJitter on a cut patch does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# RGB <-> YIQ (NTSC) for the hue rotation.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _uniform(batch: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(batch, generator=gen)


def color_jitter(patch: Tensor, mask: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter of the masked region.

    Args:
        patch: (B, 3, H, W) in [0, 1] (only pixels under ``mask`` matter).
        mask: (B, 1, H, W) in {0, 1}; the contrast pivot is the mean grey under it.
        strength: factors in [1 - s, 1 + s]; hue shift in [-s, s] of a full turn.
        gen: random source.

    Returns:
        (B, 3, H, W) in [0, 1].
    """
    batch = patch.shape[0]
    view = (batch, 1, 1, 1)
    bright = _uniform(batch, 1 - strength, 1 + strength, gen).view(view)
    contrast = _uniform(batch, 1 - strength, 1 + strength, gen).view(view)
    sat = _uniform(batch, 1 - strength, 1 + strength, gen).view(view)
    hue = _uniform(batch, -strength, strength, gen) * 2 * math.pi

    x = (patch * bright).clamp(0, 1)
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    mean = (gray * mask).sum(dim=(2, 3), keepdim=True) / mask.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = ((x - gray) * sat + gray).clamp(0, 1)
    yiq = torch.einsum("ij,bjhw->bihw", _RGB2YIQ.to(x.dtype), x)
    cos, sin = torch.cos(hue).view(-1, 1, 1), torch.sin(hue).view(-1, 1, 1)
    i_ch = yiq[:, 1] * cos - yiq[:, 2] * sin
    q_ch = yiq[:, 1] * sin + yiq[:, 2] * cos
    yiq = torch.stack((yiq[:, 0], i_ch, q_ch), dim=1)
    return torch.einsum("ij,bjhw->bihw", _YIQ2RGB.to(x.dtype), yiq).clamp(0, 1)


def _gather_pixels(images: Tensor, src_r: Tensor, src_c: Tensor) -> Tensor:
    """images (B, C, H, W); integer source coords (B, H, W) -> (B, C, H, W)."""
    batch, channels, height, width = images.shape
    idx = (src_r.clamp(0, height - 1) * width + src_c.clamp(0, width - 1)).reshape(batch, 1, -1)
    out = torch.gather(images.reshape(batch, channels, -1), 2, idx.expand(-1, channels, -1))
    return out.reshape(batch, channels, height, width)


def _normal_boxes(
    batch: int, height: int, width: int, area_ratio: tuple[float, float], aspect: float, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Patch size (h, w), source corner (fy, fx) and target corner (ty, tx), all (B,) int64."""
    area = _uniform(batch, *area_ratio, gen) * height * width
    log_a = _uniform(batch, math.log(aspect), math.log(1 / aspect), gen)
    ratio = torch.exp(log_a)
    w = torch.sqrt(area * ratio).round().long().clamp(1, width)
    h = torch.sqrt(area / ratio).round().long().clamp(1, height)
    corners = torch.rand(batch, 4, generator=gen)
    fy = (corners[:, 0] * (height - h + 1)).long()
    fx = (corners[:, 1] * (width - w + 1)).long()
    ty = (corners[:, 2] * (height - h + 1)).long()
    tx = (corners[:, 3] * (width - w + 1)).long()
    return h, w, fy, fx, ty, tx


def cutpaste_normal(
    images: Tensor,
    gen: torch.Generator,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
    jitter: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """CutPaste (normal variant).

    Args:
        images: (B, 3, H, W) in [0, 1].
        gen: random source.
        area_ratio: patch area as a fraction of H*W, uniform in this range.
        aspect_ratio: w/h is log-uniform in [aspect_ratio, 1/aspect_ratio].
        jitter: colour-jitter strength (0 disables).

    Returns:
        (images (B, 3, H, W) in [0, 1], masks (B, 1, H, W) in {0, 1}: exactly the pasted h x w box).
    """
    batch, _, height, width = images.shape
    h, w, fy, fx, ty, tx = _normal_boxes(batch, height, width, area_ratio, aspect_ratio, gen)
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    v = (batch, 1, 1)
    inside = (
        (rows >= ty.view(v)) & (rows < (ty + h).view(v)) & (cols >= tx.view(v)) & (cols < (tx + w).view(v))
    )
    patch = _gather_pixels(images, rows - ty.view(v) + fy.view(v), cols - tx.view(v) + fx.view(v))
    mask = inside.unsqueeze(1).to(images.dtype)
    if jitter > 0:
        patch = color_jitter(patch, mask, jitter, gen)
    return torch.where(inside.unsqueeze(1), patch, images), mask


def cutpaste_scar(
    images: Tensor,
    gen: torch.Generator,
    width_range: tuple[int, int] = (2, 16),
    length_range: tuple[int, int] = (10, 25),
    rotation_deg: float = 45.0,
    jitter: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """CutPaste-Scar: a thin jittered rectangle, rotated and pasted.

    Args:
        images: (B, 3, H, W) in [0, 1].
        gen: random source.
        width_range, length_range: inclusive pixel ranges of the scar's width and length.
        rotation_deg: rotation ~ U(-rotation_deg, rotation_deg).
        jitter: colour-jitter strength (0 disables).

    Returns:
        (images (B, 3, H, W) in [0, 1], masks (B, 1, H, W) in {0, 1} covering the rotated scar).
    """
    batch, _, height, width = images.shape
    sw = torch.randint(width_range[0], width_range[1] + 1, (batch,), generator=gen).clamp(max=width)
    sh = torch.randint(length_range[0], length_range[1] + 1, (batch,), generator=gen).clamp(max=height)
    theta = torch.deg2rad(_uniform(batch, -rotation_deg, rotation_deg, gen))
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = torch.rand(batch, 4, generator=gen)
    # Source: integer-aligned rectangle; its centre in pixel coordinates.
    fy = (u[:, 0] * (height - sh + 1)).long()
    fx = (u[:, 1] * (width - sw + 1)).long()
    sy, sx = fy + (sh - 1) / 2.0, fx + (sw - 1) / 2.0
    # Target centre such that the rotated rectangle's bounding box stays inside the image.
    ey = (sw * sin.abs() + sh * cos.abs()) / 2.0
    ex = (sw * cos.abs() + sh * sin.abs()) / 2.0
    cy = ey - 0.5 + u[:, 2] * (height - 2 * ey).clamp_min(0)
    cx = ex - 0.5 + u[:, 3] * (width - 2 * ex).clamp_min(0)

    v = (batch, 1, 1)
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1) - cy.view(v)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, width) - cx.view(v)
    # Coordinates in the scar's own frame (inverse rotation of the offset from the target centre).
    qy = cos.view(v) * rows + sin.view(v) * cols
    qx = -sin.view(v) * rows + cos.view(v) * cols
    inside = (qy.abs() < sh.view(v) / 2.0) & (qx.abs() < sw.view(v) / 2.0)
    src_r = torch.floor(sy.view(v) + qy + 0.5).long()
    src_c = torch.floor(sx.view(v) + qx + 0.5).long()
    patch = _gather_pixels(images, src_r, src_c)
    mask = inside.unsqueeze(1).to(images.dtype)
    if jitter > 0:
        patch = color_jitter(patch, mask, jitter, gen)
    return torch.where(inside.unsqueeze(1), patch, images), mask
