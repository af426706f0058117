"""UNet-style segmentation decoder over a 3-level feature pyramid (3CAD's CFRG, official `Segmentation.py`).

For WRN50-2 (channels 256, 512, 1024 at strides 4, 8, 16) it is exactly the official head:
up1 ConvT(1024->512, k4 s2 p1) + concat level 2 + 2x [conv3x3 -> BN -> ReLU]; up2 the same to 256 with level 1;
then ConvT 256->128 and 128->64 without skips (each followed by 2x conv-BN-ReLU) up to stride 1, and a final
3x3 conv (64 -> 1, with bias) giving logits. Widths are derived from the input channels (c1/2, c1/4, ...), so the
same head works for narrow teachers such as EfficientNet-Lite0 (24, 40, 112).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class UpBlock(nn.Module):
    """ConvT x2 (k4 s2 p1) -> [concat skip] -> 2x (conv3x3 -> BN -> ReLU); convs keep their bias, as the code."""

    def __init__(self, c_in: int, c_out: int, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
        self.conv1 = nn.Conv2d(2 * c_out if skip else c_out, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        if self.skip:
            assert skip is not None, "this block concatenates a skip connection"
            if x.shape[-2:] != skip.shape[-2:]:  # odd input sizes: match the skip's grid
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class UNetHead(nn.Module):
    """Three levels (B, c_l, H/s_l, W/s_l), strides (s, 2s, 4s) -> logits (B, 1, H, W).

    channels: (c1, c2, c3) shallow first; first_stride: s (4 for ResNet layer1 / EfficientNet index 1).
    The no-skip stages halve the width each time until stride 1.
    """

    def __init__(self, channels: Sequence[int], first_stride: int = 4) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"UNetHead needs 3 levels, got channels={list(channels)}")
        n_up = round(math.log2(first_stride))
        if 2**n_up != first_stride:
            raise ValueError(f"UNetHead needs a power-of-two first stride, got {first_stride}")
        c1, c2, c3 = channels
        self.up_skip = nn.ModuleList([UpBlock(c3, c2, skip=True), UpBlock(c2, c1, skip=True)])
        widths = [max(1, c1 // 2 ** (k + 1)) for k in range(n_up)]
        ins = [c1, *widths[:-1]]
        self.up_plain = nn.ModuleList(UpBlock(i, o, skip=False) for i, o in zip(ins, widths))
        self.final = nn.Conv2d(widths[-1] if widths else c1, 1, 3, padding=1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        f1, f2, f3 = feats
        x = self.up_skip[0](f3, f2)
        x = self.up_skip[1](x, f1)
        for block in self.up_plain:
            x = block(x)
        return self.final(x)
