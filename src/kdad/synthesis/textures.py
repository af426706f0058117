"""Texture source and blending for Perlin + texture anomalies (DRAEM; URD eq. 7).

URD's official code (hito2448/URD ``dataset/dataset_noise.py``) draws one DTD image uniformly at random per
item, resizes it like the training image (PIL bilinear, 256 x 256) and does **not** augment it. DRAEM
augments the texture with 3 random imgaug ops out of 10; :func:`augment_textures` keeps a faithful subset
(gamma contrast, multiply-add brightness, solarize, posterize, invert, autocontrast, rotate) for that option.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdad.data.transforms import open_header
from kdad.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class TextureBank:
    """All images under a folder (recursively, e.g. ``dtd/images/<category>/*.jpg``), resized and cached.

    Args:
        folder: root folder; every file with an image suffix below it is loaded (sorted by path).
        size: output size, an int (square) or (H, W). Resized with PIL bilinear, as URD does.

    Attributes:
        paths: the loaded files, sorted.
        images: (N, 3, H, W) uint8 tensor.

    Raises:
        DatasetError: the folder is missing, not a directory, holds no images, or an image is unreadable.
    """

    def __init__(self, folder: str | Path, size: int | tuple[int, int]) -> None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DatasetError(f"texture folder {str(root)!r} does not exist or is not a directory")
        self.paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DatasetError(
                f"texture folder {str(root)!r} holds no images "
                f"(looked recursively for {', '.join(IMAGE_SUFFIXES)})"
            )
        self.folder: Path | None = root
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.images = torch.stack([self._load(p) for p in self.paths])

    @classmethod
    def from_tensor(cls, images: Tensor) -> TextureBank:
        """A bank from in-memory textures: (N, 3, H, W) uint8, or float in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise DatasetError(
                f"textures must have shape (N, 3, H, W) with N >= 1, got {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        bank = cls.__new__(cls)
        bank.folder = None
        bank.paths = [Path(f"<tensor {i}>") for i in range(images.shape[0])]
        bank.size = (int(images.shape[2]), int(images.shape[3]))
        bank.images = images.contiguous()
        return bank

    def _load(self, path: Path) -> Tensor:
        height, width = self.size
        img = open_header(path)  # the pixel cap of every image entry point
        try:
            with img:
                rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        except OSError as exc:
            raise DatasetError(f"cannot read texture image {str(path)!r}: {exc}") from exc
        return (
            torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            .view(height, width, 3)
            .permute(2, 0, 1)
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def sample(self, n: int, gen: torch.Generator, size: tuple[int, int] | None = None) -> Tensor:
        """Draw ``n`` textures uniformly with replacement.

        Returns:
            (n, 3, H, W) float32 in [0, 1]; resized bilinearly to ``size`` if it differs from the bank's.
        """
        idx = torch.randint(self.images.shape[0], (n,), generator=gen)
        tex = self.images[idx].to(torch.float32) / 255.0
        if size is not None and tuple(size) != self.size:
            tex = F.interpolate(tex, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(
                0, 1
            )
        return tex


def blend(images: Tensor, textures: Tensor, masks: Tensor, beta: Tensor | float) -> Tensor:
    """URD eq. 7: I_a = (1 - M) * I + (1 - beta) * (M * I) + beta * (M * T).

    Args:
        images: (B, 3, H, W) in [0, 1].
        textures: (B, 3, H, W) in [0, 1].
        masks: (B, 1, H, W) in {0, 1}.
        beta: texture opacity, a float or (B,) tensor.

    Returns:
        (B, 3, H, W) in [0, 1].
    """
    if not isinstance(beta, Tensor):
        beta = torch.tensor(beta, dtype=images.dtype)
    beta = beta.to(images.dtype).reshape(-1, 1, 1, 1)
    return (1 - masks) * images + (1 - beta) * (masks * images) + beta * (masks * textures)


def sample_beta(batch: int, beta_range: tuple[float, float], gen: torch.Generator) -> Tensor:
    """Texture opacity beta in (lo, hi], drawn as hi - U[0, 1) * (hi - lo).

    With (0.2, 1.0) this is exactly URD/DRAEM's code, beta = 1 - b with b ~ U[0, 0.8). Returns (B,).
    """
    lo, hi = beta_range
    return hi - torch.rand(batch, generator=gen) * (hi - lo)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate (B, C, H, W) about the centre, zero fill outside (imgaug Affine defaults)."""
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    mat = torch.stack((torch.stack((cos, -sin, zero), -1), torch.stack((sin, cos, zero), -1)), 1)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_textures(textures: Tensor, gen: torch.Generator, n_ops: int = 3) -> Tensor:
    """DRAEM-style texture augmentation: each sample gets ``n_ops`` distinct ops from a fixed list.

    Ops (DRAEM parameters, pixel values scaled to [0, 1]): gamma contrast (0.5, 2) per channel; brightness
    x(0.8, 1.2) + (-30, 30)/255; solarize with p 0.5 above a threshold in (32, 128)/255; posterize to
    1..8 bits; invert; per-channel autocontrast; rotate (-45, 45) degrees. Ops run in list order.

    Args:
        textures: (B, 3, H, W) in [0, 1].
        gen: random source.
        n_ops: ops per sample.

    Returns:
        (B, 3, H, W) in [0, 1].
    """
    batch = textures.shape[0]
    n_list = 7
    chosen = torch.rand(batch, n_list, generator=gen).argsort(dim=1)[:, :n_ops]
    flags = torch.zeros(batch, n_list, dtype=torch.bool).scatter_(1, chosen, True)
    u = torch.rand(batch, 8, generator=gen)
    gamma = torch.exp(math.log(0.5) + torch.rand(batch, 3, generator=gen) * math.log(4.0))

    def on(k: int, new: Tensor, cur: Tensor) -> Tensor:
        return torch.where(flags[:, k].view(batch, 1, 1, 1), new, cur)

    x = textures
    x = on(0, x.clamp_min(0) ** gamma.view(batch, 3, 1, 1), x)
    mul, add = 0.8 + 0.4 * u[:, 0], (-30 + 60 * u[:, 1]) / 255.0
    x = on(1, (x * mul.view(-1, 1, 1, 1) + add.view(-1, 1, 1, 1)).clamp(0, 1), x)
    thr = ((32 + 96 * u[:, 2]) / 255.0).view(-1, 1, 1, 1)
    do_solar = (u[:, 3] < 0.5).view(-1, 1, 1, 1)
    x = on(2, torch.where(do_solar & (x >= thr), 1 - x, x), x)
    levels = (2 ** (1 + (u[:, 4] * 8).floor().clamp(max=7))).view(-1, 1, 1, 1)
    x = on(3, torch.floor(x * 255.0 / (256.0 / levels)) * (256.0 / levels) / 255.0, x)
    x = on(4, 1 - x, x)
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    x = on(5, torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x), x)
    x = on(6, _rotate(x, -45 + 90 * u[:, 5]), x)
    return x.clamp(0, 1)
