"""URD — Unlocking the Potential of Reverse Distillation for Anomaly Detection (Liu et al., AAAI 2025).

Expert-Teacher-Student network (RD with Expert, "RD-E") plus Guided Information Injection (GII).
Recipe: ../shared/REFERENCE.md §3.3 (official code hito2448/URD) and the paper's eqs. 1-7 and Algorithm 1.

- Expert E: frozen ImageNet encoder. Teacher T: a trainable copy of E (Adam lr 1e-4, betas (0.5, 0.999)).
- Student S: RD's OCBE + mirror decoder + two GII modules (Adam lr 5e-3, betas (0.5, 0.999)).
- L_TE (eqs. 1-3): per-pixel |1 - cos(T, E(I_n)) - M_i|, for the normal image (M = 0) and the synthetic one.
- L_S (eqs. 4-6): global (flattened) cosine of S(T(I_n)) and S(T(I_a)) to the *normal* features T(I_n), E(I_n).
- Inference drops E: map = sum over 3 layers of 1 - cos(T, S), Gaussian sigma 4, score = max.

Where the paper and the code differ (defaults follow the paper; the code's choice is an option):
- ``injection``: "gii" = Algorithm 1 (paper's full method, Table 7 "+SA"); "wogii" = what the released
  training script runs (its dispatch is inverted): concat[F_S, F_Fuse] -> conv, i.e. Table 7's "+SC"; "none" = RD.
- ``similarity`` (only with "gii"): "SA" = Sim = cos(T^{i+1}, S^{i+1}); "SC" = Sim = 1 (naive skip through the
  SSA conv; an ablation that keeps the parameter count of SA).
- ``teacher_loss``: "paper" = eqs. 1-3; "official" adds the code's global term g(T(I_a), E(I_a)).
- ``synthesis`` (overrides of ``SYNTHESIS``) ``beta_range``: paper (0.15, 1] (eq. 7); code (0.2, 1].
- ``student_init``: "xavier" (official code: Xavier-normal on every student Conv2d; the paper is silent) | "rd".
- Layer masks are resampled from the full-size mask (paper); the code chains them from the previous layer's.

kdad's option ``map_norm: position`` (in neither) divides the map by the held-out normals' mean map, as for RD
(docs/methods/rd.md, "Map normalisation").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.decoders import check_readout, decoder_for
from kdad.blocks.losses import global_cosine_loss
from kdad.blocks.maps import (
    AnomalyMapHead,
    AnomalyOutput,
    Fuse,
    MapNorm,
    calibrate_position_norm,
    check_map_norm,
    cosine_distance,
)
from kdad.blocks.ocbe import build_bottleneck
from kdad.blocks.teachers import Encoder, build_encoder
from kdad.dicts import deep_merge, from_dict, to_dict
from kdad.errors import ConfigError
from kdad.methods.base import MethodSpec, backward, uses_position_norm
from kdad.synthesis import BETA_RANGE_PAPER, SynthesisConfig, TextureBank, compute_foreground, synthesize

PAPER = "Liu et al., Unlocking the Potential of Reverse Distillation for Anomaly Detection, AAAI 2025"
INJECTIONS = ("gii", "wogii", "none")
SIMILARITIES = ("SA", "SC")
TEACHER_LOSSES = ("paper", "official")
STUDENT_INITS = ("xavier", "rd")


SYNTHESIS = SynthesisConfig(kind="perlin_texture", beta_range=BETA_RANGE_PAPER)
"""URD's synthesis defaults (paper eq. 7 opacity range); ``Config.synthesis`` holds overrides of these."""


