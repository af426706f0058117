"""Deformable feature alignment: warp support features onto a query, level by level (BKD eqs. 1-5).

Per level L: fused = act(conv([Q^L, S^L])) (eq. 1); offsets and DCNv2 modulation masks are predicted from the
fused map, refined on top of the x2-upsampled offsets of level L+1 (eq. 4); the aligned support is a modulated
deformable 3x3 convolution of S^L (eqs. 2, 5), computed by `torchvision.ops.deform_conv2d`.
The offsets are zero-initialised and the convolution is an identity at start, so alignment starts as a no-op.

`torchvision.ops.deform_conv2d` has no ONNX symbolic below opset 19 and ONNX Runtime has no kernel for it, so
during ONNX export the same operator is computed by `deform_conv2d_grid` (bilinear `grid_sample` + matmul),
which matches torchvision to float precision (tests/methods/test_bkd.py). impl="grid" also uses it in eager
mode: on CPU its backward is about 4x faster than torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d  # type: ignore[import-untyped]

KERNEL = 3  # 3x3 kernel, 9 sampling points p_m as in eq. 2
IMPLS = ("torchvision", "grid")


def deform_conv2d_grid(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                       mask: Tensor | None = None, padding: int = 1) -> Tensor:
    """Modulated deformable conv (stride 1, dilation 1) with grid_sample, layout as torchvision's deform_conv2d.

    x (N, C, H, W); offset (N, 2*G*K, Ho, Wo) as (dy, dx) pairs per group g and tap k; mask (N, G*K, Ho, Wo);
    weight (Cout, C, kh, kw). Points outside the map read zeros, as in torchvision.
    """
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    taps = kh * kw
    ho, wo = int(offset.shape[-2]), int(offset.shape[-1])
    groups = offset.shape[1] // (2 * taps)
    ky = torch.arange(kh, dtype=x.dtype, device=x.device).repeat_interleave(kw)
    kx = torch.arange(kw, dtype=x.dtype, device=x.device).repeat(kh)
    base_y = torch.arange(ho, dtype=x.dtype, device=x.device) - padding
    base_x = torch.arange(wo, dtype=x.dtype, device=x.device) - padding
    off = offset.reshape(n, groups, taps, 2, ho, wo)
    py = base_y.view(1, 1, 1, ho, 1) + ky.view(1, 1, taps, 1, 1) + off[:, :, :, 0]
    px = base_x.view(1, 1, 1, 1, wo) + kx.view(1, 1, taps, 1, 1) + off[:, :, :, 1]
    # pixel index -> normalised coordinate for align_corners=False (valid for any size, including 1)
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    grid = grid.reshape(n * groups, taps * ho, wo, 2)
    cols = F.grid_sample(x.reshape(n * groups, c // groups, h, w), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    cols = cols.reshape(n, groups, c // groups, taps, ho, wo)
    if mask is not None:
        cols = cols * mask.reshape(n, groups, 1, taps, ho, wo)
    out = torch.matmul(weight.reshape(cout, c * taps), cols.reshape(n, c * taps, ho * wo))
    if bias is not None:
        out = out + bias.view(1, cout, 1)
    return out.reshape(n, cout, ho, wo)


def modulated_deform_conv(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
                          impl: str = "torchvision") -> Tensor:
    """torchvision's deform_conv2d (padding 1), or its grid_sample twin (impl="grid", and during ONNX export)."""
    if impl == "grid" or torch.onnx.is_in_onnx_export():
        return deform_conv2d_grid(x, offset, weight, bias, mask, padding=KERNEL // 2)
    dev = x.device.type
    if torch.is_autocast_enabled(dev) or x.dtype in (torch.bfloat16, torch.float16):
        # torchvision's CPU kernel takes float32 only and has no autocast rule: run it in float32
        with torch.autocast(dev, enabled=False):
            return deform_conv2d(x.float(), offset.float(), weight.float(), None if bias is None else bias.float(),
                                 padding=KERNEL // 2, mask=None if mask is None else mask.float())
    return deform_conv2d(x, offset, weight, bias, padding=KERNEL // 2, mask=mask)


class DeformAlignLevel(nn.Module):
    """One pyramid level: (query, support, coarser offsets) -> (aligned support, offsets), shapes kept.

    query/support (N, C, H, W); offsets (N, 2*G*9, H, W) in pixels of this level.
    """

    def __init__(self, channels: int, offset_channels: int, groups: int, cascaded: bool, modulated: bool,
                 slope: float, impl: str = "torchvision") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"deformable conv impl must be one of {IMPLS}, got {impl!r}")
        self.groups, self.modulated, self.impl = groups, modulated, impl
        taps = KERNEL * KERNEL
        self.fuse = nn.Conv2d(2 * channels, offset_channels, KERNEL, padding=KERNEL // 2)  # eq. 1
        self.cascade = (nn.Conv2d(offset_channels + 2 * groups * taps, offset_channels, KERNEL, padding=KERNEL // 2)
                        if cascaded else None)
        self.act = nn.LeakyReLU(slope)
        n_out = groups * taps * (3 if modulated else 2)
        self.head = nn.Conv2d(offset_channels, n_out, KERNEL, padding=KERNEL // 2)
        nn.init.zeros_(self.head.weight)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        # identity init: centre tap = I / (initial mask value 0.5), so the aligned support starts as S^L
        weight = torch.zeros(channels, channels, KERNEL, KERNEL)
        weight[:, :, KERNEL // 2, KERNEL // 2] = torch.eye(channels) * (2.0 if modulated else 1.0)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, query: Tensor, support: Tensor, coarse_offsets: Tensor | None) -> tuple[Tensor, Tensor]:
        fused = self.act(self.fuse(torch.cat([query, support], dim=1)))
        if self.cascade is not None and coarse_offsets is not None:
            fused = self.act(self.cascade(torch.cat([fused, coarse_offsets], dim=1)))
        out = self.head(fused)
        n_off = 2 * self.groups * KERNEL * KERNEL
        offsets = out[:, :n_off]
        if coarse_offsets is not None:
            offsets = offsets + coarse_offsets  # eq. 4: refine the upsampled coarse offsets
        mask = torch.sigmoid(out[:, n_off:]) if self.modulated else None
        aligned = modulated_deform_conv(support, offsets, self.weight, self.bias, mask, self.impl)
        return aligned, offsets


class PyramidAlign(nn.Module):
    """L-level cascaded deformable alignment (eqs. 1-5), deepest level first.

    channels / strides: the teacher's, shallow first. forward(query_feats, support_feats) takes two lists of
    (N, C_l, H_l, W_l) maps (query repeated per shot) and returns the aligned support maps, same shapes.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], offset_channels: int, groups: int,
                 modulated: bool, slope: float, impl: str = "torchvision") -> None:
        super().__init__()
        n = len(channels)
        self.ratios = [float(strides[i + 1]) / float(strides[i]) for i in range(n - 1)]
        self.levels = nn.ModuleList(
            DeformAlignLevel(c, offset_channels, groups, cascaded=i < n - 1, modulated=modulated, slope=slope,
                             impl=impl)
            for i, c in enumerate(channels)
        )

    def forward(self, query_feats: Sequence[Tensor], support_feats: Sequence[Tensor]) -> list[Tensor]:
        return self.align_with_offsets(query_feats, support_feats)[0]

    def align_with_offsets(self, query_feats: Sequence[Tensor], support_feats: Sequence[Tensor]
                           ) -> tuple[list[Tensor], list[Tensor]]:
        """(aligned supports, offsets (N, 2*G*9, H_l, W_l) in pixels) per level, shallow first."""
        n = len(self.levels)
        aligned: list[Tensor] = [torch.empty(0)] * n
        offsets: list[Tensor] = [torch.empty(0)] * n
        coarse: Tensor | None = None
        for i in reversed(range(n)):
            q, s = query_feats[i], support_feats[i]
            if coarse is not None:  # x2 bilinear upsampling, offsets rescaled to this level's pixels
                coarse = F.interpolate(coarse, size=q.shape[-2:], mode="bilinear", align_corners=False)
                coarse = coarse * self.ratios[i]
            aligned[i], offsets[i] = self.levels[i](q, s, coarse)
            coarse = offsets[i]
        return aligned, offsets
