"""CFRG — heterogeneous teacher-student with recovery guidance (Yang, Xing et al., 3CAD, AAAI 2025).

Recipe from the official code EnquanYang2022/3CAD @b5e66a1 (../shared/REFERENCE.md §3.4; the paper body was
not available, so every detail follows the code):

- Teacher T: frozen ImageNet encoder (WRN50-2 layers 1-3), run on the normal image x_n and the synthetic x_a.
- Student S: EfficientNet-b0 from scratch (timm ``efficientnet_b0`` features, strides 4/8/16) on x_a, with one
  adapter per level to the teacher's widths (``kdad.blocks.adapters``).
- Recovery R: RD's OCBE + mirror decoder on T(x_a), trained to give back T(x_n) (global cosine, L_rec).
- Segmentation: UNet on (1 - cos(T, R)) (1 - cos(T, S)) T per level (masks not detached), BCE with the
  Perlin mask M (L_seg).
- L_dis: per layer d = 1 - cos(T(x_a), S(x_a)) upsampled to the mask, mean[M (1 - d) + (1 - M) d], mean over layers.
- Loss L_seg + L_dis + L_rec; one Adam lr 5e-4, betas (0.5, 0.999), no weight decay; MultiStepLR x0.2 after
  epochs 40 and 45 of 50; batch 32.
- Map: sum over layers of 1 - cos(T, R) (bilinear, align_corners=True) + sigmoid(seg), Gaussian sigma 4;
  score = max. The student enters the map only through the segmentation head.

The LR schedule lives in the model (buffers ``steps_done`` / ``epochs_done``), so the engine stays unchanged and
every run starts from a fresh schedule. ``lr_unit="epoch"`` counts passes over the training set from
``batch["path"]``: the first batch that repeats an image of the current pass starts the next one (exact for
the engine's shuffled loader; use ``lr_unit="step"`` with sampling with replacement, e.g. balanced multi-class).
Without ``batch["textures"]`` the batch's own images, shuffled, serve as textures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.adapters import AdapterSet
from kdad.blocks.decoders import check_readout, decoder_for
from kdad.blocks.losses import global_cosine_loss
from kdad.blocks.maps import AnomalyMapHead, AnomalyOutput, GaussianBlur, cosine_distance
from kdad.blocks.ocbe import build_bottleneck
from kdad.blocks.teachers import build_encoder
from kdad.blocks.unet import UNetHead
from kdad.dicts import deep_merge, from_dict, to_dict
from kdad.errors import ConfigError
from kdad.methods.base import MethodSpec, optimizer_step
from kdad.synthesis import PERLIN_TEXTURE_EVERY_IMAGE, SynthesisConfig, TextureBank, synthesize

PAPER = ("Yang, Xing et al., 3CAD: A Large-Scale Real-World 3C Product Dataset for Unsupervised Anomaly "
         "Detection, AAAI 2025")
LR_UNITS = ("epoch", "step")

SYNTHESIS = PERLIN_TEXTURE_EVERY_IMAGE
"""CFRG's synthesis (official data_utils.py): DRAEM Perlin + DTD, opacity (0.2, 1], every image, no foreground."""


