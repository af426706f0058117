"""Channel adapters from a narrow student to a teacher's feature width (3CAD's CFRG, official `Adapter.py`).

One adapter per level: depthwise 3x3 -> 1x1 (C_in -> C_in) -> BN -> ReLU -> full 3x3 (C_in -> C_in)
-> 1x1 (C_in -> C_out) -> BN -> ReLU. Every conv is bias-free; spatial size is kept; the output is >= 0.
The official code never calls its init helper, so PyTorch's default initialisation is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Adapter(nn.Module):
    """(B, c_in, H, W) -> (B, c_out, H, W), non-negative."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3) -> None:
        super().__init__()
        pad = kernel // 2
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, kernel, padding=pad, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, padding=pad, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class AdapterSet(nn.Module):
    """One Adapter per level: a list of (B, c_in[i], H_i, W_i) -> a list of (B, c_out[i], H_i, W_i)."""

    def __init__(self, c_in: Sequence[int], c_out: Sequence[int]) -> None:
        super().__init__()
        if len(c_in) != len(c_out):
            raise ValueError(f"adapters need one output width per input level, got {list(c_in)} -> {list(c_out)}")
        self.levels = nn.ModuleList(Adapter(i, o) for i, o in zip(c_in, c_out))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [adapter(f) for adapter, f in zip(self.levels, feats)]
