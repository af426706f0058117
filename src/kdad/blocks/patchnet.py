"""A small patch network: the student of `methods/patchst.py`.

After EfficientAD's patch description network (Batzner, Heckler & König, WACV 2024; written here from the
paper's description, not its code): four or more plain convolutions with 2x2 average pooling, no BatchNorm,
so each output position sees only a bounded patch and nothing of the rest of the image. Padded so that a
256 px input gives exactly the stride-8 grid (32 x 32) of the teacher layer it regresses.
"""

from __future__ import annotations

from torch import Tensor, nn


class PatchNet(nn.Module):
    """(B, 3, H, W) normalised images -> (B, out_channels, H/8, W/8).

    width: channels of the first convolution (the later ones have twice as many). extra: dilated 3x3
    convolutions after the last pooling, each widening the receptive field by 32 px (57 px with none).
    """

    def __init__(self, out_channels: int, width: int = 32, extra: int = 0) -> None:
        super().__init__()
        if width < 1 or extra < 0:
            raise ValueError(f"width must be >= 1 and extra >= 0, got width={width}, extra={extra}")
        w = width
        layers: list[nn.Module] = [
            nn.Conv2d(3, w, 4, 1, 2), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(w, 2 * w, 4, 1, 2), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(inplace=True),
        ]
        for _ in range(extra):
            layers += [nn.Conv2d(2 * w, 2 * w, 3, 1, 2, dilation=2), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(2 * w, out_channels, 3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.stride = 8

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
