"""The invalid-input gate: is this a plausible picture of the trained product at all? (issue 21.3)

An anomaly detector scores how far an image is from the training normals *in the ways it learned to look*; a
black frame, a photo of another product or another camera's view can still score low and be called normal.
The gate scores each image by how far its teacher features, averaged over space (one vector per layer the
method uses), lie from the training normals': per layer, the squared Mahalanobis distance under a Ledoit-Wolf
shrunk covariance (the images are far fewer than the feature dimensions), divided by that layer's width; the
score is the root of their mean. Dividing by the width matters with few normals: a held-out normal's squared
distance grows with the dimension, so over one concatenated vector a wide deep layer (Lite0's stride-32 layer
has 320 channels) swamps the shallow ones, which separate another product best. With 18 fit images and
layers 2-4, the concatenated form left real bottle photos 7.6x the held-out normals' highest score, under
the margin of 8; the per-layer form leaves them 14.9x (benchmarks/gate_layers.py). It is still one quadratic form
(a block-diagonal precision), so the exported graph is unchanged. Its threshold is split-conformal on the
held-out normals at ``train.gate_alpha``, widened by ``train.gate_margin`` (a factor: the gate should reject
the wrong product, not the rare good part, and a defect is still the right product). Two pixel checks name
the obvious cases: a flat frame (black, white, one colour) and an overexposed one. A third, the colour range,
catches a swapped camera: a grayscale frame of a coloured product, or a colour frame of a grayscale one, which
the pooled features alone let through (a grayscale bottle scored just under the threshold).

The decision rule itself lives in :class:`kdad.deploy.postprocess.PostProcess` (``invalid_reason``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdad.errors import ConfigError
from kdad.methods.base import teacher_of
from kdad.thresholds import conformal_threshold

FLAT_STD = 0.01  # a frame whose pixel standard deviation (in [0, 1]) is below this is flat: black, white, blank
SATURATED = 0.98  # a pixel at or above this in every channel is saturated
COLOURED = 0.01  # training normals whose least chroma is at least this are a coloured product


def pooled_features(teacher: nn.Module, images01: Tensor) -> Tensor:
    """Teacher features of images in [0, 1] (B, 3, H, W), each layer averaged over space, concatenated: (B, D)."""
    return pool_layers(teacher.features(images01))  # type: ignore[operator]


def pool_layers(feats: list[Tensor]) -> Tensor:
    """Feature maps [(B, C_i, h_i, w_i)] -> each averaged over space, concatenated: (B, sum C_i), float32."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in feats], dim=1)


