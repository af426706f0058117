"""Student decoders that mirror a teacher encoder (RD4AD's "reverse" student).

`MirrorDecoder` takes the bottleneck code and produces one feature map per teacher level, in the teacher's
order (shallow/high-resolution first), so index i of the student matches index i of the teacher.
`resnet_decoder(name, ...)` gives RD4AD's exact de_resnet18 / de_resnet50 / de_wide_resnet50_2 stages;
`generic_decoder(...)` sizes the same blocks from any teacher's channels (e.g. EfficientNet-Lite).

Every block ends in a ReLU, so a stage's output is never negative. That suits a ResNet teacher (its features are
post-ReLU) but not EfficientNet-Lite, whose stage outputs are linear projections: about half of their values are
negative, and the closest non-negative vector is only cos ~0.71-0.75 from the teacher's (Lite0 layers 2-4 on
magnetic_tile). ``readout="linear"`` adds a 1x1 convolution after each stage, so the student can reach the sign
(kdad's option, docs/methods/rd.md "Signed teachers").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from kdad.blocks.resblocks import BasicBlock, Bottleneck, UpBasicBlock, UpBottleneck, init_like_rd4ad
from kdad.errors import ConfigError

Block = Literal["bottleneck", "basic"]
READOUTS = ("relu", "linear")


def check_readout(method: str, readout: str) -> None:
    """A ConfigError naming `method`'s option unless ``model.readout`` is one of READOUTS."""
    if readout not in READOUTS:
        raise ConfigError(f"{method} model.readout={readout!r} is not valid; choose one of {READOUTS}")


class MirrorDecoder(nn.Module):
    """Stages of [one x2 up-sampling block + (n-1) plain blocks], deepest level first.

    in_channels: bottleneck code channels. out_channels / widths / blocks: per stage, in *decoding* order
    (deepest first). forward returns the stage outputs reversed, i.e. in the teacher's order. readout: "relu"
    returns each stage's (ReLU) output as RD4AD does; "linear" returns a 1x1 convolution of it (the next stage still
    takes the ReLU output), for teachers with signed features.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Sequence[int],
        widths: Sequence[int],
        blocks: Sequence[int],
        block: Block = "bottleneck",
        readout: str = "relu",
    ) -> None:
        super().__init__()
        if not (len(out_channels) == len(widths) == len(blocks)):
            raise ValueError("out_channels, widths and blocks must have one entry per stage")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        up_cls = UpBottleneck if block == "bottleneck" else UpBasicBlock
        plain_cls = Bottleneck if block == "bottleneck" else BasicBlock
        stages = []
        cin = in_channels
        for cout, width, n in zip(out_channels, widths, blocks):
            layers: list[nn.Module] = [up_cls(cin, width, cout)]
            layers += [plain_cls(cout, width, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        # absent (not identity) for "relu", so RD4AD-layout checkpoints keep their keys
        self.readouts = nn.ModuleList(nn.Conv2d(c, c, 1) for c in out_channels) if readout == "linear" else None
        init_like_rd4ad(self)

    def forward(self, code: Tensor) -> list[Tensor]:
        outs = []
        x = code
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x if self.readouts is None else self.readouts[i](x))
        return outs[::-1]


_RESNET_DECODERS: dict[str, tuple[Block, int, tuple[int, int, int]]] = {
    # name: (block, width_per_group, blocks per stage in decoding order) as in RD4AD's de_resnet.py
    "resnet18": ("basic", 64, (2, 2, 2)),
    "resnet34": ("basic", 64, (3, 4, 6)),
    "resnet50": ("bottleneck", 64, (3, 4, 6)),
    "wide_resnet50_2": ("bottleneck", 128, (3, 4, 6)),
}


def resnet_decoder(
    name: str, teacher_channels: Sequence[int], code_channels: int, readout: str = "relu"
) -> MirrorDecoder:
    """RD4AD's de_<resnet> decoder for a ResNet teacher (channels e.g. 256, 512, 1024 for WRN50-2)."""
    block, wpg, blocks = _RESNET_DECODERS[name]
    outs = list(teacher_channels)[::-1]
    if block == "bottleneck":
        widths = [(c // 4) * wpg // 64 for c in outs]
    else:
        widths = outs
    return MirrorDecoder(code_channels, outs, widths, blocks, block, readout)


def generic_decoder(
    teacher_channels: Sequence[int], code_channels: int, blocks: Sequence[int] = (2, 2, 2), width_ratio: float = 0.5,
    readout: str = "relu",
) -> MirrorDecoder:
    """Mirror decoder for any encoder: bottleneck blocks, width = width_ratio * stage output channels."""
    outs = list(teacher_channels)[::-1]
    widths = [max(8, int(round(c * width_ratio))) for c in outs]
    return MirrorDecoder(code_channels, outs, widths, list(blocks)[: len(outs)], "bottleneck", readout)


def decoder_for(
    name: str, teacher_channels: Sequence[int], code_channels: int, blocks: Sequence[int] | None = None,
    width_ratio: float = 0.5, readout: str = "relu",
) -> MirrorDecoder:
    """RD4AD's decoder for a known ResNet teacher, otherwise the generic mirror decoder (`width_ratio` sizes
    its blocks; a thin teacher such as EfficientNet-Lite0, 24-112 channels, needs a ratio well above 0.5)."""
    if name in _RESNET_DECODERS and blocks is None:
        return resnet_decoder(name, teacher_channels, code_channels, readout)
    return generic_decoder(teacher_channels, code_channels, blocks or (2, 2, 2), width_ratio, readout)