@dataclass(frozen=True)
class Config:
    """URD hyperparameters; defaults are the paper's (code-only choices are options, see module doc)."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"  # expert (and teacher initialisation) weights
    decoder_blocks: tuple[int, ...] = ()  # () = RD4AD's stages for ResNets, (2, 2, 2) otherwise
    readout: str = "relu"  # "linear" for a signed (Lite) teacher: kdad.blocks.decoders, docs/methods/rd.md
    lr: float = 0.005  # student (OCBE + decoder + GII)
    teacher_lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    expert: bool = True  # False: frozen teacher, student denoising only (Table 6 "Den")
    injection: str = "gii"
    similarity: str = "SA"
    teacher_loss: str = "paper"
    student_init: str = "xavier"
    mask_threshold: float = 0.5  # layer masks: bilinear (align_corners=True) resize, then > threshold
    synthesis: dict[str, Any] = field(default_factory=dict)  # overrides of SYNTHESIS (SynthesisConfig fields)
    fuse: Fuse = "sum"
    sigma: float = 4.0
    align_corners: bool = True
    map_norm: MapNorm = "none"  # "position": the map over the held-out normals' mean map (kdad's option)

    def __post_init__(self) -> None:
        check_readout("urd", self.readout)
        check_map_norm("urd", self.map_norm)
        for key, valid in (("injection", INJECTIONS), ("similarity", SIMILARITIES),
                           ("teacher_loss", TEACHER_LOSSES), ("student_init", STUDENT_INITS)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"urd model.{key}={getattr(self, key)!r} is not valid; choose one of {valid}")
        if self.synthesis_config().kind != "perlin_texture":
            raise ConfigError("urd needs model.synthesis.kind 'perlin_texture'")

    def synthesis_config(self) -> SynthesisConfig:
        """``SYNTHESIS`` with the ``synthesis`` overrides applied (strict: unknown keys raise ConfigError)."""
        return from_dict(SynthesisConfig, deep_merge(to_dict(SYNTHESIS), dict(self.synthesis)), "model.synthesis")


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class GII(nn.Module):
    """Guided Information Injection before decoder block S^i (URD supplement, Algorithm 1).

    Inputs: teacher F_T^i (B, c_lo, 2h, 2w), teacher F_T^{i+1} (B, c_hi, h, w), student F_S^{i+1} (B, c_hi, h, w).
    Output F_SGII^{i+1} (B, c_hi, h, w), which replaces F_S^{i+1} as the input of S^i.
    mode "gii": F_SSA = Conv(F_Fuse * Sim + F_S * (1 - Sim)); mode "wogii": F_SSA = F_Fuse (official script).
    """

    def __init__(self, c_lo: int, c_hi: int, mode: str = "gii", similarity: str = "SA") -> None:
        super().__init__()
        self.similarity = similarity
        self.reduce = _conv_bn_relu(c_lo, c_hi, 1)  # step 1 (after a bilinear x0.5 downsample)
        self.fuse = _conv_bn_relu(c_hi, c_hi, 3)  # step 2
        self.ssa: nn.Module | None = _conv_bn_relu(c_hi, c_hi, 3) if mode == "gii" else None  # step 4
        self.out = _conv_bn_relu(2 * c_hi, c_hi, 3)  # step 5

    def fused_teacher(self, t_lo: Tensor, t_hi: Tensor) -> Tensor:
        """F_Fuse^{i+1} = Conv3x3(Conv1x1(DownSample(F_T^i)) + F_T^{i+1})."""
        down = F.interpolate(t_lo, size=t_hi.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(self.reduce(down) + t_hi)

    @staticmethod
    def sim(t_hi: Tensor, s: Tensor) -> Tensor:
        """Sim = channel cosine of F_T^{i+1} and F_S^{i+1}, (B, 1, h, w) in [-1, 1]; no gradient (as the code)."""
        with torch.no_grad():
            return F.cosine_similarity(s.detach(), t_hi.detach(), dim=1).unsqueeze(1)

    def forward(self, t_lo: Tensor, t_hi: Tensor, s: Tensor, sim: Tensor | None = None) -> Tensor:
        """`sim` overrides the similarity map (tests, ablations); None = the configured one."""
        fused = self.fused_teacher(t_lo, t_hi)
        if self.ssa is None:
            injected = fused
        else:
            if sim is None:
                sim = torch.ones_like(s[:, :1]) if self.similarity == "SC" else self.sim(t_hi, s)
            injected = self.ssa(fused * sim + s * (1 - sim))
        return self.out(torch.cat([s, injected], dim=1))


class Model(nn.Module):
    """Expert (training only) + trainable teacher + student. forward(images in [0,1], (B,3,H,W)) -> AnomalyOutput."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.expert: Encoder | None = None
        self.teacher = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=not cfg.expert)
        if cfg.expert:
            self.expert = build_encoder(cfg.backbone, tuple(cfg.layers), weights="random", frozen=True)
            self.expert.body.load_state_dict(self.teacher.body.state_dict())  # same initial weights as T
        channels = list(self.teacher.channels)
        if len(channels) != 3:
            raise ConfigError(f"urd needs 3 teacher layers, got model.layers={list(cfg.layers)}")
        self.bottleneck = build_bottleneck(cfg.backbone, channels)
        self.decoder = decoder_for(cfg.backbone, channels, self.bottleneck.out_channels,
                                   tuple(cfg.decoder_blocks) or None, readout=cfg.readout)
        # gii[k] sits before decoder stage k + 1 (paper: before S^2, then S^1).
        self.gii = nn.ModuleList()
        if cfg.injection != "none":
            self.gii = nn.ModuleList([GII(channels[1], channels[2], cfg.injection, cfg.similarity),
                                      GII(channels[0], channels[1], cfg.injection, cfg.similarity)])
        if cfg.student_init == "xavier":
            for m in self.student_modules():
                for conv in m.modules():
                    if isinstance(conv, nn.Conv2d):
                        nn.init.xavier_normal_(conv.weight)
        self.head = AnomalyMapHead("cosine", cfg.fuse, cfg.sigma, cfg.align_corners,  # type: ignore[arg-type]
                                   map_norm=cfg.map_norm)
        self._foreground: dict[str, Tensor] = {}  # per training image path; never saved

    def student_modules(self) -> list[nn.Module]:
        """The trainable student: OCBE, decoder and GII modules."""
        return [self.bottleneck, self.decoder, self.gii]

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """Teacher features of images in [0, 1], without gradient (current train/eval mode of the teacher)."""
        with torch.no_grad():
            return list(self.teacher.features(images))

    def student(self, teacher: list[Tensor]) -> list[Tensor]:
        """Student features (teacher order: shallow first); each GII replaces the input of the next stage."""
        x = self.decoder.stages[0](self.bottleneck(teacher))
        outs = [x]
        for k in range(1, len(self.decoder.stages)):
            if len(self.gii):
                hi = len(teacher) - k  # teacher index of F_T^{i+1}, same resolution as x
                x = self.gii[k - 1](teacher[hi - 1], teacher[hi], x)
            x = self.decoder.stages[k](x)
            outs.append(x)
        return outs[::-1]

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher_feats, student_feats); the teacher runs without gradient."""
        teacher = self.teacher_features(images)
        return teacher, self.student(teacher)

    def forward(self, images: Tensor) -> AnomalyOutput:
        teacher, student = self.pairs(images)
        return self.head(teacher, student, (int(images.shape[-2]), int(images.shape[-1])))

    def foreground(self, images: Tensor, paths: list[str], methods: list[str], syn: SynthesisConfig) -> Tensor:
        """Static foreground per training image (one method per image, "none" = everything), computed once
        per path as URD precomputes it per image."""
        for method in set(methods) - {"none"}:
            missing = [i for i, (p, m) in enumerate(zip(paths, methods)) if m == method and p not in self._foreground]
            if missing:
                fg = compute_foreground(images[missing].cpu(), method, syn.otsu_polarity, syn.grabcut_iterations)
                assert fg is not None, "method 'none' never reaches the cache"
                for j, i in enumerate(missing):
                    self._foreground[paths[i]] = fg[j].bool()
        full = torch.ones(images.shape[1:2] + images.shape[2:], dtype=torch.bool)[:1]
        return torch.stack([self._foreground[p] if m != "none" else full for p, m in zip(paths, methods)]).float()


def layer_masks(masks: Tensor, sizes: list[tuple[int, int]], threshold: float = 0.5) -> list[Tensor]:
    """M_gt^i: (B, 1, H, W) mask -> per layer (B, 1, h_i, w_i) in {0, 1} (bilinear, align_corners, > threshold)."""
    return [(F.interpolate(masks.float(), size=s, mode="bilinear", align_corners=True) > threshold).float()
            for s in sizes]


def teacher_loss(t_n: list[Tensor], t_a: list[Tensor], e_n: list[Tensor], masks_a: list[Tensor],
                 e_a: list[Tensor] | None = None) -> Tensor:
    """L_TE = L_TE^n + L_TE^a (eqs. 1-3), summed over layers, mean over (B, h, w).

    L_TE^n = mean |D(T(I_n), E(I_n))|, L_TE^a = mean |D(T(I_a), E(I_n)) - M_i|, D = 1 - channel cosine.
    e_a given (official code): adds the global term sum_i mean_b [1 - cos(vec T(I_a), vec E(I_a))].
    """
    total = torch.zeros((), device=t_n[0].device)
    for tn, ta, en, m in zip(t_n, t_a, e_n, masks_a):
        total = total + cosine_distance(tn.float(), en.float()).abs().mean()
        total = total + (cosine_distance(ta.float(), en.float()) - m).abs().mean()
    if e_a is not None:
        total = total + global_cosine_loss(e_a, t_a)
    return total


def student_loss(s_n: list[Tensor], s_a: list[Tensor], t_n: list[Tensor], e_n: list[Tensor] | None) -> Tensor:
    """L_S (eqs. 4-6): L_ST + L_SE, each g(S(T(I_n)), F^n) + g(S(T(I_a)), F^n) with global cosine g."""
    loss = global_cosine_loss(t_n, s_n) + global_cosine_loss(t_n, s_a)
    if e_n is not None:
        loss = loss + global_cosine_loss(e_n, s_n) + global_cosine_loss(e_n, s_a)
    return loss


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """Student Adam (OCBE + decoder + GII); teacher Adam when the expert trains it."""
    student = [p for m in model.student_modules() for p in m.parameters()]
    opts: dict[str, torch.optim.Optimizer] = {"student": torch.optim.Adam(student, lr=cfg.lr, betas=cfg.betas)}
    if cfg.expert:
        opts["teacher"] = torch.optim.Adam(model.teacher.parameters(), lr=cfg.teacher_lr, betas=cfg.betas)
    return opts


def _synthesize(model: Model, batch: dict[str, Any], cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """I_a and its mask. Without batch["textures"] the batch's own images, shuffled, serve as textures."""
    images = batch["image"]
    textures = batch.get("textures")
    if textures is None:
        textures = TextureBank.from_tensor(images.detach().cpu()[torch.randperm(images.shape[0], generator=gen)])
    category = batch.get("category")
    syn = cfg.synthesis_config()
    per_image = [category] * images.shape[0] if category is None or isinstance(category, str) else list(category)
    methods = [syn.foreground_method(c) for c in per_image]  # multi-class batches mix categories
    fg = None
    if any(m != "none" for m in methods) and batch.get("path") is not None:
        fg = model.foreground(images, list(batch["path"]), methods, syn)
    return synthesize(images, syn, gen, textures, category, foreground=fg)


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """Teacher step on L_TE, then student step on L_S with the updated teacher in eval mode (official order)."""
    images = batch["image"]
    images_a, masks = _synthesize(model, batch, cfg, gen)
    logs: dict[str, float] = {}
    e_n: list[Tensor] | None = None
    if model.expert is not None:
        with torch.no_grad():
            e_n = list(model.expert.features(images))
            e_a = list(model.expert.features(images_a)) if cfg.teacher_loss == "official" else None
        model.teacher.train()
        t_n, t_a = model.teacher.features(images), model.teacher.features(images_a)  # two BN batches
        m_a = layer_masks(masks, [(int(t.shape[-2]), int(t.shape[-1])) for t in t_a], cfg.mask_threshold)
        loss_t = teacher_loss(t_n, t_a, e_n, m_a, e_a)
        opts["teacher"].zero_grad(set_to_none=True)
        backward(batch, loss_t)
        opts["teacher"].step()
        logs["loss_teacher"] = float(loss_t.detach())
    model.teacher.eval()
    t_n, t_a = model.teacher_features(images), model.teacher_features(images_a)
    loss_s = student_loss(model.student(t_n), model.student(t_a), t_n, e_n)
    opts["student"].zero_grad(set_to_none=True)
    backward(batch, loss_s)
    opts["student"].step()
    logs["loss_student"] = float(loss_s.detach())
    logs["loss"] = logs["loss_student"] + logs.get("loss_teacher", 0.0)
    return logs


SPEC = MethodSpec("urd", Config, Model, optimizers, train_step, PAPER, needs_textures=True,
                  calibrate=calibrate_position_norm, calibrates=uses_position_norm)