def block_precision(features: np.ndarray, widths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and block-diagonal precision (D, D) of `features` (N, D), one Ledoit-Wolf block per layer of
    `widths`, each divided by its width and the layer count: ``d @ P @ d`` is the mean over layers of the
    squared per-layer Mahalanobis distance per dimension."""
    from sklearn.covariance import LedoitWolf

    if sum(widths) != features.shape[1]:
        raise ValueError(f"layer widths {widths} do not add up to the feature dimension {features.shape[1]}")
    mean, precision = np.zeros(features.shape[1]), np.zeros((features.shape[1],) * 2)
    start = 0
    for width in widths:
        block = slice(start, start + width)
        lw = LedoitWolf().fit(features[:, block])
        mean[block] = lw.location_
        precision[block, block] = lw.precision_ / (width * len(widths))
        start += width
    return mean, precision


class GateScore(nn.Module):
    """images01 (B, 3, H, W) -> the gate's out-of-distribution score (B,): Mahalanobis distance of the pooled
    teacher features. A module of its own so the ONNX path exports it as a graph beside the model's."""

    mean: Tensor
    precision: Tensor

    def __init__(self, teacher: nn.Module, mean: Tensor, precision: Tensor) -> None:
        super().__init__()
        self.teacher = teacher
        self.register_buffer("mean", mean.float())
        self.register_buffer("precision", precision.float())

    def forward(self, images01: Tensor) -> Tensor:
        d = pooled_features(self.teacher, images01) - self.mean
        return torch.sqrt(torch.clamp(((d @ self.precision) * d).sum(dim=1), min=0.0))


def pixel_stats(images01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (B, 3, H, W) or (H, W, 3) in [0, 1]: pixel standard deviation and share of saturated pixels."""
    x = np.asarray(images01, dtype=np.float32)
    if x.ndim == 3:  # one (H, W, 3) image
        x = x.transpose(2, 0, 1)[None]
    std = x.reshape(len(x), -1).std(axis=1)
    sat = (x >= SATURATED).all(axis=1).reshape(len(x), -1).mean(axis=1)
    return std, sat


def chroma(images01: np.ndarray) -> np.ndarray:
    """Per image (B, 3, H, W) or one (H, W, 3) in [0, 1]: the mean over pixels of max - min over the channels
    (0 for a grayscale frame)."""
    x = np.asarray(images01, dtype=np.float32)
    if x.ndim == 3:
        x = x.transpose(2, 0, 1)[None]
    return (x.max(axis=1) - x.min(axis=1)).reshape(len(x), -1).mean(axis=1)


def chroma_range(values: np.ndarray) -> tuple[float, float]:
    """The accepted chroma range from the training normals' chroma: below a quarter of the least (only for a
    coloured product; a grayscale one accepts 0) or above max(4 x, + 0.02) the most is another camera."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return (lo / 4 if lo >= COLOURED else 0.0), max(4 * hi, hi + 0.02)


@dataclass(frozen=True)
class Gate:
    """A fitted gate: the training normals' pooled-feature mean and shrunk precision matrix, and the thresholds.

    threshold: an image is invalid iff its score > threshold (conformal threshold of ``n_calibration`` held-out
    normal scores at ``alpha``, times ``margin``). max_saturated: an image with a larger share of saturated
    pixels is overexposed (the training normals' largest share plus 0.25, at least 0.5).
    """

    mean: Tensor
    precision: Tensor
    threshold: float
    alpha: float
    margin: float
    n_fit: int
    n_calibration: int
    max_saturated: float
    source: str
    scores: tuple[float, ...] = ()  # the held-out normals' gate scores, sorted
    chroma_range: tuple[float, float] | None = None  # accepted chroma (see chroma_range); None: no colour check

    def module(self, model: nn.Module) -> GateScore:
        """The scoring module on `model`'s teacher (shared, not copied)."""
        teacher = teacher_of(model)
        if teacher is None:
            raise ConfigError("the invalid-input gate needs a model with a teacher network")
        return GateScore(teacher, self.mean, self.precision)

    def to_bundle(self) -> dict[str, Any]:
        """The bundle's ``gate`` entry (tensors and plain values: loads with weights_only=True)."""
        return {"mean": self.mean.cpu(), "precision": self.precision.cpu(), **self.metadata()}

    def metadata(self) -> dict[str, Any]:
        """Everything but the matrices, as plain JSON (the ONNX metadata's ``gate``)."""
        return {"threshold": self.threshold, "alpha": self.alpha, "margin": self.margin, "n_fit": self.n_fit,
                "n_calibration": self.n_calibration, "max_saturated": self.max_saturated, "flat_std": FLAT_STD,
                "source": self.source, "scores": list(self.scores), "dims": int(self.mean.numel()),
                "chroma_range": None if self.chroma_range is None else list(self.chroma_range)}

    @classmethod
    def from_bundle(cls, data: Mapping[str, Any]) -> Gate:
        """Inverse of :meth:`to_bundle`."""
        return cls(data["mean"], data["precision"], float(data["threshold"]), float(data["alpha"]),
                   float(data["margin"]), int(data["n_fit"]), int(data["n_calibration"]),
                   float(data["max_saturated"]), str(data["source"]), tuple(data.get("scores", ())),
                   None if data.get("chroma_range") is None else (float(data["chroma_range"][0]),
                                                                 float(data["chroma_range"][1])))


@torch.no_grad()
def _pooled_and_stats(teacher: nn.Module, ds: Dataset, device: torch.device,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Pooled features (N, D), saturated shares (N,), chroma (N,) of `ds`, and each layer's width in D."""
    feats, sats, chromas, widths = [], [], [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        x = batch["image"].to(device)
        layers = teacher.features(x)  # type: ignore[operator]
        widths = [int(f.shape[1]) for f in layers]
        feats.append(pool_layers(layers).double().cpu().numpy())
        sats.append(pixel_stats(batch["image"].numpy())[1])
        chromas.append(chroma(batch["image"].numpy()))
    return np.concatenate(feats), np.concatenate(sats), np.concatenate(chromas), widths


def fit_gate(model: nn.Module, fit_ds: Dataset, calib_ds: Dataset, device: torch.device, alpha: float = 0.005,
             margin: float = 8.0, batch_size: int = 16, source: str = "") -> Gate:
    """Fit the gate: mean and per-layer Ledoit-Wolf precision (``block_precision``) of `fit_ds`'s pooled teacher
    features (the training normals), threshold from `calib_ds`'s scores (held-out normals, or the training ones
    when there are none)."""
    if margin < 1.0:
        raise ConfigError(f"train.gate_margin must be >= 1 (a factor on the conformal threshold), got {margin}")
    teacher = teacher_of(model)
    if teacher is None:
        raise ConfigError("the invalid-input gate needs a model with a teacher network")
    teacher.eval()
    f_fit, sat_fit, chroma_fit, widths = _pooled_and_stats(teacher, fit_ds, device, batch_size)
    loc, prec = block_precision(f_fit, widths)
    mean, precision = torch.from_numpy(loc).float(), torch.from_numpy(prec).float()
    f_cal, sat_cal, chroma_cal = ((f_fit, sat_fit, chroma_fit) if calib_ds is fit_ds else
                                  _pooled_and_stats(teacher, calib_ds, device, batch_size)[:3])
    d = f_cal - loc
    scores = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, prec, d), 0.0))
    conf = conformal_threshold(scores, alpha)
    max_sat = max(0.5, float(max(sat_fit.max(), sat_cal.max())) + 0.25)
    return Gate(mean, precision, conf.threshold * margin, float(alpha), float(margin), len(f_fit), len(f_cal),
                max_sat, source or f"per-layer Mahalanobis (Ledoit-Wolf) of pooled teacher features: conformal "
                f"alpha={alpha:g} rank {conf.rank} of {conf.n} normal scores x margin {margin:g}",
                tuple(float(s) for s in np.sort(scores)), chroma_range(np.concatenate([chroma_fit, chroma_cal])))