@dataclass(frozen=True)
class Config:
    """CFRG hyperparameters; defaults are the official code's (REFERENCE §3.4)."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"  # teacher weights
    student: str = "efficientnet_b0"  # timm name, random init (the official student is trained from scratch)
    student_indices: tuple[int, ...] = (1, 2, 3)  # timm feature indices; must give the teacher's strides
    student_drop_path: float = 0.2  # lukemelas drop-connect 0.2, scaled by block index
    student_bn_momentum: float = 0.01  # lukemelas BN: 1 - 0.99 in PyTorch's convention
    student_bn_eps: float = 1e-3
    decoder_blocks: tuple[int, ...] = ()  # () = RD4AD's stages for ResNets, (2, 2, 2) otherwise
    readout: str = "relu"  # "linear" for a signed (Lite) teacher: kdad.blocks.decoders, docs/methods/rd.md
    lr: float = 5e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0  # the script parses --wd 1e-4 but never passes it to Adam
    lr_milestones: tuple[int, ...] = (40, 45)  # 0.8 and 0.9 of 50 epochs
    lr_gamma: float = 0.2
    lr_unit: str = "epoch"  # "epoch" (passes over the data, from batch paths) | "step" (optimizer steps)
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (seg, dis, rec)
    synthesis: dict[str, Any] = field(default_factory=dict)  # overrides of SYNTHESIS (SynthesisConfig fields)
    sigma: float = 4.0
    align_corners: bool = True

    def __post_init__(self) -> None:
        check_readout("cfrg", self.readout)
        if self.lr_unit not in LR_UNITS:
            raise ConfigError(f"cfrg model.lr_unit={self.lr_unit!r} is not valid; choose one of {LR_UNITS}")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ConfigError(f"cfrg model.lr_milestones={list(self.lr_milestones)} must be increasing")
        self.synthesis_config()  # fail at config time on bad synthesis overrides

    def synthesis_config(self) -> SynthesisConfig:
        """``SYNTHESIS`` with the ``synthesis`` overrides applied (strict: unknown keys raise ConfigError)."""
        return from_dict(SynthesisConfig, deep_merge(to_dict(SYNTHESIS), dict(self.synthesis)), "model.synthesis")


class Branches(NamedTuple):
    """Everything one pass computes: per-level lists (teacher order) and the segmentation logits (B, 1, H', W')."""

    teacher: list[Tensor]
    student: list[Tensor]
    recovered: list[Tensor]
    seg_logits: Tensor


def build_student(cfg: Config) -> tuple[nn.Module, list[int], list[int]]:
    """(timm features-only student with random init, its channels, its strides); unused later blocks dropped."""
    body = timm.create_model(cfg.student, pretrained=False, features_only=True, out_indices=tuple(cfg.student_indices),
                             drop_path_rate=cfg.student_drop_path, bn_momentum=cfg.student_bn_momentum,
                             bn_eps=cfg.student_bn_eps)
    info: Any = body.feature_info
    modules = [d["module"] for d in info.get_dicts()]
    last = max((int(m.split(".")[1]) for m in modules if m.startswith("blocks.")), default=-1)
    blocks: Any = getattr(body, "blocks", None)
    if blocks is not None and last >= 0:
        body.blocks = blocks[: last + 1]
    return body, list(info.channels()), list(info.reduction())


def segmentation_inputs(teacher: Sequence[Tensor], student: Sequence[Tensor],
                        recovered: Sequence[Tensor]) -> list[Tensor]:
    """Per level (1 - cos(T, R)) * (1 - cos(T, S)) * T, (B, C_l, h_l, w_l); the weights keep their gradients."""
    return [cosine_distance(t, r) * cosine_distance(t, s) * t for t, s, r in zip(teacher, student, recovered)]


class Model(nn.Module):
    """Frozen teacher + adapted EfficientNet student + recovery (OCBE + decoder) + UNet head.

    forward(images in [0, 1], (B, 3, H, W)) -> AnomalyOutput(map (B, 1, H, W), score (B,)).
    """

    steps_done: Tensor
    epochs_done: Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        channels, strides = list(self.teacher.channels), list(self.teacher.strides)
        if len(channels) != 3:
            raise ConfigError(f"cfrg needs 3 teacher layers, got model.layers={list(cfg.layers)}")
        self.student, s_channels, s_strides = build_student(cfg)
        if s_strides != strides:
            raise ConfigError(f"cfrg student {cfg.student!r} indices {list(cfg.student_indices)} give strides "
                              f"{s_strides}, the teacher {cfg.backbone!r} layers {list(cfg.layers)} give {strides}")
        self.adapters = AdapterSet(s_channels, channels)
        self.bottleneck = build_bottleneck(cfg.backbone, channels)
        self.decoder = decoder_for(cfg.backbone, channels, self.bottleneck.out_channels,
                                   tuple(cfg.decoder_blocks) or None, readout=cfg.readout)
        self.segmenter = UNetHead(channels, strides[0])
        self.recovery_head = AnomalyMapHead("cosine", "sum", 0.0, cfg.align_corners)  # unblurred layer sum
        self.blur = GaussianBlur(cfg.sigma)
        # LR schedule state: saved with the weights (resume-safe), fresh for every new model.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self._pass_paths: set[str] = set()

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """Frozen teacher features of images in [0, 1]."""
        with torch.no_grad():
            return list(self.teacher.features(images))

    def branches(self, images: Tensor) -> Branches:
        """Teacher, adapted student, recovered features and segmentation logits of images in [0, 1]."""
        teacher = self.teacher_features(images)
        student = self.adapters(self.student(self.teacher.normalize(images)))
        recovered = self.decoder(self.bottleneck(teacher))
        seg = self.segmenter(segmentation_inputs(teacher, student, recovered))
        return Branches(teacher, student, recovered, seg)

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher_feats, recovered_feats): the pair whose discrepancy forms the map."""
        out = self.branches(images)
        return out.teacher, out.recovered

    def forward(self, images: Tensor) -> AnomalyOutput:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        out = self.branches(images)
        recovery = self.recovery_head(out.teacher, out.recovered, size).anomaly_map
        seg = torch.sigmoid(_resize(out.seg_logits.float(), size, self.cfg.align_corners))
        amap = self.blur(recovery + seg)
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))

    def count_pass(self, paths: Sequence[str] | None) -> None:
        """Advance ``epochs_done`` when a batch repeats an image of the current pass (or after a resume)."""
        if not paths:
            return
        resumed = not self._pass_paths and int(self.steps_done) > 0
        if resumed or any(p in self._pass_paths for p in paths):
            self.epochs_done += 1
            self._pass_paths = set()
        self._pass_paths.update(paths)


