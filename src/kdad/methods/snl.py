"""SNL — Structural Teacher-Student Normality Learning for Multi-Class Anomaly Detection (Deng & Li).

Only the abstract is available (../shared/REFERENCE.md §3.8) and no code: every choice below is ours and is
explained in docs/methods/snl.md. Built on RD (same frozen teacher, OCBE and mirror decoder) with
(a) spatial-channel distillation: 1 - cos per position along C, and per channel along H*W;
(b) intra-affinity (HW x HW Gram of channel-normalised features, pooled to at most `affinity_size`^2
    positions) and inter-affinity (B x B cosine of pooled image descriptors) distillation;
(c) CRAM: soft residuals of the bottleneck code to K learned centres, aggregated and added (through a
    zero-initialised 1x1 conv) to the decoder input, plus a compactness loss.
Each part is switchable; with all of them off the loss, model and map are RD's.
Inference = RD's map (sum over layers of 1 - cos, Gaussian sigma 4), score = max.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.decoders import check_readout
from kdad.blocks.losses import global_cosine_loss
from kdad.blocks.maps import Fuse, MapNorm, calibrate_position_norm, check_map_norm
from kdad.errors import ConfigError
from kdad.methods import rd
from kdad.methods.base import MethodSpec, backward, uses_position_norm

PAPER = ("Deng & Li, Structural Teacher-Student Normality Learning for Multi-Class Anomaly Detection and "
         "Localization; designed from the abstract (no code or full text public), not the paper's method")


@dataclass(frozen=True)
class Config:
    """SNL hyperparameters: RD's (paper defaults) plus one switch and one weight per SNL component."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"
    decoder_blocks: tuple[int, ...] = ()
    decoder_width: float = 0.5  # rd.Config's: generic decoder / OCBE sizes for non-ResNet teachers
    ocbe_width: int = 64
    pool: int = 1
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    fuse: Fuse = "sum"
    sigma: float = 4.0
    align_corners: bool = True
    map_norm: MapNorm = "none"  # rd.Config's: "position" divides the map by the held-out normals' mean map
    readout: str = "relu"  # rd.Config's: "linear" lets the student match a signed (EfficientNet-Lite) teacher
    global_loss: bool = True  # RD's flattened cosine loss (the base SNL is built on)
    spatial: bool = True  # (a) 1 - cos along C at every position
    channel: bool = True  # (a) 1 - cos along H*W for every channel
    intra: bool = True  # (b) position-to-position affinity within an image
    inter: bool = True  # (b) image-to-image affinity within the batch
    cram: bool = True  # (c) central residual aggregation module + compactness loss
    spatial_weight: float = 1.0
    channel_weight: float = 1.0
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    compact_weight: float = 0.1
    affinity_size: int = 16  # intra-affinity on at most this^2 positions (avg-pooled): memory B * size^4
    cram_centres: int = 16  # K
    cram_temperature: float = 0.1  # softmax temperature of the cosine soft assignment

    def __post_init__(self) -> None:
        check_map_norm("snl", self.map_norm)
        check_readout("snl", self.readout)


