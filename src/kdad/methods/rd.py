"""RD — Anomaly Detection via Reverse Distillation from One-Class Embedding (Deng & Li, CVPR 2022).

Frozen teacher encoder -> OCBE bottleneck -> student decoder that reconstructs the teacher's features.
Recipe from the official code hq-deng/RD4AD (../shared/REFERENCE.md §3.1): global flattened cosine loss
summed over 3 layers (the paper's eq. 2 averages a per-position cosine instead: ``loss="per_position"``);
Adam lr 0.005, betas (0.5, 0.999); batch 16; 200 epochs, last epoch kept;
map = sum over layers of 1 - cos, bilinear (align_corners=True) to image size, Gaussian sigma 4; score = max.
kdad's option ``map_norm: position`` (not in the paper or the official code) divides that map by the held-out
normals' mean map (kdad.blocks.maps.PositionNorm; docs/methods/rd.md, "Map normalisation").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdad.blocks.decoders import check_readout, decoder_for
from kdad.blocks.losses import global_cosine_loss, pixel_cosine_loss
from kdad.blocks.maps import (
    AnomalyMapHead,
    AnomalyOutput,
    Fuse,
    MapNorm,
    calibrate_position_norm,
    check_map_norm,
    pool_features,
)
from kdad.blocks.ocbe import build_bottleneck
from kdad.blocks.teachers import build_encoder
from kdad.errors import ConfigError
from kdad.methods.base import MethodSpec, optimizer_step, uses_position_norm

PAPER = "Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022"

# "global": the official code's cosine of each sample's whole flattened C*H*W tensor (loss_fucntion);
# "per_position": the paper's eq. 2, the mean over positions of 1 - channel cosine (docs/methods/rd.md)
LOSSES = ("global", "per_position")


@dataclass(frozen=True)
class Config:
    """RD hyperparameters; defaults are the paper's / official code's."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"  # "imagenet" (resolved offline-first), a file path, or "random"
    decoder_blocks: tuple[int, ...] = ()  # () = RD4AD's stages for ResNets, (2, 2, 2) otherwise
    # non-ResNet teachers only: generic decoder block width / teacher channels, and OCBE width per group
    # (RD4AD defines neither; 0.5 and 64 were kdad's first guess, too thin for Lite0: docs/methods/rd.md)
    decoder_width: float = 0.5
    pool: int = 1  # k x k mean of teacher and student features before loss and map (1 = official)
    ocbe_width: int = 64
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    fuse: Fuse = "sum"
    sigma: float = 4.0
    align_corners: bool = True
    loss: str = "global"  # "global" (official code) | "per_position" (the paper's eq. 2)
    map_norm: MapNorm = "none"  # "position": the map over the held-out normals' mean map (kdad's option)
    # with map_norm position: the mean map shrunk towards its global mean by this share (0 = the plain mean map,
    # 1 = a constant: the raw map's ranking); "auto" chooses among 0, 0.25, 0.5 and 1 on synthetic anomalies pasted
    # onto the held-out normals (kdad.blocks.map_choice)
    map_norm_shrink: float | Literal["auto"] = 0.0
    # with map_norm position: no position divided by less than this share of the mean map's global mean
    map_norm_floor: float = 0.0
    # "linear": a 1x1 convolution after each decoder stage, so the student can output the negative values of a
    # teacher with signed features (EfficientNet-Lite); "relu" is RD4AD's (kdad's option, kdad.blocks.decoders)
    readout: str = "relu"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"rd model.loss={self.loss!r} is not valid; choose one of {LOSSES}")
        check_map_norm("rd", self.map_norm)
        check_readout("rd", self.readout)
        for key in ("map_norm_shrink", "map_norm_floor"):
            value = getattr(self, key)
            if key == "map_norm_shrink" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"rd model.{key}={value} must be in [0, 1]"
                                  + (" or auto" if key == "map_norm_shrink" else ""))


class Model(nn.Module):
    """Teacher encoder + OCBE + mirror decoder. forward(images in [0,1], (B,3,H,W)) -> AnomalyOutput."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        channels = list(self.encoder.channels)
        self.bottleneck = build_bottleneck(cfg.backbone, channels, cfg.ocbe_width)
        blocks = tuple(cfg.decoder_blocks) or None
        self.decoder = decoder_for(cfg.backbone, channels, self.bottleneck.out_channels, blocks, cfg.decoder_width,
                                   cfg.readout)
        self.head = AnomalyMapHead("cosine", cfg.fuse, cfg.sigma, cfg.align_corners,  # type: ignore[arg-type]
                                   pool=cfg.pool, map_norm=cfg.map_norm)

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """Frozen teacher features of images in [0, 1]."""
        with torch.no_grad():
            return list(self.encoder(self.encoder.normalize(images)))

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher_feats, student_feats) for the loss; student grads flow, teacher's do not."""
        teacher = self.teacher_features(images)
        student = self.decoder(self.bottleneck(teacher))
        return teacher, student

    def forward(self, images: Tensor) -> AnomalyOutput:
        teacher, student = self.pairs(images)
        return self.head(teacher, student, (int(images.shape[-2]), int(images.shape[-1])))


def rd_loss(teacher: list[Tensor], student: list[Tensor], form: str = "global") -> Tensor:
    """Sum over layers of 1 - cosine: of the flattened C*H*W vectors ("global", official) or per position."""
    return global_cosine_loss(teacher, student) if form == "global" else pixel_cosine_loss(teacher, student)


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam over OCBE + decoder (the teacher is frozen)."""
    params = list(model.bottleneck.parameters()) + list(model.decoder.parameters())
    return {"student": torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))}


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, Tensor]:
    """One Adam step on the teacher-student cosine loss (``cfg.loss``: global flattened or per-position)."""
    teacher, student = model.pairs(batch["image"])
    loss = rd_loss(pool_features(teacher, cfg.pool), pool_features(student, cfg.pool), cfg.loss)
    return optimizer_step(opts["student"], loss, batch.get("grad_scaler"), batch.get("backward"))


SPEC = MethodSpec("rd", Config, Model, optimizers, train_step, PAPER, graph_safe=True, grad_scaler=True,
                  calibrate=calibrate_position_norm, calibrates=uses_position_norm)
