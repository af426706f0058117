"""DSKD — Contextual Affinity Distillation for Image Anomaly Detection (Zhang, Suganuma & Okatani, WACV 2024).

Dual-student reverse distillation (../shared/REFERENCE.md §3.6; no public code, every open choice is named in
docs/methods/dskd.md). A frozen teacher feeds two students trained together, each with its own Adam:
- local student = RD: OCBE_loc + mirror decoder, per-pixel cosine loss (eqs. 1-2);
- global student = OCBE_glo (a trainable copy of the teacher's next residual stage on F_T^3) + GCCB (condense
  to a 1-D vector of g channels and restore to the feature size) + a decoder identical to the local one,
  trained with the contextual affinity loss (eqs. 3-7): T^2 KL(softmax_j cos(t_i, t_j)/T || softmax_j
  cos(s_i, t_j)/T), averaged over positions i and summed over layers; rows i are processed in checkpointed
  chunks so memory stays bounded on 64x64 maps.
- Scoring (eq. 8): per student, the per-layer maps (1 - cos for "pi", the per-position KL for "ca") are
  upsampled and summed, normalised by mean/std of normal maps (``calibrate``, stored in buffers), added,
  Gaussian-blurred; image score = max.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdad.blocks.decoders import check_readout, decoder_for
from kdad.blocks.losses import pixel_cosine_loss
from kdad.blocks.maps import AnomalyOutput, GaussianBlur, cosine_distance
from kdad.blocks.ocbe import build_bottleneck
from kdad.blocks.resblocks import init_like_rd4ad
from kdad.blocks.teachers import build_encoder
from kdad.errors import ConfigError
from kdad.methods.base import MethodSpec, backward

PAPER = "Zhang, Suganuma & Okatani, Contextual Affinity Distillation for Image Anomaly Detection, WACV 2024"
STUDENTS = {"both": ("local", "global"), "local": ("local",), "global": ("global",)}
LOSSES = ("pi", "ca")
STAGE_INITS = ("teacher", "random")


@dataclass(frozen=True)
class Config:
    """DSKD hyperparameters; defaults are the paper's (§4.1, Tables 4-6), open choices in docs/methods/dskd.md."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"  # teacher (and OCBE_glo initialisation) weights
    decoder_blocks: tuple[int, ...] = ()  # () = RD4AD's stages for ResNets, (2, 2, 2) otherwise
    readout: str = "relu"  # "linear" for a signed (Lite) teacher: kdad.blocks.decoders, docs/methods/rd.md
    students: str = "both"  # "both" | "local" | "global" (Table 4 single-student rows)
    loc_loss: str = "pi"  # "pi" per-pixel cosine | "ca" contextual affinity (Tables 4-5)
    glo_loss: str = "ca"
    gccb_channels: int = 1024  # g (Table 6: 512, 768, 1024, 1280, 2048); 0 = "w/o" GCCB
    gccb_grid: int = 8  # side of the map the condensing kernel sees (256 px / stride 32 = 8)
    glo_stage_init: str = "teacher"  # OCBE_glo starts from the teacher's pretrained next stage, or "random"
    temperature: float = 1.0
    affinity_chunk: int = 0  # rows i of the HW x HW affinity per step, over the whole batch; 0 = per device
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    sigma: float = 4.0
    align_corners: bool = True
    std_floor: float = 1e-6  # lower bound of the calibrated map std (constant maps on degenerate data)


# ------------------------------------------------------------------------------------- contextual affinity
# Rows per step (over the batch) when affinity_chunk = 0. CPU: 256 keeps each (rows, h*w) block at a few MiB,
# which malloc recycles; blocks of >= 32 MiB are mmapped fresh each step and their page faults made a batch-16
# step ~2.8x slower (docs/methods/dskd.md). CUDA's caching allocator recycles any size, and few large steps
# keep the kernels big.
AUTO_CHUNK = {"cpu": 256, "cuda": 16384}


