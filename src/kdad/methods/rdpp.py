"""RD++ — Revisiting Reverse Distillation for Anomaly Detection (Tien et al., CVPR 2023).

Frozen teacher E -> per-level projection P -> OCBE -> decoder D; the map compares E(x) with D.
Recipe: ../shared/REFERENCE.md §3.2 (official code tientrandinh/Revisiting-Reverse-Distillation).

- Projection per level: 4 x [conv3x3 with bias -> InstanceNorm2d -> LeakyReLU], channels c -> c/2 -> c/4 -> c/2 -> c.
- Inputs: clean x and a simplex-noise copy x~ (kdad.synthesis kind "simplex").
- L_distill = global cosine(E(x), D(OCBE(P(E(x))))); L_recon = per-pixel cosine(P(E(x~)), P(E(x)));
  L_contrast = CosineEmbeddingLoss(margin 0.5, target -1)(vec E(x~), vec P(E(x))); L_ssot (below);
  L_proj = (L_ssot + 0.01 L_recon + 0.1 L_contrast) / 1.11; total = L_distill + 0.2 L_proj.
- Two Adams (projection lr 1e-3, OCBE + decoder lr 5e-3, betas (0.5, 0.999)); gradient accumulation 2:
  backward every batch, step and zero every 2nd (the counter is the model buffer ``accum_count``).

Deviation (L_ssot): the official geomloss call compares two (B, C*H*W) softmaxed tensors, i.e. one cloud of B
points with its rows permuted, so the debiased Sinkhorn divergence is exactly 0 (~1e-10 measured).
``ssot="official"`` reproduces that (returns 0 without computing it). The default ``ssot="sinkhorn"`` is a working
batched form: per level, each image's per-pixel projected features (average-pooled to ``ssot_grid``^2 points,
L2-normalised over channels) form a point cloud, compared with the cloud of another image of the batch (random
cyclic shift) by a debiased entropic Sinkhorn divergence, cost |x - y|^2 / 2, log-domain, epsilon annealing.
Synthesis clamps x~ to [0, 1] (kdad's image contract); the official code does not clip.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.decoders import check_readout, decoder_for
from kdad.blocks.losses import flatten_pair, global_cosine_loss, pixel_cosine_loss
from kdad.blocks.maps import AnomalyMapHead, AnomalyOutput, Fuse, MapNorm, calibrate_position_norm, check_map_norm
from kdad.blocks.ocbe import build_bottleneck
from kdad.blocks.teachers import build_encoder
from kdad.dicts import deep_merge, from_dict, to_dict
from kdad.errors import ConfigError
from kdad.methods.base import MethodSpec, backward, uses_position_norm
from kdad.synthesis import SynthesisConfig, synthesize

PAPER = "Tien et al., Revisiting Reverse Distillation for Anomaly Detection, CVPR 2023"
SSOT_MODES = ("sinkhorn", "official")
SYNTHESIS = SynthesisConfig(kind="simplex")
"""RD++'s synthesis defaults (official simplex box); ``Config.synthesis`` holds overrides of these."""


