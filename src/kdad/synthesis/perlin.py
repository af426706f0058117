"""Perlin-noise anomaly masks as in DRAEM (Zavrtanik et al., ICCV 2021), used by URD and CFRG.

DRAEM draws a 2-D Perlin noise with a per-axis lattice resolution 2^k (k ~ U{0..5}), rotates it with
imgaug ``Affine(rotate=(-90, 90))`` (constant 0 fill) and keeps the pixels where the noise is > 0.5.
Here the noise is a continuous function of the pixel coordinates, so the rotation is done exactly by
evaluating the noise at rotated coordinates (pixels whose source falls outside the canvas get 0, like
imgaug's constant fill) instead of resampling a rasterised field. Everything is batched in torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _fade(t: Tensor) -> Tensor:
    """Perlin's quintic smoothstep 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise_2d(
    size: tuple[int, int],
    res: Tensor,
    gen: torch.Generator,
    angles_deg: Tensor | None = None,
) -> Tensor:
    """Batched 2-D Perlin gradient noise, one lattice per sample.

    Args:
        size: output (H, W).
        res: (B, 2) integer lattice resolution per sample, (rows, cols); cell size is H/res x W/res.
        gen: random source for the lattice gradients.
        angles_deg: optional (B,) rotation of the noise about the image centre, in degrees;
            pixels whose un-rotated source lies outside the canvas are 0.

    Returns:
        (B, H, W) float32 noise in about [-1, 1] (DRAEM's sqrt(2) scaling).
    """
    height, width = size
    batch = res.shape[0]
    res = res.to(torch.float32)
    r_max = int(res.max().item()) + 2
    angles = 2 * math.pi * torch.rand(batch, r_max, r_max, generator=gen)
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).reshape(batch, r_max * r_max, 2)

    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1).expand(batch, height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width).expand(batch, height, width)
    inside: Tensor | None = None
    if angles_deg is not None:
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        theta = torch.deg2rad(angles_deg.to(torch.float32)).view(batch, 1, 1)
        cos, sin = torch.cos(theta), torch.sin(theta)
        dy, dx = ys - cy, xs - cx
        # Inverse rotation: where in the un-rotated noise does each output pixel come from.
        ys, xs = cy + cos * dy - sin * dx, cx + sin * dy + cos * dx
        inside = (ys >= 0) & (ys <= height - 1) & (xs >= 0) & (xs <= width - 1)
        ys, xs = ys.clamp(0, height - 1), xs.clamp(0, width - 1)

    pos_y = ys * (res[:, 0].view(batch, 1, 1) / height)
    pos_x = xs * (res[:, 1].view(batch, 1, 1) / width)
    cell_y, cell_x = pos_y.floor(), pos_x.floor()
    frac_y, frac_x = pos_y - cell_y, pos_x - cell_x
    # Gradients at the 4 cell corners (00, 10, 01, 11 as (dy, dx)), gathered in one call per component.
    base = (cell_y * r_max + cell_x).long().view(batch, 1, height, width)
    corner_dy = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1)
    corner_dx = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 4, 1, 1)
    idx = (base + (corner_dy * r_max + corner_dx).long()).view(batch, -1)
    g_y = torch.gather(grads[..., 0], 1, idx).view(batch, 4, height, width)
    g_x = torch.gather(grads[..., 1], 1, idx).view(batch, 4, height, width)
    dots = g_y * (frac_y.unsqueeze(1) - corner_dy) + g_x * (frac_x.unsqueeze(1) - corner_dx)
    n00, n10, n01, n11 = dots.unbind(1)
    ty, tx = _fade(frac_y), _fade(frac_x)
    noise = math.sqrt(2) * torch.lerp(torch.lerp(n00, n10, ty), torch.lerp(n01, n11, ty), tx)
    return noise if inside is None else torch.where(inside, noise, torch.zeros_like(noise))


def perlin_masks(
    batch: int,
    size: tuple[int, int],
    gen: torch.Generator,
    scale_exp: tuple[int, int] = (0, 6),
    rotation_deg: float = 90.0,
    threshold: float = 0.5,
) -> Tensor:
    """DRAEM-style binary Perlin masks.

    Args:
        batch: number of masks B.
        size: (H, W).
        gen: random source (scales, angles and gradients, in that order).
        scale_exp: [lo, hi) of the exponent k; the per-axis lattice resolution is 2^k (DRAEM/URD: 0..5).
        rotation_deg: angles are drawn from U(-rotation_deg, rotation_deg).
        threshold: noise > threshold is anomalous.

    Returns:
        (B, 1, H, W) float32 masks in {0, 1}.
    """
    lo, hi = scale_exp
    res = 2 ** torch.randint(lo, hi, (batch, 2), generator=gen)
    angles = (torch.rand(batch, generator=gen) * 2 - 1) * rotation_deg
    noise = perlin_noise_2d(size, res, gen, angles)
    return (noise > threshold).to(torch.float32).unsqueeze(1)
