"""Simplex-noise patches, the RD++ pseudo-anomaly (Tien et al., CVPR 2023; official code
tientrandinh/Revisiting-Reverse-Distillation, ``dataset/dataset.py`` + ``dataset/noise.py``).

Official recipe (per 256 px training item): a box of h x w with h, w ~ U{10..31} (``randint(10, 256//8)``)
at a top-left corner ~ U{1..256-h-1}; inside it the [0, 1] image gets ``0.2 * rand_3d_octaves((3, h, w),
octaves=6, persistence=0.6)`` with start frequency 32 (each octave halves the coordinate divisor and
multiplies the amplitude by 0.6). The colour channels are the z-slices 0, 1, 2 (divided by the frequency),
so the noise is nearly grey.

The official code uses OpenSimplex (via numba). Here it is classic 3-D simplex noise (Perlin 2001,
Gustavson's formulation) in torch: same lattice family, same ~[-1, 1] range and feature size, different
gradient set, so individual values differ but the statistics match. Two field modes:

- ``"fixed"`` (official quirk): the noise lattice starts at 0 and the permutation is drawn once per dataset
  object, so every patch is the top-left h x w crop of one fixed field. Here the field comes from a seed.
- ``"fresh"``: a new permutation per call and a random lattice offset per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

_F3 = 1.0 / 3.0
_G3 = 1.0 / 6.0
# The 12 edge midpoints of a cube: the classic simplex-noise gradient set.
_GRAD3 = torch.tensor(
    [
        [1, 1, 0],
        [-1, 1, 0],
        [1, -1, 0],
        [-1, -1, 0],
        [1, 0, 1],
        [-1, 0, 1],
        [1, 0, -1],
        [-1, 0, -1],
        [0, 1, 1],
        [0, -1, 1],
        [0, 1, -1],
        [0, -1, -1],
    ],
    dtype=torch.float32,
)


def make_permutation(gen: torch.Generator) -> Tensor:
    """A doubled random permutation of 0..255, shape (512,), int64 (the simplex hash table)."""
    perm = torch.randperm(256, generator=gen)
    return torch.cat((perm, perm))


def simplex_noise_3d(x: Tensor, y: Tensor, z: Tensor, perm: Tensor) -> Tensor:
    """Classic 3-D simplex noise at arbitrary coordinates.

    Args:
        x, y, z: float tensors of one (broadcastable) shape S, in lattice units.
        perm: (512,) int64 table from :func:`make_permutation`.

    Returns:
        Tensor of shape S with values in about [-1, 1].
    """
    x, y, z = torch.broadcast_tensors(x.float(), y.float(), z.float())
    s = (x + y + z) * _F3
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t = (i + j + k) * _G3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)
    # Rank the offsets (ties broken towards x, then y) to find which simplex of the cube we are in.
    rx = (x0 >= y0).long() + (x0 >= z0).long()
    ry = (y0 > x0).long() + (y0 >= z0).long()
    rz = (z0 > x0).long() + (z0 > y0).long()
    ii, jj, kk = i.long() & 255, j.long() & 255, k.long() & 255

    total = torch.zeros_like(x)
    corners = (
        (0, 0, 0, 0.0),
        ((rx >= 2).long(), (ry >= 2).long(), (rz >= 2).long(), _G3),
        ((rx >= 1).long(), (ry >= 1).long(), (rz >= 1).long(), 2 * _G3),
        (1, 1, 1, 3 * _G3),
    )
    for oi, oj, ok, g in corners:
        dx, dy, dz = x0 - oi + g, y0 - oj + g, z0 - ok + g
        h = perm[ii + oi + perm[jj + oj + perm[kk + ok]]] % 12
        grad = _GRAD3[h]
        tt = (0.6 - dx * dx - dy * dy - dz * dz).clamp_min(0.0)
        tt2 = tt * tt
        total = total + tt2 * tt2 * (grad[..., 0] * dx + grad[..., 1] * dy + grad[..., 2] * dz)
    return 32.0 * total


def fractal_simplex_3d(
    shape: tuple[int, int, int],
    perm: Tensor,
    octaves: int = 6,
    persistence: float = 0.6,
    frequency: float = 32.0,
    offset: Tensor | None = None,
) -> Tensor:
    """Octave sum of simplex noise on the integer grid (z, y, x), as RD++'s ``rand_3d_octaves``.

    Args:
        shape: (C, H, W); z runs over C (the colour channels in RD++).
        perm: hash table from :func:`make_permutation`.
        octaves, persistence, frequency: octave k samples at coordinate / (frequency / 2^k) with amplitude
            persistence^k; amplitudes are not normalised (as in the official code).
        offset: optional (B, 3) per-sample (z, y, x) offset in pixels; adds a leading batch dim.

    Returns:
        (C, H, W), or (B, C, H, W) when ``offset`` is given; float32.
    """
    c, h, w = shape
    zz = torch.arange(c, dtype=torch.float32).view(c, 1, 1)
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    if offset is not None:
        off = offset.to(torch.float32).view(-1, 3, 1, 1, 1)
        zz, yy, xx = zz + off[:, 0], yy + off[:, 1], xx + off[:, 2]
    noise = torch.zeros(torch.broadcast_shapes(zz.shape, yy.shape, xx.shape))
    amplitude = 1.0
    for _ in range(octaves):
        noise = noise + amplitude * simplex_noise_3d(xx / frequency, yy / frequency, zz / frequency, perm)
        frequency /= 2.0
        amplitude *= persistence
    return noise


def simplex_patches(
    images: Tensor,
    gen: torch.Generator,
    size_range: tuple[int, int] = (10, 32),
    amplitude: float = 0.2,
    octaves: int = 6,
    persistence: float = 0.6,
    frequency: float = 32.0,
    field: str = "fixed",
    field_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Add one simplex-noise box per image (RD++), without clipping.

    Args:
        images: (B, 3, H, W) in [0, 1].
        gen: random source (box sizes, corners, and in "fresh" mode the field).
        size_range: [lo, hi) of box height and width in pixels (official: 10..31 at 256 px).
        amplitude: noise scale (official 0.2).
        octaves, persistence, frequency: see :func:`fractal_simplex_3d`.
        field: "fixed" (one field from ``field_seed``; official) or "fresh" (new field per call/sample).
        field_seed: seed of the fixed field.

    Returns:
        (noisy images (B, 3, H, W), unclipped; box masks (B, 1, H, W) in {0, 1}).
    """
    batch, channels, height, width = images.shape
    lo = min(size_range[0], height - 2, width - 2)
    hi = max(lo + 1, min(size_range[1], height - 1, width - 1))
    hs = torch.randint(lo, hi, (batch,), generator=gen)
    ws = torch.randint(lo, hi, (batch,), generator=gen)
    # Official corners: randint(1, size - h), i.e. 1..size-h-1.
    top = (1 + torch.rand(batch, generator=gen) * (height - hs - 1).clamp_min(1)).long()
    left = (1 + torch.rand(batch, generator=gen) * (width - ws - 1).clamp_min(1)).long()

    shape = (channels, int(hs.max()), int(ws.max()))
    if field == "fixed":
        perm = make_permutation(torch.Generator().manual_seed(field_seed))
        noise = fractal_simplex_3d(shape, perm, octaves, persistence, frequency).expand(batch, *shape)
    else:
        perm = make_permutation(gen)
        offset = torch.rand(batch, 3, generator=gen) * (256.0 * frequency)
        noise = fractal_simplex_3d(shape, perm, octaves, persistence, frequency, offset)

    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    top_, left_ = top.view(batch, 1, 1), left.view(batch, 1, 1)
    box = (
        (rows >= top_)
        & (rows < top_ + hs.view(batch, 1, 1))
        & (cols >= left_)
        & (cols < left_ + ws.view(batch, 1, 1))
    )
    # Each box pixel reads the noise at its position inside the box (top-left crop of the field).
    local_r = (rows - top_).clamp(0, shape[1] - 1)
    local_c = (cols - left_).clamp(0, shape[2] - 1)
    idx = (local_r * shape[2] + local_c).reshape(batch, 1, -1).expand(-1, channels, -1)
    placed = torch.gather(noise.reshape(batch, channels, -1), 2, idx).reshape(batch, channels, height, width)
    mask = box.unsqueeze(1).to(images.dtype)
    return images + amplitude * placed.to(images.dtype) * mask, mask
