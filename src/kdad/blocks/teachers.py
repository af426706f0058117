"""Multi-scale CNN encoders: frozen ImageNet teachers and trainable students of the same architecture.

Images enter kdad models in [0, 1]; each encoder carries its own mean/std (``encoder.normalize``),
ImageNet statistics for torchvision ResNets and 0.5/0.5 for EfficientNet-Lite (see docs/design.md).
Backbones are wrapped, never copied: torchvision ResNets and timm ``tf_efficientnet_liteN``
(TF "SAME" padding computed at run time, so any input size works).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torchvision
from torch import Tensor, nn

from kdad.errors import ConfigError, WeightsError
from kdad.weights import load_state_dict_file, resolve_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "wide_resnet50_2": torchvision.models.wide_resnet50_2,
}
_LITES = {f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in range(3)}
ENCODER_NAMES: tuple[str, ...] = (*_RESNETS, *_LITES)
DEFAULT_LAYERS = (1, 2, 3)


class _ResNetTrunk(nn.Module):
    """The torchvision ResNet stem and ``layer1..layerK`` only (no later stage, pool or fc).

    Submodule names match torchvision, so torchvision state dict keys load directly.
    """

    def __init__(self, resnet: torchvision.models.ResNet, layers: Sequence[int]) -> None:
        super().__init__()
        self.out_indices = tuple(layers)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        for i in range(1, max(layers) + 1):
            self.add_module(f"layer{i}", getattr(resnet, f"layer{i}"))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(1, max(self.out_indices) + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


class Encoder(nn.Module):
    """Multi-scale feature extractor.

    ``forward(x)`` takes a *normalised* batch (B, 3, H, W) and returns one map per selected layer,
    ``(B, channels[i], H / strides[i], W / strides[i])``. Use ``normalize`` (or ``features``) on
    [0, 1] images. A frozen encoder has no trainable parameters and stays in eval mode even after
    ``.train()``, so its BatchNorm statistics never change.
    """

    norm_mean: Tensor
    norm_std: Tensor

    def __init__(
        self,
        name: str,
        body: nn.Module,
        channels: Sequence[int],
        strides: Sequence[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        frozen: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.channels = list(channels)
        self.strides = list(strides)
        self.mean, self.std = tuple(mean), tuple(std)
        # Non-persistent buffers: follow .to()/ONNX export, stay out of state dicts and checkpoints.
        self.register_buffer("norm_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> Encoder:
        """Set train/eval mode; a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def normalize(self, x01: Tensor) -> Tensor:
        """Map images in [0, 1], (B, 3, H, W), to this backbone's input statistics."""
        return (x01 - self.norm_mean) / self.norm_std

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normalised images (B, 3, H, W) -> list of feature maps (B, C_i, H/s_i, W/s_i)."""
        return self.body(x)

    def features(self, x01: Tensor) -> list[Tensor]:
        """Shortcut for ``self(self.normalize(x01))`` on images in [0, 1]."""
        return self(self.normalize(x01))

    def extra_repr(self) -> str:  # noqa: D102
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}, frozen={self.frozen}"


# EfficientNet-Lite: lukemelas-style keys (the ML Illustrated weight packages) -> timm keys.
_LITE_TOP = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
}
# Block 0 of stage 0 is depthwise-separable (no expansion conv); every other block is inverted residual.
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_LITE_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+?)\.(\w+)$")


def efficientnet_lite_to_timm(
    state_dict: dict[str, Tensor], stage_depths: Sequence[int]
) -> dict[str, Tensor]:
    """Rename an EfficientNet-Lite state dict from lukemelas keys to timm ``tf_efficientnet_liteN`` keys.

    ``stage_depths`` are the blocks per stage of the timm model (``[len(s) for s in model.blocks]``);
    the flat ``_blocks.{i}`` index is split into ``blocks.{stage}.{j}``.
    """
    position = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    matches = (_LITE_BLOCK_KEY.match(k) for k in state_dict)
    expanded = {int(m.group(1)) for m in matches if m and m.group(2) == "_expand_conv"}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _LITE_BLOCK_KEY.match(key)
        if match is None:
            prefix, _, rest = key.partition(".")
            if prefix not in _LITE_TOP:
                raise WeightsError(f"Unexpected EfficientNet-Lite key {key!r}.")
            out[f"{_LITE_TOP[prefix]}.{rest}"] = value
            continue
        flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
        if flat >= len(position):
            raise WeightsError(f"EfficientNet-Lite key {key!r}: block {flat} beyond {len(position)} blocks.")
        stage, j = position[flat]
        table = _LITE_IR_BLOCK if flat in expanded else _LITE_DS_BLOCK
        out[f"blocks.{stage}.{j}.{table[module]}.{rest}"] = value
    return out


def _load_into(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Strictly load the part of ``state_dict`` that ``module`` needs; extra keys (e.g. fc) are dropped."""
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in state_dict]
    if missing:
        raise WeightsError(
            f"Weight file {source!r} lacks {len(missing)} keys the encoder needs, e.g. {missing[:3]} "
            f"(file keys start with {list(state_dict)[:3]}). Is it for another architecture?"
        )
    bad = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
           for k, v in wanted.items() if state_dict[k].shape != v.shape]
    if bad:
        raise WeightsError(f"Weight file {source!r} does not match the encoder: {bad[:3]}.")
    module.load_state_dict({k: state_dict[k] for k in wanted}, strict=True)


