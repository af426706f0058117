"""Foreground masks that restrict synthetic anomalies to the object (URD, official code hito2448/URD).

URD computes one static mask per training image (cv2 BGR image resized to 256 x 256):

- Otsu (capsule, screw): grayscale, Otsu with ``THRESH_BINARY_INV``, so the *darker* pixels are foreground.
  Here the threshold comes from ``skimage.filters.threshold_otsu`` on the same uint8 grayscale
  (0.299 R + 0.587 G + 0.114 B); ``polarity`` picks dark (official), bright, or "auto" (the class that
  covers less of the image border is the object).
- GrabCut (bottle, cable, hazelnut, metal_nut, pill, toothbrush, zipper; every VisA class): ``cv2.grabCut``
  with rect (1, 1, w-1, h-1), 11 iterations, ``GC_INIT_WITH_RECT``; foreground = labels FGD or PR_FGD.
  Needs OpenCV, which is optional: ``pip install opencv-python-headless``.
- No mask for textures and transistor.

The paper describes only "binarizing the images and setting a threshold"; the tables below follow the code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from kdad.errors import ConfigError

FOREGROUND_METHODS = ("none", "otsu", "grabcut")
OTSU_POLARITIES = ("dark", "bright", "auto")

URD_FOREGROUND_MVTEC: Mapping[str, str] = MappingProxyType(
    {
        **{c: "none" for c in ("carpet", "grid", "leather", "tile", "wood", "transistor")},
        **{c: "otsu" for c in ("capsule", "screw")},
        **{
            c: "grabcut" for c in ("bottle", "cable", "hazelnut", "metal_nut", "pill", "toothbrush", "zipper")
        },
    }
)
"""URD's per-category foreground method on MVTec AD (``train.py``); unknown categories get "none"."""

URD_FOREGROUND_VISA: Mapping[str, str] = MappingProxyType(
    {
        c: "grabcut"
        for c in (
            "candle",
            "capsules",
            "cashew",
            "chewinggum",
            "fryum",
            "macaroni1",
            "macaroni2",
            "pcb1",
            "pcb2",
            "pcb3",
            "pcb4",
            "pipe_fryum",
        )
    }
)
"""URD's VisA script (``train_visa.py``) uses GrabCut for all 12 classes."""

URD_FOREGROUND: Mapping[str, str] = MappingProxyType({**URD_FOREGROUND_MVTEC, **URD_FOREGROUND_VISA})
"""URD's tables of both datasets in one (their category names are disjoint): the perlin_texture default."""


def _gray_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) uint8 grayscale with OpenCV's BGR2GRAY weights."""
    rgb = (images.detach().to(torch.float32).clamp(0, 1) * 255.0).round()
    gray = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # weights sum to 1: stays in [0, 255]
    return gray.round().to(torch.uint8).cpu().numpy()


def otsu_foreground(images: Tensor, polarity: str = "dark") -> Tensor:
    """Per-image Otsu foreground.

    Args:
        images: (B, 3, H, W) in [0, 1].
        polarity: "dark" (pixels <= threshold are foreground; URD's THRESH_BINARY_INV), "bright", or
            "auto" (whichever side covers less of the 1-pixel image border is the object).

    Returns:
        (B, 1, H, W) float32 in {0, 1}.
    """
    from skimage.filters import threshold_otsu

    if polarity not in OTSU_POLARITIES:
        raise ConfigError(f"otsu_polarity={polarity!r} is not valid; choose one of {OTSU_POLARITIES}")
    masks = []
    for gray in _gray_uint8(images):
        thr = threshold_otsu(gray) if gray.min() != gray.max() else gray.max()
        dark = gray <= thr
        if polarity == "bright" or (polarity == "auto" and _border_fraction(dark) > 0.5):
            dark = ~dark
        masks.append(torch.from_numpy(dark))
    return torch.stack(masks).unsqueeze(1).to(torch.float32).to(images.device)


def _border_fraction(mask: np.ndarray) -> float:
    border = np.concatenate((mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]))
    return float(border.mean())


def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError(
            "foreground method 'grabcut' needs OpenCV, which is not installed; "
            "run `pip install opencv-python-headless`, or choose foreground 'otsu' or 'none'"
        ) from exc
    return cv2


def grabcut_foreground(images: Tensor, iterations: int = 11) -> Tensor:
    """Per-image GrabCut foreground as in URD: rect (1, 1, w-1, h-1), ``GC_INIT_WITH_RECT``.

    OpenCV's RNG is reseeded (0) before each image so the result is deterministic.

    Args:
        images: (B, 3, H, W) in [0, 1].
        iterations: GrabCut iterations (URD: 11).

    Returns:
        (B, 1, H, W) float32 in {0, 1}.

    Raises:
        ConfigError: OpenCV is missing (the message gives the pip command).
    """
    cv2 = _import_cv2()
    rgb = (images.detach().to(torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8)
    frames = list(rgb.permute(0, 2, 3, 1).cpu().numpy())

    def one(img: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(img[..., ::-1])
        h, w = bgr.shape[:2]
        labels = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))  # float64 GMM models, as OpenCV wants
        cv2.setRNGSeed(0)  # OpenCV's RNG is per thread, so seeding here keeps threads deterministic
        cv2.grabCut(bgr, labels, (1, 1, w - 1, h - 1), bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
        return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)

    # grabCut releases the GIL: one image per core (it is the one-off cost of URD's first epoch)
    # (the pool starts threads only as work arrives, so a small batch does not start one per core)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        masks = list(pool.map(one, frames))
    return torch.from_numpy(np.stack(masks)).unsqueeze(1).to(torch.float32).to(images.device)


def compute_foreground(
    images: Tensor, method: str, otsu_polarity: str = "dark", grabcut_iterations: int = 11
) -> Tensor | None:
    """Foreground masks by method name ("none" | "otsu" | "grabcut").

    Returns:
        (B, 1, H, W) float32 in {0, 1}, or None for "none" (whole image eligible).
    """
    if method == "none":
        return None
    if method == "otsu":
        return otsu_foreground(images, otsu_polarity)
    if method == "grabcut":
        return grabcut_foreground(images, grabcut_iterations)
    raise ConfigError(f"foreground method {method!r} is not valid; choose one of {FOREGROUND_METHODS}")
