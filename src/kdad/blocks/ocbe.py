"""RD4AD's one-class bottleneck embedding (OCBE) = multi-scale feature fusion (MFF) + one-class embedding (OCE).

For a WideResNet50-2 teacher (channels 256, 512, 1024) this builds exactly RD4AD's `BN_layer`:
MFF conv3x3 s2 branches to 1024@16^2, concat to 3072, then one ResNet stage of 3 Bottlenecks (width 1024,
i.e. width_per_group 128) down to 2048@8^2. For any other teacher it is sized from the teacher's channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from kdad.blocks.resblocks import BasicBlock, Bottleneck, init_like_rd4ad


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class OCBE(nn.Module):
    """Fuse 3 teacher levels (strides s, 2s, 4s) into one compact code at stride 8s.

    in: list of 3 tensors (B, c1, H, W), (B, c2, H/2, W/2), (B, c3, H/4, W/4)
    out: (B, out_channels, H/8, W/8), out_channels = 2 * c3.
    width_per_group: Bottleneck width = (out/4) * width_per_group / 64 (128 for WRN50-2, 64 for ResNet-50).
    """

    def __init__(
        self,
        channels: Sequence[int],
        block: Literal["bottleneck", "basic"] = "bottleneck",
        num_blocks: int = 3,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"OCBE needs exactly 3 teacher levels, got channels={list(channels)}")
        c1, c2, c3 = channels
        self.branch1 = nn.Sequential(*_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c3))
        self.branch2 = nn.Sequential(*_conv_bn_relu(c2, c3))
        self.out_channels = 2 * c3
        blocks: list[nn.Module] = []
        cin = 3 * c3
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            if block == "bottleneck":
                width = (self.out_channels // 4) * width_per_group // 64
                blocks.append(Bottleneck(cin, width, self.out_channels, stride))
            elif block == "basic":
                blocks.append(BasicBlock(cin, self.out_channels, self.out_channels, stride))
            else:
                raise ValueError(f"OCBE block must be 'bottleneck' or 'basic', got {block!r}")
            cin = self.out_channels
        self.oce = nn.Sequential(*blocks)
        init_like_rd4ad(self)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        f1, f2, f3 = feats
        fused = torch.cat([self.branch1(f1), self.branch2(f2), f3], dim=1)
        return self.oce(fused).contiguous()


# OCBE per ResNet teacher as in RD4AD's resnet.py: (block, number of OCE blocks, width_per_group)
OCBE_BY_TEACHER = {
    "resnet18": ("basic", 2, 64),
    "resnet34": ("basic", 3, 64),
    "resnet50": ("bottleneck", 3, 64),
    "wide_resnet50_2": ("bottleneck", 3, 128),
}


def build_bottleneck(backbone: str, channels: list[int], width_per_group: int = 64) -> OCBE:
    """RD4AD's OCBE for ResNet teachers; a bottleneck OCBE of 3 blocks (`width_per_group`) for other teachers."""
    block, n, wpg = OCBE_BY_TEACHER.get(backbone, ("bottleneck", 3, width_per_group))
    return OCBE(channels, block=block, num_blocks=n, width_per_group=wpg)  # type: ignore[arg-type]
