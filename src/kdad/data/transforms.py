"""Image and mask loading: the one place where files become tensors.

Every dataset goes through :func:`load_image` / :func:`load_mask`, so training, evaluation and serving
see the same pixels: RGB, resized with PIL bilinear (antialiased, like torchvision ``Resize`` on a PIL
image), scaled to [0, 1]. Mean/std normalisation is *not* done here; each model does its own
(see docs/design.md, "Image contract").
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kdad.errors import ConfigError, DatasetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Accepted image file extensions (matched case-insensitively)."""

PathLike = str | Path
Size = int | tuple[int, int]
SizeRule = Callable[[int, int], tuple[int, int]]
"""(native H, native W) -> (H, W) to load at: a size that depends on the image (kdad.tiling)."""

MAX_MEGAPIXELS = 50.0
"""Default cap on an image's pixel count (width x height / 1e6) for every entry point: training, evaluation,
`kdad predict`, `kdad serve` and `kdad data check`. The environment variable KDAD_MAX_MEGAPIXELS changes it;
predict, serve and data check also take --max-megapixels."""

MAX_MEGAPIXELS_ENV = "KDAD_MAX_MEGAPIXELS"


class ImageTooLargeError(DatasetError):
    """An image whose header declares more pixels than the cap (a decompression bomb, or just too big)."""


class NarrowRangeWarning(UserWarning):
    """A 16-bit image whose values all fit in 0-255: probably 8-bit data, it will load almost black."""


