"""PatchST — a patch student regressing a frozen teacher's pooled features (kdad's CPU method).

Not a method of our papers: kdad's answer to the quality gap of issue 18, built from the student–teacher
branch of EfficientAD (Batzner, Heckler & König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024), written from the paper:
- target: the frozen teacher's layers (default EfficientNet-Lite0, ``patchst_cpu``: Lite2; layers 2-3, strides 8
  and 16), each 3x3-mean-pooled (the kNN probe's features, benchmarks/probe_knn.py), resized to the finest layer's grid,
  concatenated and standardised per channel with the training normals' mean and std (``prepare``);
- student: a small patch network (blocks/patchnet.py) trained from scratch with Adam on the squared error;
- hard-feature loss (EfficientAD eq. 1): only the largest (1 - ``hard_quantile``) share of the batch's
  squared errors counts, so the student spends its capacity on what it still gets wrong
  (rare normal content: tile edges, bright streaks) instead of the easy bulk;
- map: per position mean over channels of the squared error; with ``map_norm: position`` it is divided by
  the held-out normals' mean error at that position (``calibrate``: normal images err more at the frame's
  edges), bilinearly resized, Gaussian-blurred; image score = max; with ``residual: mahalanobis`` the error is
  instead the residual's Mahalanobis distance under the held-out normals' residual covariance (``calibrate``);
- optional memory branch (``memory`` > 0, on in ``patchst_cpu``): the mean squared difference to the nearest of
  ``memory`` standardised training patches (PatchCore's nearest-neighbour score, Roth et al., CVPR 2022; a
  random sample or, ``memory_sampling: coreset`` as in ``patchst_cpu`` since session 19, PatchCore's greedy
  coreset), normalised per position like the student's error and added to it.
- optional denoising (``denoise`` > 0, after DeSTSeg's denoising student, Zhang et al., CVPR 2023): that share
  of each batch gets a synthetic anomaly (DRAEM Perlin mask + a texture, as CFRG's synthesis) while its target
  stays the teacher's features of the clean image, so the student learns not to reproduce what is not normal;
  those images add a plain mean squared error to the clean images' hard-feature loss.
Differences from EfficientAD: the memory branch instead of the autoencoder branch (logical anomalies), a Lite0/Lite2
teacher instead of a WRN50-2 distilled into a PDN, no quantile map normalisation (one map, so it would not change
the ranking), and no ImageNet penalty: its DTD stand-in did not help on the selection half
(docs/methods/patchst.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.coreset import greedy_coreset
from kdad.blocks.maps import AnomalyOutput, GaussianBlur, divide_by_mean, pool_features
from kdad.blocks.patchnet import PatchNet
from kdad.blocks.teachers import build_encoder
from kdad.errors import ConfigError
from kdad.hardware import cpu_has_fast_bf16
from kdad.methods.base import MethodSpec, optimizer_step
from kdad.synthesis import PERLIN_TEXTURE_EVERY_IMAGE, synthesize

PAPER = ("kdad's patch student (after the student-teacher branch of Batzner et al., EfficientAD, WACV 2024); "
         "not a method of the papers")


@dataclass(frozen=True)
class Config:
    """PatchST hyperparameters; defaults are the CPU recipe of docs/quality.md."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[int, ...] = (2, 3)
    weights: str = "imagenet"
    pool: int = 3  # k x k mean of the teacher's layers before they become the target
    width: int = 32  # PatchNet width
    extra: int = 0  # dilated layers that widen the student's receptive field
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hard_quantile: float = 0.99  # 0 = plain mean squared error
    map_norm: Literal["none", "position"] = "position"
    sigma: float = 4.0
    std_floor: float = 1e-6  # lower bound of the target std and of the per-position mean error
    # training patches kept for the nearest-neighbour branch (0 = off): the map adds, per position, the mean
    # squared difference to the nearest stored normal patch of the same standardised target (docs/methods/patchst.md)
    memory: int = 0
    # how those patches are drawn: "random" (uniform) or "coreset" (greedy k-centre, kdad.blocks.coreset: keeps
    # rare normal patches, e.g. rare poses of an object lying at any angle; about a minute per 300k positions)
    memory_sampling: Literal["random", "coreset"] = "random"
    # "coreset": at most this many positions, drawn at random, are its candidates; it holds them all in fp32,
    # so this bounds its time and RAM (800k x 168 channels: ~0.5 GB, ~3 one-core minutes) on large or tiled sets
    coreset_pool: int = 800_000
    # how the branch maps combine: "sum" (the student's map plus the memory's, each over its per-position mean)
    # or "memory" (the memory's alone: a nearest-neighbour detector; the student is not run, and with
    # train.epochs=0 not trained either). Session 19 (docs/methods/patchst.md, "What each branch brings").
    fusion: Literal["sum", "memory"] = "sum"
    # share of each batch given a synthetic anomaly whose target is the clean image's features (0 = off; fit
    # then needs data.texture_dir, a folder of texture images such as DTD)
    denoise: float = 0.0
    # how the student's residual (target - prediction, a C-vector per position) becomes its error: "mse", the mean
    # squared residual, or "mahalanobis", its Mahalanobis distance (over C) under the held-out normals' residual
    # mean and covariance (fitted in calibrate, ridge ``residual_ridge`` x their mean variance): it discounts the
    # directions in which the student errs on normal images too. Session 20 (docs/methods/patchst.md, "Residual").
    residual: Literal["mse", "mahalanobis"] = "mse"
    residual_ridge: float = 0.01


