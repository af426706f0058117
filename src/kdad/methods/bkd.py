"""BKD — Unsupervised Anomaly Detection Based on Bidirectional Knowledge Distillation Network
(Zhong, Kang & Xiong, Open Journal of Applied Sciences 2025). No public code; open choices: docs/methods/bkd.md.

Forward stage: a frozen teacher encodes the query and k augmented normal supports; a cascaded pyramid of
modulated deformable convolutions aligns each support to the query (eqs. 1-5, kdad.blocks.deform_align).
Reverse stage: per-level memory addressing with hard shrinkage (eqs. 6-10, kdad.blocks.memory) -> RD's OCBE ->
mirror decoder. Loss (eqs. 11-12): per layer Loss(Q, D) + Loss(Q, S~), each = value + direction term.
Map (eq. 13): product over layers of the upsampled per-layer maps d(Q, D) + min_j d(Q, S~_j); score = max.
Inference compares each query with a fixed support set of training normals held in model buffers.
kdad's option ``map_norm: position`` (not in the paper) divides the map by the held-out normals' mean map, as RD's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.decoders import check_readout, decoder_for
from kdad.blocks.deform_align import IMPLS, PyramidAlign
from kdad.blocks.maps import (
    AnomalyMapHead,
    AnomalyOutput,
    Fuse,
    MapNorm,
    calibrate_position_norm,
    check_map_norm,
    cosine_distance,
)
from kdad.blocks.memory import MemoryModule
from kdad.blocks.ocbe import build_bottleneck
from kdad.blocks.teachers import build_encoder
from kdad.errors import ConfigError, KdadError
from kdad.methods.base import MethodSpec, backward

PAPER = "Zhong, Kang & Xiong, Unsupervised Anomaly Detection Algorithm Based on Bidirectional Knowledge " \
        "Distillation Network, Open Journal of Applied Sciences 15 (2025) 715-730"
SUPPORT_REDUCE = ("min", "mean")
PADDING = ("zeros", "border", "reflection")


@dataclass(frozen=True)
class Config:
    """BKD hyperparameters: paper values where it states them (§2.2-3.2), named open choices otherwise."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str = "imagenet"
    decoder_blocks: tuple[int, ...] = ()  # () = RD4AD's stages for ResNets, (2, 2, 2) otherwise
    readout: str = "relu"  # "linear" for a signed (Lite) teacher: kdad.blocks.decoders, docs/methods/rd.md
    shots: int = 2  # k (Table 2/4: 2, 4, 8)
    lr: float = 0.005
    align_lr: float = 0.0005  # alignment module; 0.005 lets the offsets diverge (docs/methods/bkd.md)
    betas: tuple[float, float] = (0.5, 0.999)
    # Table 4 ablation switches
    augment: bool = True
    memory: bool = True
    dcn: bool = True
    # support augmentation (Table 5: rotation + scale best); magnitudes are not in the paper
    aug_rotate: float = 20.0  # max |angle|, degrees
    aug_scale: tuple[float, float] = (0.9, 1.1)
    aug_translate: float = 0.0  # max |shift| as a fraction of the image side
    aug_shear: float = 0.0  # max |shear angle|, degrees
    aug_padding: str = "reflection"
    # deformable alignment
    offset_channels: int = 64
    deform_groups: int = 8  # reduced to gcd(deform_groups, teacher channels)
    modulated: bool = True  # DCNv2 modulation masks (eq. 2)
    dcn_impl: str = "torchvision"  # or "grid": the same operator via grid_sample (faster backward on CPU)
    act_slope: float = 0.1  # LeakyReLU of the offset branch
    # memory (eqs. 6-10)
    memory_items: int = 200
    memory_threshold: float = 0.002  # xi
    memory_eps: float = 1e-12  # delta
    memory_temperature: float = 1.0
    memory_renormalize: bool = True
    # loss (eq. 12)
    value_weight: float = 1.0
    direction_weight: float = 1.0
    align_weight: float = 1.0  # weight of Loss(Q, S~) against Loss(Q, D)
    loss_eps: float = 1e-8
    # map (eq. 13)
    support_reduce: str = "min"  # over shots: "min" or "mean" of d(Q, S~_j)
    fuse: Fuse = "mul"
    sigma: float = 4.0
    align_corners: bool = True
    support_seed: int = 0  # which training normals form the inference support set
    # "position": the map over the held-out normals' mean map (kdad's option, as RD's; not in the paper)
    map_norm: MapNorm = "none"

    def __post_init__(self) -> None:
        check_readout("bkd", self.readout)
        check_map_norm("bkd", self.map_norm)


