"""Heatmap overlays shared by `kdad predict`, the report and the web service."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 'jet' colours, scaled to [vmin, vmax] (a fixed, not per-image, range)."""
    from matplotlib import colormaps

    scale = max(vmax - vmin, 1e-12)
    norm = np.clip((amap.astype(np.float32) - vmin) / scale, 0.0, 1.0)
    return (colormaps["jet"](norm)[..., :3] * 255).astype(np.uint8)


def overlay(image01: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """Blend a colourised map onto an RGB image in [0, 1] (H, W, 3) -> uint8 (H, W, 3)."""
    heat = colorize(amap, vmin, vmax).astype(np.float32)
    img = np.clip(image01, 0, 1).astype(np.float32) * 255
    return ((1 - alpha) * img + alpha * heat).astype(np.uint8)


def contour(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Draw the 1-px outline of a binary mask onto a uint8 RGB image (copy)."""
    from scipy import ndimage

    m = mask.astype(bool)
    edge = m & ~ndimage.binary_erosion(m)
    out = rgb.copy()
    out[edge] = color
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()