def _resize(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def discrepancy_loss(teacher: Sequence[Tensor], student: Sequence[Tensor], masks: Tensor) -> Tensor:
    """L_dis (official ``loss_fucntion``): per layer d = 1 - cos(T, S) resized (bilinear) to the mask's (H, W);
    mean over (B, H, W) of M (1 - d) + (1 - M) d, averaged over layers. Anomalous pixels push cos to -1 (no margin)."""
    total = torch.zeros((), device=masks.device)
    m = masks.float()
    for t, s in zip(teacher, student):
        d = _resize(cosine_distance(t.float(), s.float()), (int(m.shape[-2]), int(m.shape[-1])), False)
        total = total + (m * (1.0 - d) + (1.0 - m) * d).mean()
    return total / len(teacher)


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """L_seg: BCE-with-logits, mean over pixels; logits resized to the mask if their size differs."""
    logits = _resize(logits.float(), (int(masks.shape[-2]), int(masks.shape[-1])), False)
    return F.binary_cross_entropy_with_logits(logits, masks.float())


def recovery_loss(teacher_normal: Sequence[Tensor], recovered: Sequence[Tensor]) -> Tensor:
    """L_rec (official ``loss_distill1``): sum over layers of mean_b [1 - cos(vec T(x_n), vec R(T(x_a)))]."""
    return global_cosine_loss(teacher_normal, recovered)


def scheduled_lr(model: Model, cfg: Config) -> float:
    """MultiStepLR: lr * gamma ** (number of milestones reached by the epoch or step counter)."""
    count = int(model.epochs_done if cfg.lr_unit == "epoch" else model.steps_done)
    return cfg.lr * cfg.lr_gamma ** sum(count >= m for m in cfg.lr_milestones)


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam over every trainable part (student, adapters, OCBE, decoder, UNet); the teacher is frozen."""
    params = [p for p in model.parameters() if p.requires_grad]
    return {"cfrg": torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                     weight_decay=cfg.weight_decay)}


def _synthesize(batch: dict[str, Any], cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """x_a and its mask M (B, 1, H, W). Without batch["textures"] the batch's own images, shuffled, are textures."""
    images = batch["image"]
    textures = batch.get("textures")
    if textures is None:
        textures = TextureBank.from_tensor(images.detach().cpu()[torch.randperm(images.shape[0], generator=gen)])
    return synthesize(images, cfg.synthesis_config(), gen, textures, batch.get("category"))


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """One Adam step on w_seg L_seg + w_dis L_dis + w_rec L_rec at the scheduled learning rate."""
    model.count_pass(batch.get("path"))
    lr = scheduled_lr(model, cfg)
    opt = opts["cfrg"]
    lr *= opt.param_groups[0].get("lr_factor", 1.0)  # the engine's train.lr_decay_from factor, if any
    for group in opt.param_groups:
        group["lr"] = lr
    images = batch["image"]
    images_a, masks = _synthesize(batch, cfg, gen)
    teacher_normal = model.teacher_features(images)
    out = model.branches(images_a)
    l_seg = segmentation_loss(out.seg_logits, masks)
    l_dis = discrepancy_loss(out.teacher, out.student, masks)
    l_rec = recovery_loss(teacher_normal, out.recovered)
    w_seg, w_dis, w_rec = cfg.loss_weights
    loss = w_seg * l_seg + w_dis * l_dis + w_rec * l_rec
    # fp16 (cfrg_paper, as the official torch.cuda.amp)
    optimizer_step(opt, loss, batch.get("grad_scaler"), batch.get("backward"))
    model.steps_done += 1
    return {"loss": float(loss.detach()), "loss_seg": float(l_seg.detach()), "loss_dis": float(l_dis.detach()),
            "loss_rec": float(l_rec.detach()), "lr": lr}


SPEC = MethodSpec("cfrg", Config, Model, optimizers, train_step, PAPER, needs_textures=True, grad_scaler=True)
