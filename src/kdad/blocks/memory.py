"""Memory addressing with hard shrinkage (MemAE, Gong et al. 2019), as used by BKD's bottleneck (eqs. 6-10).

Each position's feature vector z (a C-vector of a (B, C, H, W) map) addresses a learnable memory M of I items
by cosine similarity, a softmax, hard shrinkage and (optionally) L1 re-normalisation; the output is z' = w'M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hard_shrink(weights: Tensor, threshold: float, eps: float) -> Tensor:
    """Eq. 9: w' = ReLU(w - xi) * w / (|w - xi| + delta), a differentiable form of eq. 8 (w if w > xi, else 0)."""
    return F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)


class MemoryModule(nn.Module):
    """Memory of `items` unit vectors of size `dim`, addressed per position of a (B, dim, H, W) map.

    forward(z) -> (z', w'): z' (B, dim, H, W) = w' M, w' (B, items, H, W) the shrunk addressing weights.
    temperature divides the cosine before the softmax (1 = eq. 6 as written). renormalize divides w' by its
    L1 norm after shrinkage (MemAE's step; the BKD paper does not state it).
    """

    def __init__(self, items: int, dim: int, threshold: float, eps: float, temperature: float = 1.0,
                 renormalize: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)  # MemAE's uniform init
        self.memory = nn.Parameter(torch.empty(items, dim).uniform_(-bound, bound))
        self.threshold, self.eps = float(threshold), float(eps)
        self.temperature, self.renormalize = float(temperature), bool(renormalize)

    def address(self, z: Tensor) -> Tensor:
        """Eqs. 6-9 on row vectors z (P, dim) -> shrunk weights (P, items)."""
        cos = F.normalize(z, dim=1) @ F.normalize(self.memory, dim=1).t()  # eq. 7
        weights = hard_shrink(torch.softmax(cos / self.temperature, dim=1), self.threshold, self.eps)
        if self.renormalize:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(self.eps)
        return weights

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, c)
        weights = self.address(rows)
        out = weights @ self.memory  # eq. 10
        out = out.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return out, weights.view(b, h, w, -1).permute(0, 3, 1, 2)