class Pairs(NamedTuple):
    """What the loss and the map need: teacher query features Q^l (B, C, h, w), decoder outputs D^l (same),
    aligned supports S~^l (B, k, C, h, w)."""

    query: list[Tensor]
    decoded: list[Tensor]
    aligned: list[Tensor]


def random_affine(images: Tensor, cfg: Config, gen: torch.Generator) -> Tensor:
    """Random rotation, scale, shear and translation of (N, 3, H, W) images via affine_grid/grid_sample."""
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    angle = torch.deg2rad(uniform(-cfg.aug_rotate, cfg.aug_rotate))
    shear = torch.tan(torch.deg2rad(uniform(-cfg.aug_shear, cfg.aug_shear)))
    scale = uniform(*cfg.aug_scale)
    shift = torch.stack([uniform(-cfg.aug_translate, cfg.aug_translate) for _ in range(2)], dim=1) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shr[:, 0, 1] = shear
    theta = torch.cat([rot @ shr * scale.view(n, 1, 1), shift.unsqueeze(2)], dim=2)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=cfg.aug_padding, align_corners=False)


def support_indices(batch: int, shots: int, gen: torch.Generator) -> Tensor:
    """(B, k) indices of other images of the batch, drawn with replacement (the image itself when B = 1)."""
    if batch == 1:
        return torch.zeros(1, shots, dtype=torch.long)
    draw = torch.randint(0, batch - 1, (batch, shots), generator=gen)
    return draw + (draw >= torch.arange(batch).view(-1, 1)).long()


