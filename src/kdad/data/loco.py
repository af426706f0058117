"""MVTec LOCO AD layout (Bergmann et al., IJCV 2022): structural and logical anomalies, one GT PNG per defect.

Layout of one category folder::

    <category>/train/good/*.png
    <category>/validation/good/*.png                       held-out normals (split="validation")
    <category>/test/{good,logical_anomalies,structural_anomalies}/NNN.png
    <category>/ground_truth/{logical,structural}_anomalies/NNN/000.png, 001.png, ...   one PNG per defect
    <category>/defects_config.json                         defect_name, pixel_value, saturation rule

Items follow docs/design.md (``image``, ``mask`` = union of the channels resized bilinearly and binarised
at 0.5, ``label``, ``path``, ``defect_type`` = the test folder name, ``has_mask``). The per-defect channels
that AU-sPRO needs are not in the item (they vary in number, so they would not collate): the evaluation reads
them by index with :meth:`LocoDataset.spro_channels`.

:func:`write_toy_loco` writes a tiny generated category in this layout (a box that must hold a red disc on
the left and a blue disc on the right), used by the tests and ``benchmarks/dskd_logical.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from kdad.data.mvtec import GOOD, MISSING_MASK_HINT, Sample, SampleDataset
from kdad.data.transforms import PathLike, Size, _hw, list_images, load_image, open_image
from kdad.errors import DatasetError
from kdad.metrics.spro import LOCO_SUBSETS, LocoDefect, SproChannel, load_loco_defects_config, spro_channel

LocoSplit = Literal["train", "validation", "test"]
DEFECTS_CONFIG = "defects_config.json"


@dataclass(frozen=True)
class LocoSample(Sample):
    """A LOCO entry: ``channel_paths`` holds one GT PNG per defect (empty for good images)."""

    channel_paths: tuple[Path, ...] = ()


def _resize_binary(binary: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> (h, w) bool: PIL bilinear (antialiased), > 0.5; kept non-empty if the input was not."""
    if binary.shape == hw:
        return binary.copy()
    f = np.asarray(Image.fromarray(binary.astype(np.float32)).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    out = f > 0.5
    if binary.any() and not out.any():  # a defect thinner than a pixel after resizing keeps its footprint
        out = f > 0
    return out


def _read_channel(path: Path) -> np.ndarray:
    arr = np.asarray(open_image(path))
    return arr if arr.ndim == 2 else arr[..., 0]


class LocoDataset(SampleDataset):
    """One MVTec LOCO AD category.

    Args:
        root: the category folder (``.../breakfast_box``), or the dataset folder with ``category``.
        split: ``"train"``, ``"validation"`` (normal held-out images) or ``"test"``.
        image_size: output size (int = square).
        category: sub-folder of ``root``.
        allow_missing_masks: if False, an anomalous test image without ``ground_truth/<type>/<stem>/``
            raises :class:`DatasetError`; if True it gets no channels and ``has_mask=False``.
    """

    image_size: Size  # a fixed size, never a SizeRule

    def __init__(self, root: PathLike, split: LocoSplit = "train", image_size: Size = 256,
                 category: str | None = None, allow_missing_masks: bool = False) -> None:
        if split not in ("train", "validation", "test"):
            raise DatasetError(f"LOCO split must be 'train', 'validation' or 'test', got {split!r}")
        root = Path(root) / category if category else Path(root)
        if not root.is_dir():
            raise DatasetError(f"LOCO category folder not found: {root}")
        self.root, self.split, self.category = root, split, root.name
        self.allow_missing_masks = allow_missing_masks
        self.defects: dict[int, LocoDefect] = {}
        if split == "test":
            self.defects = load_loco_defects_config(root / DEFECTS_CONFIG)
            samples: list[Sample] = self._test_samples()
        else:
            folder = root / split / GOOD
            paths = list_images(folder)
            if not paths:
                raise DatasetError(f"LOCO {split} split is empty: no images in {folder}")
            samples = [LocoSample(p, None, 0, GOOD, True) for p in paths]
        super().__init__(samples, image_size)

    def _test_samples(self) -> list[Sample]:
        samples: list[Sample] = []
        for kind in (GOOD,) + LOCO_SUBSETS:
            folder = self.root / "test" / kind
            for path in list_images(folder):
                if kind == GOOD:
                    samples.append(LocoSample(path, None, 0, GOOD, True))
                    continue
                gt_dir = self.root / "ground_truth" / kind / path.stem
                chans = tuple(list_images(gt_dir))
                if not chans and not self.allow_missing_masks:
                    raise DatasetError(f"no ground-truth channels for {path}: expected PNGs in {gt_dir} "
                                       f"({MISSING_MASK_HINT})")
                samples.append(LocoSample(path, None, 1, kind, bool(chans), chans))
        if not samples:
            raise DatasetError(f"LOCO test split is empty under {self.root / 'test'} "
                               f"(expected folders {[GOOD, *LOCO_SUBSETS]})")
        return samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        hw = _hw(self.image_size)
        image = load_image(s.image_path, hw)
        mask = np.zeros(hw, dtype=bool)
        chans = s.channel_paths if isinstance(s, LocoSample) else ()
        if chans:
            union = np.logical_or.reduce([_read_channel(p) != 0 for p in chans])
            mask = _resize_binary(union, hw)
        return {"image": image, "mask": torch.from_numpy(mask.astype(np.float32))[None], "label": s.label,
                "path": str(s.image_path), "defect_type": s.defect_type, "has_mask": s.has_mask}

    @property
    def loco_kinds(self) -> list[str]:
        """Per item: ``good``, ``structural_anomalies`` or ``logical_anomalies``."""
        return self.defect_types

    def spro_channels(self, index: int, size: tuple[int, int] | None = None) -> list[SproChannel]:
        """GT channels of item ``index`` at ``size`` (H, W) (default: image_size) for AU-sPRO.

        Masks are resized like ``mask``; an absolute saturation threshold (pixels at the GT resolution) is
        scaled by the area ratio, so it keeps its meaning at the evaluation size.
        """
        s = self.samples[index]
        hw = tuple(size) if size is not None else _hw(self.image_size)
        out: list[SproChannel] = []
        for path in s.channel_paths if isinstance(s, LocoSample) else ():
            native = _read_channel(path)
            ch = spro_channel(native, self.defects, source=str(path))
            scale = (hw[0] * hw[1]) / float(native.shape[0] * native.shape[1])
            thr = ch.saturation_threshold if ch.relative_saturation else ch.saturation_threshold * scale
            out.append(SproChannel(_resize_binary(ch.mask, hw), thr, ch.relative_saturation))  # type: ignore[arg-type]
        return out

    def __repr__(self) -> str:
        return f"LocoDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


# ------------------------------------------------------------------------------------------ toy category
TOY_DEFECTS: tuple[dict[str, Any], ...] = (
    {"defect_name": "missing_disc", "pixel_value": 251, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra_disc", "pixel_value": 252, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "swapped_colours", "pixel_value": 253, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 254, "saturation_threshold": 60, "relative_saturation": False},
)
_RED, _BLUE = np.array([0.85, 0.15, 0.1]), np.array([0.1, 0.2, 0.85])


def _disc(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _toy_image(size: int, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One image (H, W, 3) uint8 and its defect channels [(defect_name, mask)]."""
    img = np.full((size, size, 3), 0.55) + rng.normal(0, 0.02, (size, size, 3))
    m = int(0.1 * size)
    img[m:size - m, m:size - m] = 0.8 + rng.normal(0, 0.02, (size - 2 * m, size - 2 * m, 3))  # the box
    j = rng.uniform(-0.02, 0.02, 4) * size
    r = 0.13 * size
    spots = [(0.5 * size + j[0], 0.3 * size + j[1]), (0.5 * size + j[2], 0.7 * size + j[3])]
    colours = [_RED, _BLUE] if kind != "swapped_colours" else [_BLUE, _RED]
    chans: list[tuple[str, np.ndarray]] = []
    drop = int(rng.integers(2)) if kind == "missing_disc" else -1
    for i, ((cy, cx), col) in enumerate(zip(spots, colours)):
        disc = _disc(size, cy, cx, r)
        if i == drop:
            chans.append((kind, disc))
            continue
        img[disc] = col * rng.uniform(0.92, 1.08) + rng.normal(0, 0.02, (int(disc.sum()), 3))
        if kind == "swapped_colours":
            chans.append((kind, disc))
    if kind == "extra_disc":  # a third disc in the free band above or below the pair
        cy = (0.24 if rng.integers(2) else 0.76) * size
        disc = _disc(size, cy, 0.5 * size + j[1], r * 0.9)
        img[disc] = (_RED if rng.integers(2) else _BLUE) + rng.normal(0, 0.02, (int(disc.sum()), 3))
        chans.append((kind, disc))
    if kind == "scratch":
        scratch = np.zeros((size, size), bool)
        y0, y1 = rng.uniform(0.2, 0.8, 2) * size
        for t in np.linspace(0, 1, 4 * size):
            x = int(0.15 * size + t * 0.7 * size)
            y = int(y0 + t * (y1 - y0))
            scratch[max(0, y - 1):y + 1, x] = True
        img[scratch] = 0.15
        chans.append((kind, scratch))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), chans


def write_toy_loco(root: PathLike, size: int = 64, n_train: int = 8, n_validation: int = 4,
                   n_test: tuple[int, int, int] = (4, 3, 2), seed: int = 0) -> Path:
    """Write a generated LOCO-format category to ``root`` (the category folder) and return it.

    Normal: a box with a red disc on the left and a blue disc on the right (jittered, noisy). Logical
    anomalies (cycled): one disc missing, a third disc, colours swapped. Structural: a dark scratch.
    n_test = (good, logical, structural) test images. Deterministic for a given ``seed``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = {d["defect_name"]: d["pixel_value"] for d in TOY_DEFECTS}
    root.mkdir(parents=True, exist_ok=True)
    (root / DEFECTS_CONFIG).write_text(json.dumps(list(TOY_DEFECTS), indent=1))
    logical = ("missing_disc", "extra_disc", "swapped_colours")
    plan = [("train/good", "good", n_train), ("validation/good", "good", n_validation),
            ("test/good", "good", n_test[0]), ("test/logical_anomalies", "logical", n_test[1]),
            ("test/structural_anomalies", "scratch", n_test[2])]
    for folder, kind, n in plan:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            this = logical[k % len(logical)] if kind == "logical" else kind
            img, chans = _toy_image(size, rng, this)
            Image.fromarray(img).save(root / folder / f"{k:03d}.png")
            if chans:
                gt = root / "ground_truth" / folder.split("/")[1] / f"{k:03d}"
                gt.mkdir(parents=True, exist_ok=True)
                for c, (name, mask) in enumerate(chans):
                    Image.fromarray(mask.astype(np.uint8) * names[name]).save(gt / f"{c:03d}.png")
    return root
