"""Feature losses shared by more than one method."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.blocks.maps import cosine_similarity


def _nhwc(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def flatten_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample vectors (B, C*H*W) of two feature maps, in one element order shared by both.

    When both are channels_last the order is memory order (a view); flatten(1) would copy both into (C, H, W)
    order, and keep the copies for backward. Only for reductions that ignore the order (whole-vector cosine).
    """
    if _nhwc(a) and _nhwc(b):
        return a.permute(0, 2, 3, 1).flatten(1), b.permute(0, 2, 3, 1).flatten(1)
    return a.flatten(1), b.flatten(1)


def global_cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """RD4AD's loss: sum over layers of mean_b [1 - cos(vec(T_l[b]), vec(S_l[b]))] (whole C*H*W flattened)."""
    total = torch.zeros((), device=student[0].device)
    for t, s in zip(teacher, student):
        tv, sv = flatten_pair(t, s)
        cos = cosine_similarity(tv.float(), sv.float())
        total = total + (1.0 - cos).mean()
    return total


def pixel_cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the mean over (B, H, W) of 1 - channel cosine."""
    total = torch.zeros((), device=student[0].device)
    for t, s in zip(teacher, student):
        total = total + (1.0 - cosine_similarity(t.float(), s.float())).mean()
    return total


def normalized_l2_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """STFPM's loss: sum over layers of mean_(B,H,W) ||t/|t| - s/|s|||^2 (no 1/2 factor, as the official code)."""
    total = torch.zeros((), device=student[0].device)
    for t, s in zip(teacher, student):
        d = F.normalize(t.float(), dim=1) - F.normalize(s.float(), dim=1)
        total = total + (d * d).sum(dim=1).mean()
    return total
