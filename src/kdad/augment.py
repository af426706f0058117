"""Geometric augmentation of normal training batches (`train.augment`).

A product that reaches the camera at any orientation (a screw on a belt, a part in a tray) shows the student
each pose only rarely; flips and rotations of the normal images widen what it learns to reproduce. Off by
default: on an aligned product (bottle, a fixed fixture) a rotated part is itself an anomaly the model
should not learn as normal. Ops are drawn per image from the engine's seeded generator, so a resumed run
augments exactly like an uninterrupted one, and with no op listed no random number is drawn at all.

  hflip, vflip  mirror with probability 1/2
  rot90         a quarter-turn multiple, uniform over {0, 90, 180, 270} (over {0, 180} for a non-square image)
  rotate        an angle uniform in [-train.augment_angle, +train.augment_angle] degrees, bilinear,
                reflection at the borders (no black corners for the student to learn)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdad.errors import ConfigError

AUGMENTS = ("hflip", "vflip", "rot90", "rotate")


def check_augment(names: Sequence[str], angle: float) -> None:
    """Refuse unknown op names and a negative angle, naming the option."""
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ConfigError(f"train.augment: unknown op(s) {unknown}; choose from {list(AUGMENTS)}")
    if not 0.0 <= angle <= 180.0:
        raise ConfigError(f"train.augment_angle={angle}: must lie in [0, 180] degrees")


def _where(flag: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(flag.to(a.device).view(-1, 1, 1, 1), a, b)


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (pixel geometry kept for non-square images)."""
    n, _, h, w = images.shape
    t = degrees.to(images.device, torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(t), torch.sin(t)
    theta = torch.zeros(n, 2, 3, device=images.device)
    # affine_grid works in [-1, 1] coordinates per axis; the h/w factors keep the rotation rigid in pixels
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * (h / w)
    theta[:, 1, 0], theta[:, 1, 1] = sin * (w / h), cos
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.to(images.dtype)


def augment_batch(images: torch.Tensor, names: Sequence[str], gen: torch.Generator, angle: float = 180.0
                  ) -> torch.Tensor:
    """Apply the listed ops to an (N, C, H, W) batch, each image its own draw; the input is not modified."""
    if not names:
        return images
    n, _, h, w = images.shape
    out = images
    if "hflip" in names:
        out = _where(torch.rand(n, generator=gen) < 0.5, out.flip(-1), out)
    if "vflip" in names:
        out = _where(torch.rand(n, generator=gen) < 0.5, out.flip(-2), out)
    if "rot90" in names:
        k = torch.randint(0, 4, (n,), generator=gen)
        if h != w:  # a quarter turn would change the shape: half turns only
            k = (k // 2) * 2
        base = out
        for j in (1, 2, 3) if h == w else (2,):  # one whole-batch turn per angle, no per-image loop
            out = _where(k == j, base.rot90(j, dims=(-2, -1)), out)
    if "rotate" in names and angle > 0:
        deg = (torch.rand(n, generator=gen) * 2.0 - 1.0) * angle
        out = _rotate(out, deg)
    if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)  # keep the engine's NHWC batches NHWC
    return out