# Modes whose samples do not fit in 8 bits; converting them with PIL's convert("RGB") would clip.
_HIGH_BIT_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def is_image_file(path: PathLike) -> bool:
    """True for a non-hidden file whose extension is in :data:`IMAGE_EXTENSIONS` (any case)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; [] if the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _hw(size: Size) -> tuple[int, int]:
    """``size`` as (H, W); an int means a square."""
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"image size must be positive, got {size!r}")
    return h, w


_FILE_OBJECT_REPR = re.compile(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def read_error_text(e: BaseException) -> str:
    """``Type: message`` of a failed image read, without the ``<_io.BytesIO object at 0x...>`` that PIL
    puts in some messages when it reads from memory (uploads, bytes read once for hashing)."""
    text = _FILE_OBJECT_REPR.sub("the data", str(e))
    if isinstance(e, Image.UnidentifiedImageError):
        text = "not an image PIL can read (empty, cut short or an unknown format)"
    return f"{type(e).__name__}: {text}"


def _display_name(path: Any) -> Any:
    """``path`` for messages: a file path as is, an in-memory stream as "(in-memory data)"."""
    return path if isinstance(path, (str, Path)) else "(in-memory data)"


def _hw_of(size: Size | SizeRule, im: Image.Image) -> tuple[int, int]:
    """The (H, W) to load ``im`` at: ``size`` itself, or what a :data:`SizeRule` says for its native size."""
    return _hw(size(im.size[1], im.size[0])) if callable(size) else _hw(size)


def pixel_cap(value: float | None = None) -> float:
    """The pixel cap in megapixels: `value` if given, else $KDAD_MAX_MEGAPIXELS, else :data:`MAX_MEGAPIXELS`."""
    where = "--max-megapixels"
    if value is None:
        raw = os.environ.get(MAX_MEGAPIXELS_ENV, "").strip()
        if not raw:
            return MAX_MEGAPIXELS
        where = MAX_MEGAPIXELS_ENV
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r} is not a number (megapixels)") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{where} must be a positive finite number of megapixels, got {value!r}")
    return float(value)


def check_pixel_count(size: tuple[int, int], path: PathLike, limit: float | None = None) -> None:
    """Raise :class:`ImageTooLargeError` naming ``path`` if ``size`` (W, H) exceeds the cap (megapixels).

    Call it on the header's size, before decoding: decoding is what costs the memory.
    """
    cap = pixel_cap(limit)
    w, h = size
    if w * h > cap * 1e6:
        raise ImageTooLargeError(
            f"image {path} is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the {cap:g} MP limit (possible "
            f"decompression bomb); resize it, or raise the limit with --max-megapixels or {MAX_MEGAPIXELS_ENV}"
        )


def open_header(path: PathLike, limit: float | None = None) -> Image.Image:
    """Open an image lazily (header only) and check its pixel count against the cap; nothing is decoded."""
    name = _display_name(path)
    try:
        im = Image.open(path)
    except FileNotFoundError as e:
        raise DatasetError(f"image file not found: {name}") from e
    except Image.DecompressionBombError as e:  # PIL's own, higher limit tripped first
        raise ImageTooLargeError(f"image {name} is too large: {_FILE_OBJECT_REPR.sub('the data', str(e))}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise DatasetError(f"cannot read image file {name}: {read_error_text(e)}") from e
    check_pixel_count(im.size, name, limit)
    return im


def open_image(path: PathLike, max_megapixels: float | None = None) -> Image.Image:
    """Open and fully decode an image file; any failure raises :class:`DatasetError` naming the file.

    The header's pixel count is checked against the cap (:func:`pixel_cap`) before decoding.
    """
    im = open_header(path, max_megapixels)
    try:
        im.load()  # decode now, so a truncated or corrupt file fails here and not later
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise DatasetError(f"cannot read image file {_display_name(path)}: {read_error_text(e)}") from e
    return im


def narrow_range_max(im: Image.Image) -> int | None:
    """For a 16-bit image (decoded) whose values all lie in 1..255 at most: its maximum, else None.

    Such a file most likely holds 8-bit data; scaled by 1/65535 like any 16-bit image it comes out near black.
    """
    if im.mode not in _HIGH_BIT_MODES:
        return None
    top = int(np.asarray(im).max(initial=0))
    return top if 0 < top <= 255 else None


def _warn_narrow_range(im: Image.Image, path: PathLike) -> None:
    top = narrow_range_max(im)
    if top is not None:
        warnings.warn(f"{path}: 16-bit image ({im.mode}) whose values only reach {top} (8-bit data?); it is "
                      "scaled by 1/65535 and loads almost black. Save it as 8-bit, or scale it to 16 bits",
                      NarrowRangeWarning, stacklevel=3)


def _to_rgb_float(im: Image.Image, hw: tuple[int, int], path: PathLike) -> np.ndarray:
    """Resize ``im`` to ``hw`` and return float32 (H, W, 3) in [0, 1]."""
    h, w = hw
    if im.mode in _HIGH_BIT_MODES or im.mode == "F":
        # 16-bit (or float) grayscale: resize in float so no precision is lost, then repeat to 3 channels.
        _warn_narrow_range(im, path)
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / _HIGH_BIT_MODES[im.mode] if im.mode in _HIGH_BIT_MODES else arr  # "F" is taken as [0, 1]
        f = Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32))
        if f.size != (w, h):
            f = f.resize((w, h), Image.Resampling.BILINEAR)
        gray = np.asarray(f, dtype=np.float32)
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        if im.mode == "P":
            im = im.convert("RGBA")  # palette transparency is honoured by going through RGBA
        # Alpha (RGBA, LA, PA) is dropped, not composited: the colour channels are kept as stored,
        # exactly what torchvision's ImageFolder loader (img.convert("RGB")) does.
        if im.mode != "RGB":
            im = im.convert("RGB")
    except Exception as e:
        raise DatasetError(f"cannot convert image {path} (mode {im.mode}) to RGB: {e}") from e
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def load_image(
    path: PathLike, size: Size | SizeRule = 256, max_megapixels: float | None = None
) -> torch.Tensor:
    """Load an image file as float32 (3, H, W) in [0, 1], RGB, resized to ``size`` (int = square, or a
    :data:`SizeRule` of the native size).

    Gray, LA, P, RGBA, CMYK and 16-bit gray are converted to RGB (alpha is dropped, not composited;
    16-bit values are scaled by 1/65535, with a :class:`NarrowRangeWarning` when they all fit in 8 bits;
    float "F" images are taken as [0, 1]). Resize is PIL bilinear with antialiasing; EXIF orientation is
    not applied (as in torchvision). A missing, corrupt or truncated file raises :class:`DatasetError`
    naming the file, one above the pixel cap (:func:`pixel_cap`) :class:`ImageTooLargeError`.
    """
    im = open_image(path, max_megapixels)
    arr = _to_rgb_float(im, _hw_of(size, im), path)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _mask_nonzero(im: Image.Image, path: PathLike) -> np.ndarray:
    """Boolean (H, W): True where any colour channel of the mask is non-zero (alpha ignored)."""
    try:
        if im.mode == "P":
            im = im.convert("RGB")
        elif im.mode == "CMYK":
            im = im.convert("RGB")
    except Exception as e:
        raise DatasetError(f"cannot convert mask {path} (mode {im.mode}): {e}") from e
    arr = np.asarray(im)
    if arr.ndim == 3:
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            arr = arr[..., :-1]
        return np.any(arr != 0, axis=2)
    return arr != 0


def load_mask(path: PathLike, size: Size = 256, image_path: PathLike | None = None) -> torch.Tensor:
    """Load a defect mask as float32 (1, H, W) with values in {0, 1}.

    Non-zero pixels of the file are defect. The 0/1 mask is resized with PIL bilinear (antialiased)
    and binarised: a pixel is 1 where the resized value is > 0.5. If ``image_path`` is given, a mask
    whose pixel size differs from that image's raises :class:`DatasetError` naming both files.
    """
    hw = _hw(size)
    im = open_image(path)
    if image_path is not None:
        image_size = _file_size(image_path)
        _check_same_size(image_path, image_size, path, im.size)
    return _mask_tensor(im, hw, path)


def image_file_size(path: PathLike) -> tuple[int, int]:
    """(W, H) of an image file, read from its header only."""
    return _file_size(path)


def _file_size(path: PathLike) -> tuple[int, int]:
    """(W, H) of an image file from its header."""
    with open_header(path) as im:
        return im.size


def _check_same_size(
    image_path: PathLike, image_size: tuple[int, int], mask_path: PathLike, mask_size: tuple[int, int]
) -> None:
    if image_size != mask_size:
        raise DatasetError(
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size"
        )


def _mask_tensor(im: Image.Image, hw: tuple[int, int], path: PathLike) -> torch.Tensor:
    h, w = hw
    binary = _mask_nonzero(im, path).astype(np.float32)
    if binary.shape != (h, w):
        f = Image.fromarray(binary).resize((w, h), Image.Resampling.BILINEAR)
        binary = (np.asarray(f, dtype=np.float32) > 0.5).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(binary))[None]


def load_image_and_mask(
    image_path: PathLike, mask_path: PathLike | None, size: Size | SizeRule = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an image (3, H, W) in [0, 1] and its mask (1, H, W) in {0, 1}; no mask gives zeros.

    Opens the image once and checks that the mask has the image's pixel size (else
    :class:`DatasetError` naming both files).
    """
    im = open_image(image_path)
    hw = _hw_of(size, im)
    image = torch.from_numpy(np.ascontiguousarray(_to_rgb_float(im, hw, image_path).transpose(2, 0, 1)))
    if mask_path is None:
        return image, torch.zeros(1, *hw, dtype=torch.float32)
    mask_im = open_image(mask_path)
    _check_same_size(image_path, im.size, mask_path, mask_im.size)
    return image, _mask_tensor(mask_im, hw, mask_path)


def images_to_batch(paths: Sequence[PathLike], size: Size = 256) -> torch.Tensor:
    """Load image files into one float32 batch (B, 3, H, W) in [0, 1]."""
    hw = _hw(size)
    if len(paths) == 0:
        return torch.empty(0, 3, *hw, dtype=torch.float32)
    return torch.stack([load_image(p, hw) for p in paths])


def input_contract(image_size: int) -> dict[str, Any]:
    """What a model's input must be (shared by ONNX metadata, runners and the web service)."""
    return {
        "name": "images",
        "layout": "NCHW",
        "shape": ["batch", 3, image_size, image_size],
        "dtype": "float32",
        "color": "RGB",
        "range": [0.0, 1.0],
        "resize": f"bilinear (PIL, antialiased) to {image_size}x{image_size}, no crop, aspect ratio not kept",
        "normalization": "inside the model/graph; do NOT subtract mean / divide by std before feeding it",
    }