@dataclass(frozen=True)
class Config:
    """RD++ hyperparameters; defaults are the official code's (the paper gives the same values)."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"
    decoder_blocks: tuple[int, ...] = ()  # () = RD4AD's stages for ResNets, (2, 2, 2) otherwise
    readout: str = "relu"  # "linear" for a signed (Lite) teacher: kdad.blocks.decoders, docs/methods/rd.md
    lr: float = 0.005  # OCBE + decoder ("distill_lr")
    proj_lr: float = 0.001
    betas: tuple[float, float] = (0.5, 0.999)
    accumulate: int = 2  # optimizer step every N batches, gradients summed (not averaged)
    weight_proj: float = 0.2
    weight_ssot: float = 1.0
    weight_recon: float = 0.01
    weight_contrast: float = 0.1
    contrast_margin: float = 0.5
    proj_negative_slope: float = 0.01
    ssot: str = "sinkhorn"
    ssot_grid: int = 8  # per-pixel clouds average-pooled to at most grid x grid points
    ssot_eps: float = 0.05  # entropic regularisation (cost on unit vectors lies in [0, 2])
    ssot_iters: int = 10  # Sinkhorn iterations at the final epsilon, after annealing
    ssot_scaling: float = 0.7  # epsilon annealing factor from the cost diameter down to ssot_eps
    synthesis: dict[str, Any] = field(default_factory=dict)  # overrides of SYNTHESIS (SynthesisConfig fields)
    fuse: Fuse = "sum"
    sigma: float = 4.0
    align_corners: bool = True
    map_norm: MapNorm = "none"  # "position": the map over the held-out normals' mean map (kdad's option)

    def __post_init__(self) -> None:
        check_readout("rdpp", self.readout)
        check_map_norm("rdpp", self.map_norm)
        if self.ssot not in SSOT_MODES:
            raise ConfigError(f"rdpp model.ssot={self.ssot!r} is not valid; choose one of {SSOT_MODES}")
        if self.accumulate < 1:
            raise ConfigError(f"rdpp model.accumulate={self.accumulate} must be >= 1")
        if not 0 < self.ssot_scaling < 1:
            raise ConfigError(f"rdpp model.ssot_scaling={self.ssot_scaling} must lie in (0, 1)")
        if self.synthesis_config().kind != "simplex":
            raise ConfigError("rdpp needs model.synthesis.kind 'simplex'")

    def synthesis_config(self) -> SynthesisConfig:
        """``SYNTHESIS`` with the ``synthesis`` overrides applied (strict: unknown keys raise ConfigError)."""
        return from_dict(SynthesisConfig, deep_merge(to_dict(SYNTHESIS), dict(self.synthesis)), "model.synthesis")


class ProjLayer(nn.Module):
    """4 x [conv3x3 (bias) -> InstanceNorm2d -> LeakyReLU]; (B, c_in, h, w) -> (B, c_out, h, w)."""

    def __init__(self, c_in: int, c_out: int, negative_slope: float = 0.01) -> None:
        super().__init__()
        widths = [c_in, max(1, c_in // 2), max(1, c_in // 4), max(1, c_in // 2), c_out]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.InstanceNorm2d(b), nn.LeakyReLU(negative_slope)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Model(nn.Module):
    """Frozen teacher + projection + OCBE + decoder. forward(images in [0,1], (B,3,H,W)) -> AnomalyOutput."""

    accum_count: Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        channels = list(self.encoder.channels)
        self.proj = nn.ModuleList([ProjLayer(c, c, cfg.proj_negative_slope) for c in channels])
        self.bottleneck = build_bottleneck(cfg.backbone, channels)
        self.decoder = decoder_for(cfg.backbone, channels, self.bottleneck.out_channels,
                                   tuple(cfg.decoder_blocks) or None, readout=cfg.readout)
        self.head = AnomalyMapHead("cosine", cfg.fuse, cfg.sigma, cfg.align_corners,  # type: ignore[arg-type]
                                   map_norm=cfg.map_norm)
        self.register_buffer("accum_count", torch.zeros((), dtype=torch.long))  # batches seen by train_step

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """Frozen teacher features of images in [0, 1]."""
        with torch.no_grad():
            return list(self.encoder.features(images))

    def project(self, feats: list[Tensor]) -> list[Tensor]:
        """P = per-level projection of teacher features."""
        return [p(f) for p, f in zip(self.proj, feats)]

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher_feats, student_feats): the student decodes the *projected* teacher features."""
        teacher = self.teacher_features(images)
        return teacher, self.decoder(self.bottleneck(self.project(teacher)))

    def forward(self, images: Tensor) -> AnomalyOutput:
        teacher, student = self.pairs(images)
        return self.head(teacher, student, (int(images.shape[-2]), int(images.shape[-1])))


def contrast_loss(noisy_teacher: list[Tensor], proj: list[Tensor], margin: float = 0.5) -> Tensor:
    """Sum over levels of mean_b max(0, cos(vec E(x~)_b, vec P_b) - margin) (CosineEmbeddingLoss, target -1)."""
    total = torch.zeros((), device=proj[0].device)
    for t, p in zip(noisy_teacher, proj):
        target = -torch.ones(p.shape[0], device=p.device)
        tv, pv = flatten_pair(t, p)
        total = total + F.cosine_embedding_loss(tv.float(), pv.float(), target, margin=margin)
    return total


def _ot_eps(x: Tensor, y: Tensor, eps_schedule: list[float]) -> Tensor:
    """Entropic OT cost <a, f> + <b, g> between uniform clouds x (B, N, D) and y (B, M, D), cost |x-y|^2/2.

    Log-domain Sinkhorn under no_grad, then one differentiable update of both potentials (the envelope
    gradient at convergence, as geomloss does).
    """
    cost = 0.5 * torch.cdist(x, y).pow(2)
    log_a = torch.full(x.shape[:2], -math.log(x.shape[1]), device=x.device, dtype=x.dtype)
    log_b = torch.full(y.shape[:2], -math.log(y.shape[1]), device=y.device, dtype=y.dtype)

    def f_update(g: Tensor, c: Tensor, eps: float) -> Tensor:
        return -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - c) / eps, dim=2)

    def g_update(f: Tensor, c: Tensor, eps: float) -> Tensor:
        return -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - c) / eps, dim=1)

    with torch.no_grad():
        c = cost.detach()
        f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
        for eps in eps_schedule:
            f, g = 0.5 * (f + f_update(g, c, eps)), 0.5 * (g + g_update(f, c, eps))  # symmetric, damped
    eps = eps_schedule[-1]
    f_final, g_final = f_update(g, cost, eps), g_update(f, cost, eps)
    return f_final.mean(1) + g_final.mean(1)