class SupportSet(nn.Module):
    """The inference support set as teacher features: buffers level{i} (k, C_i, h_i, w_i), saved in the
    checkpoint and constant-folded into ONNX. Empty until `set` is called; loading resizes the buffers."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            self.register_buffer(f"level{i}", torch.zeros(0, c, 0, 0))
        self.n_levels = len(channels)

    def features(self) -> list[Tensor]:
        """The stored features, shallow first."""
        return [getattr(self, f"level{i}") for i in range(self.n_levels)]

    def is_set(self) -> bool:
        """True once a support set is stored."""
        return bool(self.features()[0].shape[0] > 0)

    def set(self, feats: Sequence[Tensor]) -> None:
        """Store detached features (k, C_i, h_i, w_i), one per level."""
        for i, f in enumerate(feats):
            setattr(self, f"level{i}", f.detach().clone())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for i in range(self.n_levels):  # shapes depend on image size and k, known only from the checkpoint
            key = f"{prefix}level{i}"
            if key in state_dict:
                setattr(self, f"level{i}", torch.empty_like(state_dict[key], device=self.features()[0].device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BidirectionalHead(AnomalyMapHead):
    """Eq. 13 with per-layer map d(Q, D) + reduce_j d(Q, S~_j), d = 1 - cos over channels.

    `student[l]` is (B, 1 + k, C, h, w): the decoder output followed by the k aligned supports.
    """

    def __init__(self, support_reduce: str, fuse: str, sigma: float, align_corners: bool,
                 map_norm: MapNorm = "none") -> None:
        super().__init__("cosine", fuse, sigma, align_corners, map_norm=map_norm)  # type: ignore[arg-type]
        self.support_reduce = support_reduce

    def layer_maps(self, teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
        maps = []
        for q, st in zip(teacher, student):
            q, st = q.float(), st.float()
            b, n = st.shape[:2]
            reverse = cosine_distance(q, st[:, 0])
            q_rep = q.unsqueeze(1).expand(-1, n - 1, -1, -1, -1).flatten(0, 1)
            forward = cosine_distance(q_rep, st[:, 1:].flatten(0, 1)).view(b, n - 1, *q.shape[-2:])
            forward = forward.amin(1, keepdim=True) if self.support_reduce == "min" else forward.mean(1, keepdim=True)
            maps.append(reverse + forward)
        return maps


def _check(cfg: Config, channels: Sequence[int]) -> None:
    if len(channels) != 3:
        raise ConfigError(f"bkd: layers={tuple(cfg.layers)} must select exactly 3 teacher levels (OCBE input)")
    if cfg.shots < 1:
        raise ConfigError(f"bkd: shots={cfg.shots} must be >= 1 (the paper uses 2, 4 or 8)")
    if cfg.support_reduce not in SUPPORT_REDUCE:
        raise ConfigError(f"bkd: support_reduce={cfg.support_reduce!r}; valid: {SUPPORT_REDUCE}")
    if cfg.dcn_impl not in IMPLS:
        raise ConfigError(f"bkd: dcn_impl={cfg.dcn_impl!r}; valid: {IMPLS}")
    if cfg.aug_padding not in PADDING:
        raise ConfigError(f"bkd: aug_padding={cfg.aug_padding!r}; valid: {PADDING}")


class Model(nn.Module):
    """Teacher + support alignment + memory/OCBE/decoder. forward(images in [0,1], (B,3,H,W)) -> AnomalyOutput,
    comparing each query with the stored support set."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        channels = list(self.encoder.channels)
        _check(cfg, channels)
        groups = math.gcd(cfg.deform_groups, *channels)
        self.align = PyramidAlign(channels, self.encoder.strides, cfg.offset_channels, groups, cfg.modulated,
                                  cfg.act_slope, cfg.dcn_impl) if cfg.dcn else None
        self.memories = nn.ModuleList(
            MemoryModule(cfg.memory_items, c, cfg.memory_threshold, cfg.memory_eps, cfg.memory_temperature,
                         cfg.memory_renormalize) for c in channels
        ) if cfg.memory else None
        self.bottleneck = build_bottleneck(cfg.backbone, channels)
        self.decoder = decoder_for(cfg.backbone, channels, self.bottleneck.out_channels,
                                   tuple(cfg.decoder_blocks) or None, readout=cfg.readout)
        self.support = SupportSet(channels)
        self.head = BidirectionalHead(cfg.support_reduce, cfg.fuse, cfg.sigma, cfg.align_corners, cfg.map_norm)

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """Frozen teacher features of images in [0, 1]."""
        with torch.no_grad():
            return list(self.encoder(self.encoder.normalize(images)))

    def set_support(self, images: Tensor) -> None:
        """Store the teacher features of k normal images (k, 3, H, W) in [0, 1] as the inference support set."""
        self.support.set(self.teacher_features(images))

    def align_supports(self, query: Sequence[Tensor], support: Sequence[Tensor]) -> list[Tensor]:
        """Align supports (B, k, C, h, w) to queries (B, C, h, w) per shot; identity when dcn=False."""
        if self.align is None:
            return list(support)
        b, k = support[0].shape[:2]
        q_rep = [q.unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1) for q in query]
        aligned = self.align(q_rep, [s.flatten(0, 1) for s in support])
        return [a.view(b, k, *a.shape[1:]) for a in aligned]

    def stored_support(self, query: Sequence[Tensor]) -> list[Tensor]:
        """The stored support features expanded to the query batch: (B, k, C, h, w) per level."""
        if not self.support.is_set():
            raise KdadError("bkd: the model has no support set; train it (kdad fit) or call set_support(images)")
        feats = self.support.features()
        if tuple(feats[0].shape[-2:]) != tuple(query[0].shape[-2:]):
            raise KdadError(f"bkd: support features are {tuple(feats[0].shape[-2:])} at level 0 but the query gives "
                            f"{tuple(query[0].shape[-2:])}: use the image size the model was trained with")
        b = query[0].shape[0]
        return [f.unsqueeze(0).expand(b, *f.shape) for f in feats]

    def pairs(self, images: Tensor) -> Pairs:
        """Query features, decoder outputs and supports aligned to the query, with the stored support set."""
        query = self.teacher_features(images)
        return self.pairs_from_features(query, self.stored_support(query))

    def pairs_from_features(self, query: Sequence[Tensor], support: Sequence[Tensor]) -> Pairs:
        """Pairs from teacher features: query (B, C, h, w) and support (B, k, C, h, w) per level."""
        aligned = self.align_supports(query, support)
        latent = [m(q)[0] for m, q in zip(self.memories, query)] if self.memories is not None else query
        decoded = self.decoder(self.bottleneck(latent))
        return Pairs(list(query), decoded, aligned)

    def forward(self, images: Tensor) -> AnomalyOutput:
        p = self.pairs(images)
        student = [torch.cat([d.unsqueeze(1), a], dim=1) for d, a in zip(p.decoded, p.aligned)]
        return self.head(p.query, student, (int(images.shape[-2]), int(images.shape[-1])))


