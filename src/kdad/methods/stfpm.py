"""STFPM — Student-Teacher Feature Pyramid Matching (Wang et al., BMVC 2021).

Official code gdwang08/STFPM (../shared/REFERENCE.md §3.5): ResNet18 teacher (ImageNet), ResNet18 student
from scratch, layers 1-3; loss = sum over levels of mean ||t/|t| - s/|s|||^2; SGD lr 0.4, momentum 0.9,
weight decay 1e-4, batch 32; 20% of train/good held out and the epoch with the lowest mean anomaly map on it
is kept. Map: per level squared distance of normalised features, bilinear to the layer-1 size, product,
bilinear to image size, no Gaussian; score = max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdad.blocks.losses import normalized_l2_loss
from kdad.blocks.maps import (
    AnomalyMapHead,
    AnomalyOutput,
    Fuse,
    MapNorm,
    calibrate_position_norm,
    check_map_norm,
    pool_features,
)
from kdad.blocks.teachers import build_encoder
from kdad.methods.base import MethodSpec, optimizer_step, uses_position_norm

PAPER = "Wang et al., Student-Teacher Feature Pyramid Matching for Anomaly Detection, BMVC 2021"


@dataclass(frozen=True)
class Config:
    """STFPM hyperparameters; defaults are the official code's."""

    backbone: str = "resnet18"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"  # teacher weights; the student always starts from random init
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    fuse: Fuse = "mul"
    sigma: float = 0.0
    pool: int = 1  # k x k mean of both feature maps before loss and map (1 = the official per-position form)
    map_norm: MapNorm = "none"  # "position": the map over the held-out normals' mean map (kdad's option)

    def __post_init__(self) -> None:
        check_map_norm("stfpm", self.map_norm)


class Model(nn.Module):
    """Frozen teacher + trainable student of the same architecture."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        self.student = build_encoder(cfg.backbone, tuple(cfg.layers), weights="random", frozen=False)
        self.head = AnomalyMapHead("l2norm", cfg.fuse, cfg.sigma, align_corners=False, fuse_level=0,
                                   pool=cfg.pool, map_norm=cfg.map_norm)  # type: ignore[arg-type]

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher_feats, student_feats); both see the teacher's normalisation."""
        x = self.encoder.normalize(images)
        with torch.no_grad():
            teacher = list(self.encoder(x))
        return teacher, list(self.student(x))

    def forward(self, images: Tensor) -> AnomalyOutput:
        teacher, student = self.pairs(images)
        return self.head(teacher, student, (int(images.shape[-2]), int(images.shape[-1])))


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """SGD over the student."""
    opt = torch.optim.SGD(model.student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return {"student": opt}


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, Tensor]:
    """One SGD step on the normalised-L2 feature loss."""
    teacher, student = model.pairs(batch["image"])
    loss = normalized_l2_loss(pool_features(teacher, cfg.pool), pool_features(student, cfg.pool))
    return optimizer_step(opts["student"], loss, batch.get("grad_scaler"), batch.get("backward"))


SPEC = MethodSpec("stfpm", Config, Model, optimizers, train_step, PAPER, graph_safe=True, grad_scaler=True,
                  calibrate=calibrate_position_norm, calibrates=uses_position_norm)