def sinkhorn_divergence(x: Tensor, y: Tensor, eps: float, iters: int, scaling: float) -> Tensor:
    """Debiased Sinkhorn divergence S(x, y) = OT(x, y) - OT(x, x)/2 - OT(y, y)/2 per batch item, (B,), >= 0.

    x (B, N, D), y (B, M, D) uniform point clouds; 0 for identical clouds.
    """
    diameter = float(0.5 * torch.cdist(x.detach(), y.detach()).pow(2).amax().clamp_min(eps))
    schedule = [diameter * scaling**k for k in range(int(math.log(eps / diameter) / math.log(scaling)) + 1)]
    schedule = [e for e in schedule if e > eps] + [eps] * iters
    if x.shape == y.shape:  # one batched solve for the three transport problems
        xy, xx, yy = _ot_eps(torch.cat([x, x, y]), torch.cat([y, x, y]), schedule).chunk(3)
    else:
        xy, xx, yy = _ot_eps(x, y, schedule), _ot_eps(x, x, schedule), _ot_eps(y, y, schedule)
    return (xy - 0.5 * xx - 0.5 * yy).clamp_min(0.0)


def ssot_loss(proj: list[Tensor], cfg: Config, gen: torch.Generator) -> Tensor:
    """Sum over levels of the mean Sinkhorn divergence between each image's pixel cloud and another image's."""
    batch = proj[0].shape[0]
    if cfg.ssot == "official" or batch < 2:
        return torch.zeros((), device=proj[0].device)
    shift = int(torch.randint(1, batch, (1,), generator=gen))
    total = torch.zeros((), device=proj[0].device)
    for p in proj:
        pooled = F.adaptive_avg_pool2d(p.float(), (min(cfg.ssot_grid, p.shape[-2]), min(cfg.ssot_grid, p.shape[-1])))
        cloud = F.normalize(pooled.flatten(2).transpose(1, 2), dim=2)  # (B, N, C) unit vectors
        other = torch.roll(cloud, shifts=shift, dims=0)
        total = total + sinkhorn_divergence(cloud, other, cfg.ssot_eps, cfg.ssot_iters, cfg.ssot_scaling).mean()
    return total


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """Projection Adam and distillation Adam (OCBE + decoder)."""
    distill = list(model.bottleneck.parameters()) + list(model.decoder.parameters())
    return {"proj": torch.optim.Adam(model.proj.parameters(), lr=cfg.proj_lr, betas=cfg.betas),
            "distill": torch.optim.Adam(distill, lr=cfg.lr, betas=cfg.betas)}


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """Backward L_distill + w L_proj every batch; both optimizers step and zero every `accumulate` batches."""
    images = batch["image"]
    noisy, _ = synthesize(images, cfg.synthesis_config(), gen)
    teacher, teacher_noisy = model.teacher_features(images), model.teacher_features(noisy)
    proj, proj_noisy = model.project(teacher), model.project(teacher_noisy)
    student = model.decoder(model.bottleneck(proj))
    l_distill = global_cosine_loss(teacher, student)
    l_recon = pixel_cosine_loss(proj, proj_noisy)
    l_contrast = contrast_loss(teacher_noisy, proj, cfg.contrast_margin)
    l_ssot = ssot_loss(proj, cfg, gen)
    weights = cfg.weight_ssot + cfg.weight_recon + cfg.weight_contrast
    l_proj = (cfg.weight_ssot * l_ssot + cfg.weight_recon * l_recon + cfg.weight_contrast * l_contrast) / weights
    loss = l_distill + cfg.weight_proj * l_proj
    backward(batch, loss)
    model.accum_count += 1
    if int(model.accum_count) % cfg.accumulate == 0:
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "distill": float(l_distill.detach()), "ssot": float(l_ssot.detach()),
            "recon": float(l_recon.detach()), "contrast": float(l_contrast.detach())}


SPEC = MethodSpec("rdpp", Config, Model, optimizers, train_step, PAPER, calibrate=calibrate_position_norm,
                  calibrates=uses_position_norm)
