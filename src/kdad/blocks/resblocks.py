"""Residual blocks with explicit channel widths, used by OCBE and the mirror decoders.

They reproduce torchvision's Bottleneck / BasicBlock (and RD4AD's up-sampling "De" variants, which use a
2x2 transposed convolution with stride 2) but take (in, width, out) explicitly, so the same code builds the
exact RD4AD WideResNet50-2 decoder and decoders for narrow non-ResNet teachers such as EfficientNet-Lite.
"""

from __future__ import annotations

from torch import Tensor, nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with a projection shortcut when shape changes."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = _bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _bn(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class UpBottleneck(nn.Module):
    """RD4AD's DeBottleneck with stride 2: the 3x3 conv is a 2x2 transposed conv that doubles H and W."""

    def __init__(self, in_ch: int, width: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = _bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False), _bn(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs (first with stride) and a projection shortcut when shape changes."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = _bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _bn(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class UpBasicBlock(nn.Module):
    """RD4AD's DeBasicBlock with stride 2: first conv is a 2x2 transposed conv."""

    def __init__(self, in_ch: int, width: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False)
        self.bn1 = _bn(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = _bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False), _bn(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def init_like_rd4ad(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) for Conv2d only; BN weight 1 bias 0. Transposed convs keep torch's
    default init, as in RD4AD (ConvTranspose2d is not a Conv2d subclass there either)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