def hard_mse(target: Tensor, pred: Tensor, quantile: float) -> Tensor:
    """Mean of the largest (1 - quantile) share of the squared errors (all of them for quantile 0)."""
    d = (target.float() - pred.float()) ** 2
    if quantile <= 0:
        return d.mean()
    flat = d.flatten()
    k = max(1, round((1.0 - quantile) * flat.numel()))  # top-k: half the time of torch.quantile's full sort
    return flat.topk(k).values.mean()


class Model(nn.Module):
    """Frozen teacher, patch student, standardisation and map statistics as buffers (saved and exported)."""

    feat_mean: Tensor
    feat_std: Tensor
    map_mean: Tensor
    bank: Tensor
    res_mean: Tensor
    res_white: Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        if not 0.0 <= cfg.hard_quantile < 1.0:
            raise ConfigError(f"model.hard_quantile must be in [0, 1), got {cfg.hard_quantile}")
        if cfg.memory < 0:
            raise ConfigError(f"model.memory must be >= 0 (0 = no nearest-neighbour branch), got {cfg.memory}")
        if not 0.0 <= cfg.denoise < 1.0:
            raise ConfigError(f"model.denoise must be in [0, 1) (a share of each batch), got {cfg.denoise}")
        if cfg.memory_sampling not in ("random", "coreset"):
            raise ConfigError(f"model.memory_sampling must be 'random' or 'coreset', got {cfg.memory_sampling!r}")
        if cfg.coreset_pool < cfg.memory:
            raise ConfigError(f"model.coreset_pool={cfg.coreset_pool} must be at least model.memory={cfg.memory}")
        if cfg.fusion not in ("sum", "memory"):
            raise ConfigError(f"model.fusion must be 'sum' or 'memory', got {cfg.fusion!r}")
        if cfg.fusion == "memory" and cfg.memory == 0:
            raise ConfigError("model.fusion=memory needs a memory branch: set model.memory > 0")
        if cfg.residual not in ("mse", "mahalanobis"):
            raise ConfigError(f"model.residual must be 'mse' or 'mahalanobis', got {cfg.residual!r}")
        if cfg.residual_ridge <= 0:
            raise ConfigError(f"model.residual_ridge must be > 0, got {cfg.residual_ridge}")
        if cfg.map_norm not in ("none", "position"):
            raise ConfigError(f"model.map_norm must be one of 'none', 'position', got {cfg.map_norm!r}")
        self.cfg = cfg
        self.encoder = build_encoder(cfg.backbone, tuple(cfg.layers), weights=cfg.weights, frozen=True)
        if self.encoder.strides[0] != 8:
            raise ConfigError(f"model.layers must start at a stride-8 layer for the patch student; layer "
                              f"{cfg.layers[0]} of {cfg.backbone} has stride {self.encoder.strides[0]}")
        channels = int(sum(self.encoder.channels))
        self.student = PatchNet(channels, cfg.width, cfg.extra)
        self.register_buffer("feat_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, channels, 1, 1))
        # per-position mean error of held-out normals on the stride-8 grid; empty until calibrate()
        self.register_buffer("map_mean", torch.zeros(0))
        # standardised training patches of the nearest-neighbour branch; filled by prepare() when memory > 0
        self.register_buffer("bank", torch.zeros(0, channels))
        # residual: mahalanobis: the held-out normals' residual mean (C) and whitening W (C x C, their ridge precision
        # is W W^T); empty until calibrate()
        self.register_buffer("res_mean", torch.zeros(0))
        self.register_buffer("res_white", torch.zeros(0, 0))
        self.blur = GaussianBlur(cfg.sigma)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the map statistics take the grid of the image size they were calibrated at: size the buffers first
        for name in ("res_mean", "res_white"):  # saved before model.residual existed: the plain squared error
            state_dict.setdefault(prefix + name, getattr(self, name).new_zeros(getattr(self, name).shape))
        for name in ("map_mean", "bank", "res_mean", "res_white"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.map_mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def raw_target(self, images: Tensor) -> Tensor:
        """The teacher's pooled layers on the finest grid, concatenated (not standardised)."""
        with torch.no_grad():
            feats = pool_features(list(self.encoder(self.encoder.normalize(images))), self.cfg.pool)
            size = feats[0].shape[-2:]
            return torch.cat([f if f.shape[-2:] == size else
                              F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                              for f in feats], 1).float()

    def target(self, images: Tensor) -> Tensor:
        """The standardised target on the stride-8 grid."""
        return (self.raw_target(images) - self.feat_mean) / self.feat_std

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """([standardised target], [student output]) on the stride-8 grid."""
        return [self.target(images)], [self.student(self.encoder.normalize(images))]

    def error_grid(self, images: Tensor) -> Tensor:
        """(B, 1, h, w) mean squared error per position, before map statistics; (B, 2, h, w) with the
        nearest-neighbour branch's error as the second channel when a memory bank is held; with
        ``fusion: memory``, (B, 1, h, w) of that branch alone (the student is not run)."""
        if self.cfg.fusion == "memory":
            if self.bank.numel() == 0:
                raise ConfigError("patchst with model.fusion=memory has an empty memory: prepare() fills it")
            return nearest_sq(self.target(images), self.bank)
        (t,), (s,) = self.pairs(images)
        d = self.student_error(t - s.float())
        if self.bank.numel() == 0:
            return d
        return torch.cat([d, nearest_sq(t, self.bank)], 1)

    def student_error(self, r: Tensor) -> Tensor:
        """(B, C, h, w) residual -> (B, 1, h, w): mean squared residual, or with ``residual: mahalanobis`` (once
        calibrated) the squared Mahalanobis distance over C, divided by C so both read on the same scale."""
        if self.res_white.numel() == 0:
            return (r * r).mean(1, keepdim=True)
        y = (r - self.res_mean.view(1, -1, 1, 1)).permute(0, 2, 3, 1) @ self.res_white
        return (y * y).mean(-1).unsqueeze(1)  # a sum of squares: exact in fp32 where z^T P z would cancel

    def forward(self, images: Tensor) -> AnomalyOutput:
        d = self.error_grid(images)
        if self.map_mean.numel() > 0:  # resized when calibrated at another input size
            d = divide_by_mean(d, self.map_mean)
        d = d.sum(1, keepdim=True)  # the branches, each relative to its held-out normals' mean, add up
        amap = self.blur(F.interpolate(d, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return AnomalyOutput(amap, amap.flatten(1).amax(dim=1))


def nearest_sq(t: Tensor, bank: Tensor, rows: int = 1024) -> Tensor:
    """(B, C, h, w) features, (M, C) bank -> (B, 1, h, w) mean over channels of the squared difference to the
    nearest bank row. Rows are taken in chunks so the distance matrix stays small, except while exporting,
    where a loop fixed at trace time would pin the batch size."""
    b, c, h, w = t.shape
    q = t.permute(0, 2, 3, 1).reshape(-1, c)
    bb = (bank * bank).sum(1)

    def one(qc: Tensor) -> Tensor:  # |q - m|^2 = |q|^2 - 2 q.m + |m|^2, the matmul form cdist would use
        return ((qc * qc).sum(1, keepdim=True) - 2.0 * qc @ bank.t() + bb).amin(1)

    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        d = one(q)
    else:
        d = torch.cat([one(q[i:i + rows]) for i in range(0, q.shape[0], rows)])
    return (d.clamp_min(0.0) / c).view(b, h, w).unsqueeze(1)


def optimizers(model: Model, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """Adam over the student (EfficientAD: lr 1e-4 at batch 1; 1e-3 at batch 16 here)."""
    return {"student": torch.optim.Adam(model.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}


def train_step(
    model: Model, batch: dict[str, Any], opts: dict[str, torch.optim.Optimizer], cfg: Config, gen: torch.Generator
) -> dict[str, Tensor]:
    """One Adam step on the hard-feature loss (plus the denoising images' squared error when ``denoise`` > 0)."""
    images = batch["image"]
    k = round(cfg.denoise * images.shape[0])
    if k == 0:
        (t,), (s,) = model.pairs(images)
        loss = hard_mse(t, s, cfg.hard_quantile)
    else:
        # fit gives batch["textures"] from data.texture_dir (needs_textures); synthesize names a missing one
        noisy, _ = synthesize(images[:k], PERLIN_TEXTURE_EVERY_IMAGE, gen, batch.get("textures"))
        t = model.target(images)  # the clean images' features are the target of all of them
        s = model.student(model.encoder.normalize(torch.cat([noisy.to(images.dtype), images[k:]])))
        loss = ((t[:k] - s[:k].float()) ** 2).mean()
        if k < images.shape[0]:
            loss = loss + hard_mse(t[k:], s[k:], cfg.hard_quantile)
    return optimizer_step(opts["student"], loss, batch.get("grad_scaler"), batch.get("backward"))


@torch.no_grad()
def prepare(model: Model, normal_loader: Any, device: torch.device) -> None:
    """Per-channel mean and std of the target over the training normals (before the first step)."""
    n, s, ss = 0, None, None
    for batch in normal_loader:
        t = model.raw_target(batch["image"].to(device)).double()
        n += t.shape[0] * t.shape[2] * t.shape[3]
        s = t.sum((0, 2, 3)) if s is None else s + t.sum((0, 2, 3))
        ss = (t * t).sum((0, 2, 3)) if ss is None else ss + (t * t).sum((0, 2, 3))
    if n == 0 or s is None or ss is None:
        raise ConfigError("patchst needs at least one training image to standardise its target")
    mean = s / n
    std = torch.sqrt(torch.clamp(ss / n - mean * mean, min=0.0))
    model.feat_mean.copy_(mean.float().view_as(model.feat_mean))
    model.feat_std.copy_(torch.clamp(std.float(), min=model.cfg.std_floor).view_as(model.feat_std))
    if model.cfg.memory > 0:
        model.bank = sample_bank(model, normal_loader, device, n, model.cfg.memory)


@torch.no_grad()
def sample_bank(model: Model, normal_loader: Any, device: torch.device, n: int, size: int) -> Tensor:
    """``size`` standardised target positions of the ``n`` positions of the training normals (all of them when
    there are fewer): uniformly without replacement, or a greedy k-centre coreset of all of them, or of
    ``coreset_pool`` of them drawn uniformly where there are more (``memory_sampling``); seeded from torch's
    global seed (train.seed)."""
    seed = torch.initial_seed() % (2**63)
    coreset = model.cfg.memory_sampling == "coreset" and size < n
    take = min(n, model.cfg.coreset_pool) if coreset else size
    keep = None if take >= n else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take].sort().values
    rows, start = [], 0
    for batch in normal_loader:
        t = (model.raw_target(batch["image"].to(device)) - model.feat_mean) / model.feat_std
        flat = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).float()
        if keep is None:
            rows.append(flat)
        else:
            lo, hi = torch.searchsorted(keep, torch.tensor([start, start + flat.shape[0]]))
            rows.append(flat[(keep[lo:hi] - start).to(flat.device)])
        start += flat.shape[0]
    bank = torch.cat(rows)
    if coreset:
        fast = device.type == "cuda" or bool(cpu_has_fast_bf16())
        bank = bank[greedy_coreset(bank, size, seed=seed % (2**32), bf16=fast).to(bank.device)]
    return bank.contiguous()


@torch.no_grad()
def calibrate(model: Model, normal_loader: Any, device: torch.device) -> None:
    """Per-position mean error on held-out normals (map_norm: position); the map becomes the ratio to it. With
    ``residual: mahalanobis`` the same normals first give the residual's mean and precision."""
    model.eval()
    if model.cfg.residual == "mahalanobis" and model.cfg.fusion != "memory":
        fit_residual(model, normal_loader, device)
    if model.cfg.map_norm != "position":
        return
    g = torch.cat([model.error_grid(batch["image"].to(device)).double().cpu() for batch in normal_loader])
    model.map_mean = torch.clamp(g.mean(0, keepdim=True).float(), min=model.cfg.std_floor).to(device)


@torch.no_grad()
def fit_residual(model: Model, normal_loader: Any, device: torch.device) -> None:
    """Mean and ridge-regularised precision of the student's residual over every position of the normals."""
    n, s, ss = 0, None, None
    for batch in normal_loader:
        (t,), (p,) = model.pairs(batch["image"].to(device))
        r = (t - p.float()).permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
        n += r.shape[0]
        s = r.sum(0) if s is None else s + r.sum(0)
        ss = r.T @ r if ss is None else ss + r.T @ r
    if n < 2 or s is None or ss is None:
        raise ConfigError("patchst with model.residual=mahalanobis needs held-out normal images to fit on")
    mean = s / n
    cov = (ss - n * torch.outer(mean, mean)) / (n - 1)
    ridge = model.cfg.residual_ridge * float(cov.diagonal().mean().clamp_min(model.cfg.std_floor))
    prec = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
    model.res_mean = mean.float().to(device)
    model.res_white = torch.linalg.cholesky((prec + prec.T) / 2).float().to(device)  # P = W W^T


def needs_textures(cfg: Config) -> bool:
    """A texture folder is used only by denoising."""
    return cfg.denoise > 0


SPEC = MethodSpec("patchst", Config, Model, optimizers, train_step, PAPER, prepare=prepare, calibrate=calibrate,
                  grad_scaler=True, needs_textures=needs_textures)