def _check_layers(name: str, layers: Sequence[int], valid: range) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    if not layers or list(layers) != sorted(set(layers)) or not all(i in valid for i in layers):
        raise ConfigError(
            f"Encoder {name!r}: layers={layers} must be strictly increasing indices in "
            f"{valid.start}..{valid.stop - 1}."
        )
    return layers


_Parts = tuple[Any, list[int], list[int], tuple[float, float, float], tuple[float, float, float]]


def _build_resnet(name: str, layers: Sequence[int], weights: str | None) -> _Parts:
    layers = _check_layers(name, layers, range(1, 5))
    path = resolve_weights(name, weights)  # before building: fail fast, never fall back to random
    trunk = _ResNetTrunk(_RESNETS[name](weights=None), layers)
    if path is not None:
        _load_into(trunk, load_state_dict_file(path), str(path))
    stages = [getattr(trunk, f"layer{i}") for i in layers]
    channels = [stage[-1].conv3.out_channels if hasattr(stage[-1], "conv3") else stage[-1].conv2.out_channels
                for stage in stages]
    strides = [2 ** (i + 1) for i in layers]
    return trunk, channels, strides, IMAGENET_MEAN, IMAGENET_STD


def _build_lite(name: str, layers: Sequence[int], weights: str | None) -> _Parts:
    layers = _check_layers(name, layers, range(5))
    path = resolve_weights(name, weights)
    body: Any = timm.create_model(_LITES[name], pretrained=False, features_only=True, out_indices=layers)
    stage_depths = [len(stage) for stage in body.blocks]
    if path is not None:
        state_dict = load_state_dict_file(path)
        if any(k.startswith("_blocks.") for k in state_dict):
            state_dict = efficientnet_lite_to_timm(state_dict, stage_depths)
        _load_into(body, state_dict, str(path))
    # Stages after the last requested feature are never used: drop them to save compute.
    modules = [info["module"] for info in body.feature_info.get_dicts()]
    last_block = max((int(m.split(".")[1]) for m in modules if m.startswith("blocks.")), default=-1)
    body.blocks = body.blocks[: last_block + 1]
    return body, body.feature_info.channels(), body.feature_info.reduction(), LITE_MEAN, LITE_STD


def build_encoder(
    name: str,
    layers: Sequence[int] | None = None,
    weights: str | None = "imagenet",
    frozen: bool = True,
) -> Encoder:
    """Build a multi-scale encoder.

    name: one of ``ENCODER_NAMES``. layers: for ResNets 1..4 = ``layer1..layer4`` (strides 4..32);
    for EfficientNet-Lite timm feature indices 0..4 (strides 2..32). Default (1, 2, 3), strides 4, 8, 16.
    weights: ``"imagenet"`` (resolved by ``kdad.weights.resolve_weights``), a ``.pth`` path, or
    ``"random"``/None for random init. frozen: True for a teacher (no grads, always eval);
    False for a trainable student of the same architecture (e.g. STFPM's random-init resnet18).
    Returns an Encoder mapping normalised (B, 3, H, W) to ``[(B, channels[i], H/strides[i], W/strides[i])]``.
    """
    layers = DEFAULT_LAYERS if layers is None else layers
    if name in _RESNETS:
        body, channels, strides, mean, std = _build_resnet(name, layers, weights)
    elif name in _LITES:
        body, channels, strides, mean, std = _build_lite(name, layers, weights)
    else:
        raise ConfigError(f"Unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}.")
    return Encoder(name, body, channels, strides, mean, std, frozen=frozen)