def feature_loss(query: Tensor, other: Tensor, cfg: Config) -> Tensor:
    """Value + direction loss of one layer, (N, C, h, w) x2 -> scalar.

    value = mean_n ||Q_n - X_n||^2 / ||Q_n||^2 (relative squared error, scale-free across teachers);
    direction = mean over (n, h, w) of 1 - cos(Q, X) along channels.
    """
    q, x = query.float().flatten(1), other.float()
    value = ((q - x.flatten(1)) ** 2).sum(1) / ((q**2).sum(1) + cfg.loss_eps)
    direction = 1.0 - F.cosine_similarity(query.float(), x, dim=1, eps=cfg.loss_eps)
    return cfg.value_weight * value.mean() + cfg.direction_weight * direction.mean()


def bkd_loss(p: Pairs, cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs. 11-12: sum over layers of Loss(Q, D) + align_weight * Loss(Q, S~) (mean over shots).
    Returns (total, reverse part, forward part)."""
    reverse = torch.zeros((), device=p.query[0].device)
    forward = torch.zeros((), device=p.query[0].device)
    for q, d, a in zip(p.query, p.decoded, p.aligned):
        k = a.shape[1]
        reverse = reverse + feature_loss(q, d, cfg)
        forward = forward + feature_loss(q.unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1), a.flatten(0, 1), cfg)
    return reverse + cfg.align_weight * forward, reverse, forward


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam over memory, OCBE and decoder (lr) and the alignment module (align_lr); the teacher is frozen."""
    align = [p for p in model.align.parameters()] if model.align is not None else []
    ids = {id(p) for p in align}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.lr}] + ([{"params": align, "lr": cfg.align_lr}] if align else [])
    return {"student": torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))}


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """One Adam step: each query gets k augmented supports drawn from the other images of its batch."""
    images = batch["image"]
    b, k = images.shape[0], cfg.shots
    if not model.support.is_set():  # provisional support (first batch) until calibrate() replaces it
        model.set_support(images[torch.arange(k) % b])
    supports = images[support_indices(b, k, gen).to(images.device).flatten()]
    if cfg.augment:
        supports = random_affine(supports, cfg, gen)
    feats = model.teacher_features(torch.cat([images, supports]))
    support = [f[b:].view(b, k, *f.shape[1:]) for f in feats]
    p = model.pairs_from_features([f[:b] for f in feats], support)
    loss, reverse, forward = bkd_loss(p, cfg)
    opt = opts["student"]
    opt.zero_grad(set_to_none=True)
    backward(batch, loss)
    opt.step()
    return {"loss": float(loss.detach()), "loss_reverse": float(reverse.detach()),
            "loss_forward": float(forward.detach())}


def calibrate(model: Model, normal_loader: Any, device: torch.device) -> None:
    """Store k training normals, drawn with `support_seed`, as the fixed inference support set; with
    ``map_norm: position`` then the normals' mean map against that support set (so the two stay consistent)."""
    ds = normal_loader.dataset
    n, k = len(ds), model.cfg.shots
    gen = torch.Generator().manual_seed(model.cfg.support_seed)
    idx = torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(0, n, (k,), generator=gen)
    images = torch.stack([ds[int(i)]["image"] for i in idx]).to(device)
    model.set_support(images)
    calibrate_position_norm(model, normal_loader, device)


SPEC = MethodSpec("bkd", Config, Model, optimizers, train_step, PAPER, calibrate=calibrate)