def _rows_per_step(chunk: int, batch: int, rows: int, device: torch.device) -> int:
    """Rows of each image per step, at most `rows` (ONNX's Split must not exceed the axis)."""
    total = chunk if chunk > 0 else AUTO_CHUNK.get(device.type, 1024)
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return min(total, 1024, rows)  # an exported graph has a dynamic batch: its split sizes must not depend on it
    return min(max(1, total // batch), rows)


def _student_lse(s_rows: Tensor, t_all: Tensor, temperature: float) -> Tensor:
    """log sum_j exp(cos(s_i, t_j) / T): (B, R, C) unit student rows, (B, C, N) unit teacher -> (B, R)."""
    return torch.logsumexp(torch.bmm(s_rows, t_all) / temperature, dim=-1)


def contextual_affinity_map(teacher: Tensor, student: Tensor, temperature: float = 1.0, chunk: int = 0) -> Tensor:
    """Per-position T^2 KL(P_T,i || P_S,i) (eqs. 3-6): (B, C, h, w) x2 -> (B, 1, h, w), >= 0 up to rounding.

    P_T,i = softmax_j cos(t_i, t_j)/T and P_S,i = softmax_j cos(s_i, t_j)/T, j over all h*w positions of the
    same image (the student row is compared with the *teacher* map, eq. 5; the teacher is a fixed target).
    Since sum_j P_T,ij = 1, KL_i = sum_j p_ij a_ij/T - LSE_j(a_ij/T) - s_i . (sum_j p_ij t_j)/T + LSE_j(a^s_ij/T):
    only the student log-sum-exp needs gradients. ``chunk`` rows over the whole batch (chunk // B per image;
    0 = ``AUTO_CHUNK`` for the device) are processed at a time and that term is checkpointed, so the
    transient working set is ~4 x chunk x h*w floats whatever the batch and h*w are (docs/methods/dskd.md).
    """
    b, _, h, w = teacher.shape
    amp = (torch.autocast(teacher.device.type, enabled=False) if torch.is_autocast_enabled(teacher.device.type)
           else contextlib.nullcontext())
    with amp:
        t_all = F.normalize(teacher.detach().float().flatten(2), dim=1)  # (B, C, N)
        s_all = F.normalize(student.float().flatten(2), dim=1)
        t_rows, s_rows = t_all.transpose(1, 2), s_all.transpose(1, 2)  # (B, N, C)
        grad = torch.is_grad_enabled() and student.requires_grad
        outs, step = [], _rows_per_step(int(chunk), b, h * w, teacher.device)
        # split, not slicing: split's backward concatenates the chunk gradients once, while each slice's
        # backward would allocate a zero gradient of the whole (B, N, C) tensor
        for t_c, s_c in zip(t_rows.split(step, dim=1), s_rows.split(step, dim=1), strict=True):
            with torch.no_grad():  # teacher side: sum_j p log p and the context vector sum_j p_ij t_j
                logits = torch.bmm(t_c, t_all) / temperature
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                p = torch.exp(logits - lse)
                neg_entropy = (p * logits).sum(-1) - lse.squeeze(-1)
                context = torch.bmm(p, t_rows)  # (B, R, C)
            lse_s = (checkpoint(_student_lse, s_c, t_all, temperature, use_reentrant=False) if grad
                     else _student_lse(s_c, t_all, temperature))
            outs.append(neg_entropy - (s_c * context).sum(-1) / temperature + lse_s)
        return (temperature * temperature * torch.cat(outs, dim=1)).view(b, 1, h, w)


def contextual_affinity_loss(teacher: list[Tensor], student: list[Tensor], temperature: float = 1.0,
                             chunk: int = 0) -> Tensor:
    """Eq. 7: sum over layers of the mean over (B, positions) of the per-position affinity KL."""
    total = torch.zeros((), device=student[0].device)
    for t, s in zip(teacher, student):
        total = total + contextual_affinity_map(t, s, temperature, chunk).mean()
    return total


# ---------------------------------------------------------------------------------------- global student
def next_stage(backbone: str, layers: tuple[int, ...], weights: str | None) -> tuple[nn.Module, int]:
    """The backbone's stage after the last teacher layer (ResNet layer4 for layers 1-3) as a trainable module.

    Returns (stage, out_channels); the stage maps F_T^3 (B, c3, h, w) to (B, out, h/2, w/2).
    """
    last = max(layers)
    try:
        enc = build_encoder(backbone, (last, last + 1), weights=weights, frozen=False)
    except ConfigError as e:
        raise ConfigError(f"dskd: OCBE_glo needs the stage after layer {last} of {backbone!r}: {e}") from e
    body: Any = enc.body
    if hasattr(body, f"layer{last + 1}"):  # torchvision ResNet trunk
        return getattr(body, f"layer{last + 1}"), enc.channels[-1]
    blocks = [int(d["module"].split(".")[1]) for d in body.feature_info.get_dicts()]  # timm EfficientNet
    return nn.Sequential(*body.blocks[blocks[0] + 1: blocks[1] + 1]), enc.channels[-1]


class GCCB(nn.Module):
    """Global Context Condensing Block (§3.4, Fig. 3): (B, C, h, w) -> 1-D vector (B, g) -> (B, C, h, w).

    1x1 conv C->g (none when g == C, as Table 6's g = 2048), resize to grid x grid, a depthwise grid x grid
    conv condenses each channel to one value (learned weighted pooling), ReLU; a depthwise grid x grid
    transposed conv restores a map, resized back to h x w, then 1x1 conv g->C.
    """

    def __init__(self, channels: int, g: int, grid: int) -> None:
        super().__init__()
        self.grid = int(grid)
        same = g == channels
        self.reduce = nn.Identity() if same else nn.Sequential(nn.Conv2d(channels, g, 1, bias=False), nn.BatchNorm2d(g),
                                                               nn.ReLU(inplace=True))
        self.condense = nn.Conv2d(g, g, self.grid, groups=g)
        self.restore = nn.ConvTranspose2d(g, g, self.grid, groups=g)
        self.expand = nn.Identity() if same else nn.Sequential(nn.Conv2d(g, channels, 1, bias=False),
                                                               nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        init_like_rd4ad(self)

    def vector(self, x: Tensor) -> Tensor:
        """The condensed 1-D code (B, g) of a (B, C, h, w) map."""
        x = self.reduce(x)
        if tuple(x.shape[-2:]) != (self.grid, self.grid):
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return F.relu(self.condense(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        y = self.restore(self.vector(x)[:, :, None, None])
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.expand(y)


def _check(cfg: Config) -> None:
    choices = {"students": (cfg.students, tuple(STUDENTS)), "loc_loss": (cfg.loc_loss, LOSSES),
               "glo_loss": (cfg.glo_loss, LOSSES), "glo_stage_init": (cfg.glo_stage_init, STAGE_INITS)}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"dskd: model.{key}={value!r}; valid: {list(valid)}")
    check_readout("dskd", cfg.readout)
    if len(cfg.layers) != 3:
        raise ConfigError(f"dskd: model.layers={list(cfg.layers)} must name 3 teacher layers (OCBE fuses 3)")
    if cfg.gccb_channels < 0 or cfg.gccb_grid < 1 or cfg.temperature <= 0 or cfg.affinity_chunk < 0:
        raise ConfigError("dskd: need gccb_channels >= 0, gccb_grid >= 1, temperature > 0, affinity_chunk >= 0")


class Model(nn.Module):
    """Teacher + local student (OCBE_loc, decoder) + global student (OCBE_glo, GCCB, decoder).

    forward(images in [0, 1], (B, 3, H, W)) -> AnomalyOutput; map = blur(sum of normalised student maps).
    """

    map_mean: Tensor
    map_std: Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.students = STUDENTS[cfg.students]
        self.encoder = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        channels = list(self.encoder.channels)
        blocks = tuple(cfg.decoder_blocks) or None
        if "local" in self.students:
            self.loc_bottleneck = build_bottleneck(cfg.backbone, channels)
            self.loc_decoder = decoder_for(cfg.backbone, channels, self.loc_bottleneck.out_channels, blocks,
                                          readout=cfg.readout)
        if "global" in self.students:
            init = cfg.weights if cfg.glo_stage_init == "teacher" else "random"
            self.glo_stage, c4 = next_stage(cfg.backbone, tuple(cfg.layers), init)
            self.gccb = GCCB(c4, cfg.gccb_channels, cfg.gccb_grid) if cfg.gccb_channels else nn.Identity()
            self.glo_decoder = decoder_for(cfg.backbone, channels, c4, blocks, readout=cfg.readout)
        # eq. 8 statistics per student (local, global): identity until `calibrate` runs; saved in checkpoints
        self.register_buffer("map_mean", torch.zeros(len(STUDENTS["both"])))
        self.register_buffer("map_std", torch.ones(len(STUDENTS["both"])))
        self.blur = GaussianBlur(cfg.sigma)

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """Frozen teacher features of images in [0, 1]."""
        with torch.no_grad():
            return list(self.encoder(self.encoder.normalize(images)))

    def pairs(self, images: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """(teacher_feats, {student name: student_feats}) for the losses; the students' grads flow."""
        teacher = self.teacher_features(images)
        out: dict[str, list[Tensor]] = {}
        if "local" in self.students:
            out["local"] = self.loc_decoder(self.loc_bottleneck(teacher))
        if "global" in self.students:
            out["global"] = self.glo_decoder(self.gccb(self.glo_stage(teacher[-1])))
        return teacher, out

    def loss_kind(self, student: str) -> str:
        """"pi" or "ca": the loss (and map) of a student."""
        return self.cfg.loc_loss if student == "local" else self.cfg.glo_loss

    def layer_maps(self, student: str, teacher: list[Tensor], feats: list[Tensor]) -> list[Tensor]:
        """Per-layer maps (B, 1, h_l, w_l): eq. 1 (1 - cos) for "pi", eq. 6 (affinity KL) for "ca"."""
        if self.loss_kind(student) == "pi":
            return [cosine_distance(t.float(), s.float()) for t, s in zip(teacher, feats)]
        return [contextual_affinity_map(t, s, self.cfg.temperature, self.cfg.affinity_chunk)
                for t, s in zip(teacher, feats)]

    def raw_maps(self, teacher: list[Tensor], students: dict[str, list[Tensor]],
                 size: tuple[int, int]) -> dict[str, Tensor]:
        """Eq. 8's M_loc / M_glo before normalisation: per student, sum of bilinearly upsampled layer maps."""
        out = {}
        for name, feats in students.items():
            maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=self.cfg.align_corners)
                    for m in self.layer_maps(name, teacher, feats)]
            out[name] = torch.stack(maps, dim=0).sum(dim=0)
        return out

    def student_maps(self, images: Tensor) -> dict[str, Tensor]:
        """Normalised, unblurred map (B, 1, H, W) of each student: (M - mu) / sigma of eq. 8."""
        teacher, students = self.pairs(images)
        raw = self.raw_maps(teacher, students, (int(images.shape[-2]), int(images.shape[-1])))
        both = STUDENTS["both"]
        return {k: (m - self.map_mean[both.index(k)]) / self.map_std[both.index(k)] for k, m in raw.items()}

    def forward(self, images: Tensor) -> AnomalyOutput:
        maps = list(self.student_maps(images).values())
        amap = self.blur(maps[0] if len(maps) == 1 else maps[0] + maps[1])
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam per student (§4.1: each student uses RD's configuration)."""
    groups = {"local": ("loc_bottleneck", "loc_decoder"), "global": ("glo_stage", "gccb", "glo_decoder")}
    opts: dict[str, torch.optim.Optimizer] = {}
    for name in model.students:
        params = [p for part in groups[name] for p in getattr(model, part).parameters()]
        opts[name] = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))
    return opts


def student_loss(model: Model, student: str, teacher: list[Tensor], feats: list[Tensor]) -> Tensor:
    """Eq. 2 ("pi") or eq. 7 ("ca") for one student."""
    if model.loss_kind(student) == "pi":
        return pixel_cosine_loss(teacher, feats)
    return contextual_affinity_loss(teacher, feats, model.cfg.temperature, model.cfg.affinity_chunk)


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """One step of both students together (disjoint parameters, so one backward of the summed losses)."""
    teacher, students = model.pairs(batch["image"])
    losses = {name: student_loss(model, name, teacher, feats) for name, feats in students.items()}
    total = torch.stack(list(losses.values())).sum()
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    backward(batch, total)
    for opt in opts.values():
        opt.step()
    return {"loss": float(total.detach()), **{f"loss_{k}": float(v.detach()) for k, v in losses.items()}}


@torch.no_grad()
def calibrate(model: Model, normal_loader: Any, device: torch.device) -> None:
    """Eq. 8 statistics: mean and std over all pixels of each student's raw map on normal images."""
    model.eval()
    both = STUDENTS["both"]
    acc = {k: torch.zeros(3, dtype=torch.float64) for k in model.students}  # count, sum, sum of squares
    for batch in normal_loader:
        images = batch["image"].to(device)
        teacher, students = model.pairs(images)
        for k, m in model.raw_maps(teacher, students, (int(images.shape[-2]), int(images.shape[-1]))).items():
            m = m.double().cpu()
            acc[k] += torch.stack([torch.tensor(float(m.numel()), dtype=torch.float64), m.sum(), (m * m).sum()])
    for k, (n, s, ss) in acc.items():
        mean = s / n
        std = torch.sqrt(torch.clamp(ss / n - mean * mean, min=0.0))
        model.map_mean[both.index(k)] = mean.float()
        model.map_std[both.index(k)] = max(float(std), model.cfg.std_floor)


SPEC = MethodSpec("dskd", Config, Model, optimizers, train_step, PAPER, calibrate=calibrate)