def cosine_distance_along(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """1 - cos(a, b) along `dim`, as |a/|a| - b/|b||^2 / 2: equal to 1 - cos, and 0 for two zero vectors."""
    diff = F.normalize(a.float(), dim=dim) - F.normalize(b.float(), dim=dim)
    return 0.5 * (diff * diff).sum(dim=dim)


def spatial_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the mean over (B, H, W) of 1 - cos along channels; in [0, 2] per layer."""
    return sum((cosine_distance_along(t, s, 1).mean() for t, s in zip(teacher, student)), torch.zeros(()))


def channel_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the mean over (B, C) of 1 - cos along H*W (each channel's spatial pattern)."""
    return sum((cosine_distance_along(t.flatten(2), s.flatten(2), 2).mean() for t, s in zip(teacher, student)),
               torch.zeros(()))


def intra_affinity(feats: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, P, P) cosine between positions, P = HW after avg-pooling to at most size x size."""
    h, w = int(feats.shape[-2]), int(feats.shape[-1])
    if h > size or w > size:
        feats = F.adaptive_avg_pool2d(feats, (min(h, size), min(w, size)))
    unit = F.normalize(feats.float().flatten(2), dim=1)
    return unit.transpose(1, 2) @ unit


def inter_affinity(feats: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, B) cosine between the images' spatially averaged descriptors."""
    unit = F.normalize(feats.float().mean(dim=(2, 3)), dim=1)
    return unit @ unit.t()


def intra_loss(teacher: Sequence[Tensor], student: Sequence[Tensor], size: int) -> Tensor:
    """Sum over layers of the mean squared difference of intra-affinity matrices; in [0, 4] per layer."""
    return sum((F.mse_loss(intra_affinity(s, size), intra_affinity(t, size)) for t, s in zip(teacher, student)),
               torch.zeros(()))


def inter_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the mean squared difference of B x B inter-affinity matrices (0 for B = 1)."""
    return sum((F.mse_loss(inter_affinity(s), inter_affinity(t)) for t, s in zip(teacher, student)),
               torch.zeros(()))


class CRAM(nn.Module):
    """Central residual aggregation on a code (B, D, h, w) with K learned unit centres.

    a_ik = softmax_k(cos(z_i, c_k) / T); v_i = sum_k a_ik (z_i/|z_i| - c_k/|c_k|); out = z + conv1x1(v), the
    conv zero-initialised so training starts from RD. `compactness` = mean_i sum_k a_ik |z_i/|z_i| - c_k/|c_k||^2.
    """

    def __init__(self, dim: int, centres: int, temperature: float) -> None:
        super().__init__()
        self.centres = nn.Parameter(F.normalize(torch.randn(centres, dim), dim=1))
        self.temperature = float(temperature)
        self.project = nn.Conv2d(dim, dim, 1, bias=False)
        nn.init.zeros_(self.project.weight)

    def assign(self, code: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unit code (B, P, D), unit centres (K, D), soft assignment (B, P, K)) for a code (B, D, h, w)."""
        unit = F.normalize(code.flatten(2).transpose(1, 2), dim=2)
        centres = F.normalize(self.centres, dim=1)
        return unit, centres, torch.softmax(unit @ centres.t() / self.temperature, dim=2)

    def compactness(self, code: Tensor) -> Tensor:
        """Soft within-centre scatter of the unit code, in [0, 4]: pulls normal codes onto the centres."""
        unit, centres, assign = self.assign(code)
        sq = (unit.unsqueeze(2) - centres.view(1, 1, *centres.shape)).pow(2).sum(dim=3)  # (B, P, K)
        return (assign * sq).sum(dim=2).mean()

    def forward(self, code: Tensor) -> Tensor:
        unit, centres, assign = self.assign(code)
        residual = unit - assign @ centres  # sum_k a_ik (z_i - c_k), since sum_k a_ik = 1
        residual = residual.transpose(1, 2).reshape(code.shape)
        return code + self.project(residual)


class Model(rd.Model):
    """RD's teacher + OCBE (+ CRAM) + mirror decoder. forward(images in [0,1], (B,3,H,W)) -> AnomalyOutput."""

    def __init__(self, cfg: Config) -> None:
        if not any((cfg.global_loss, cfg.spatial, cfg.channel, cfg.intra, cfg.inter, cfg.cram)):
            raise ConfigError("snl: every loss is off; enable one of model.global_loss, spatial, channel, "
                              "intra, inter, cram")
        # RD's blocks built first in RD's order, so with CRAM off the same seed gives RD's initial weights.
        super().__init__(cfg)  # type: ignore[arg-type]
        self.cram = CRAM(self.bottleneck.out_channels, cfg.cram_centres, cfg.cram_temperature) if cfg.cram else None

    def code(self, teacher: list[Tensor]) -> Tensor:
        """Bottleneck code (B, D, h, w) that the decoder reads (after CRAM when enabled)."""
        code = self.bottleneck(teacher)
        return self.cram(code) if self.cram is not None else code

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher_feats, student_feats); student grads flow, teacher's do not."""
        teacher = self.teacher_features(images)
        return teacher, self.decoder(self.code(teacher))


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam over OCBE + CRAM + decoder (the teacher is frozen)."""
    params = [p for m in (model.bottleneck, model.cram, model.decoder) if m is not None for p in m.parameters()]
    return {"student": torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))}


def snl_losses(model: Model, images: Tensor, cfg: Config) -> dict[str, Tensor]:
    """Each enabled loss term, already weighted, for a batch of images in [0, 1]."""
    teacher = model.teacher_features(images)
    code = model.bottleneck(teacher)
    terms: dict[str, Tensor] = {}
    if model.cram is not None:
        terms["compact"] = cfg.compact_weight * model.cram.compactness(code)
        code = model.cram(code)
    student = model.decoder(code)
    if cfg.global_loss:
        terms["global"] = global_cosine_loss(teacher, student)
    if cfg.spatial:
        terms["spatial"] = cfg.spatial_weight * spatial_loss(teacher, student)
    if cfg.channel:
        terms["channel"] = cfg.channel_weight * channel_loss(teacher, student)
    if cfg.intra:
        terms["intra"] = cfg.intra_weight * intra_loss(teacher, student, cfg.affinity_size)
    if cfg.inter:
        terms["inter"] = cfg.inter_weight * inter_loss(teacher, student)
    return terms


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """One Adam step on the sum of the enabled terms; logs each term and the total."""
    terms = snl_losses(model, batch["image"], cfg)
    loss = torch.stack(list(terms.values())).sum()
    opt = opts["student"]
    opt.zero_grad(set_to_none=True)
    backward(batch, loss)
    opt.step()
    return {"loss": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}}


SPEC = MethodSpec("snl", Config, Model, optimizers, train_step, PAPER, calibrate=calibrate_position_norm,
                  calibrates=uses_position_norm)
