"""`kdad data check`: find what is wrong with a dataset folder before training on it.

:func:`check_dataset` detects the layout (MVTec AD, MVTec LOCO, VisA, BTAD, MVTec AD 2, Real-IAD),
lists every image with its split and defect type, and reports, each with the file named:

- errors (they would corrupt training or evaluation): unreadable or truncated image or mask, a
  defective image without a mask, a mask without an image, a file listed in a split file but
  missing, a mask whose size differs from its image's, an empty split, the same image content in
  the training split and an evaluation split;
- errors also: an image or mask above the pixel cap (``--max-megapixels``, the cap training, predict
  and serve use), found from the header without decoding it;
- warnings: mask values other than 0 and one positive value, duplicates inside one split, images
  not listed in the split file, 16-bit images whose values all fit in 0-255 (they load near black).

Files are read once: hashed (blake2b on the bytes), verified and decoded by PIL (JPEGs at reduced
DCT scale, which still decodes every byte), on a thread pool.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdad.data.mvtec import GOOD, find_mask, mask_index
from kdad.data.transforms import (
    ImageTooLargeError,
    PathLike,
    check_pixel_count,
    is_image_file,
    list_images,
    narrow_range_max,
    pixel_cap,
    read_error_text,
)
from kdad.errors import DatasetError
from kdad.formats import CHECKED_FORMATS

FORMATS: tuple[str, ...] = CHECKED_FORMATS  # the registry's formats this module detects and checks
"""Layouts `kdad data check` knows (``auto`` detects one of them)."""

ERROR, WARNING = "error", "warning"
UNLABELED = "unlabeled"


@dataclass(frozen=True)
class Problem:
    """One finding: ``level`` is ``"error"`` or ``"warning"``; ``path`` is the file (or folder) at fault."""

    level: str
    kind: str
    path: str
    message: str


@dataclass(frozen=True)
class Entry:
    """One image of the dataset with its split, label (1 defective, 0 good, -1 unlabeled) and masks."""

    category: str
    split: str
    image: Path
    label: int
    defect_type: str
    masks: tuple[Path, ...] = ()


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`: the images found and the problems, in the order found."""

    root: Path
    format: str
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def add(self, level: str, kind: str, path: PathLike, message: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(level, kind, str(path), message))

    @property
    def errors(self) -> list[Problem]:
        """Problems that would corrupt training or evaluation."""
        return [p for p in self.problems if p.level == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """Problems worth a look that do not block training."""
        return [p for p in self.problems if p.level == WARNING]

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Number of images per (category, split, defect type)."""
        return dict(sorted(Counter((e.category, e.split, e.defect_type) for e in self.entries).items()))

    def text(self) -> str:
        """Human-readable summary: counts per split and defect type, then every problem."""
        cats = sorted({e.category for e in self.entries})
        n_masks = sum(len(e.masks) for e in self.entries)
        head = (f"{self.root}: format {self.format}, {len(cats)} categor{'y' if len(cats) == 1 else 'ies'}, "
                f"{len(self.entries)} images, {n_masks} masks")
        lines = [head, ""]
        rows = [("category", "split", "defect_type", "images")]
        rows += [(c, s, d, str(n)) for (c, s, d), n in self.counts().items()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines += ["", f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        lines += [f"{p.level.upper():7s} {p.kind}: {p.path}: {p.message}" for p in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- detection


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def detect_format(path: PathLike) -> str:
    """The layout of ``path`` (a dataset folder or one category of it), one of :data:`FORMATS`."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if (root / "realiad_jsons").is_dir() or (root.name.startswith("realiad_")
                                              and (root.parent / "realiad_jsons").is_dir()):
        return "realiad"
    folders = [root, *_subdirs(root)]
    if (root / "split_csv").is_dir() or any((d / "Data" / "Images").is_dir() for d in folders):
        return "visa"
    for d in folders:
        if (d / "test_public").is_dir():
            return "mvtec_ad2"
        if (d / "test" / "logical_anomalies").is_dir() or (d / "test" / "structural_anomalies").is_dir():
            return "loco"
        if (d / "train" / "ok").is_dir() or (d / "test" / "ok").is_dir():
            return "btad"
    if any((d / "train").is_dir() and (d / "test").is_dir() for d in folders):
        return "mvtec"
    raise DatasetError(f"cannot tell the layout of {root}; pass --format, one of {list(FORMATS)}")


def _categories(root: Path, is_category: Callable[[Path], bool], category: str | None) -> list[Path]:
    """``[root]`` when root is a category folder, else its category sub-folders (or just ``category``)."""
    if is_category(root):
        return [root]
    found = [d for d in _subdirs(root) if is_category(d)]
    if category:
        found = [d for d in found if d.name == category]
    if not found:
        raise DatasetError(f"no category folder found in {root}" + (f" named {category!r}" if category else ""))
    return found


# --------------------------------------------------------------------------------------------- scanners


def _add_folder(rep: CheckReport, cat: str, split: str, folder: Path, label: int, defect_type: str,
                mask_dir: Path | None = None) -> None:
    """Images of ``folder`` as entries; with ``mask_dir``, pair each with its mask by stem."""
    images = list_images(folder)
    if mask_dir is None:
        rep.entries += [Entry(cat, split, p, label, defect_type) for p in images]
        return
    masks = mask_index(mask_dir)
    used: set[Path] = set()
    for p in images:
        m = find_mask(masks, p.stem)
        if m is None:
            rep.add(ERROR, "missing_mask", p, f"defective image without a mask in {mask_dir}")
        else:
            used.add(m)
        rep.entries.append(Entry(cat, split, p, label, defect_type, (m,) if m else ()))
    for m in sorted(set(masks.values()) - used):
        if is_image_file(m):
            rep.add(ERROR, "orphan_mask", m, f"mask without an image in {folder}")


def _orphan_mask_dirs(rep: CheckReport, gt: Path, known_types: set[str]) -> None:
    """Masks in ground-truth folders that have no test folder at all."""
    if gt.is_dir():
        for d in _subdirs(gt):
            if d.name not in known_types:
                for m in sorted(p for p in d.rglob("*") if is_image_file(p)):
                    rep.add(ERROR, "orphan_mask", m, f"mask without an image: no test folder {d.name!r}")


def _expect(rep: CheckReport, cat: str, splits: Iterable[str], where: Path) -> None:
    """Empty-split errors for every split of ``cat`` that has no image."""
    present = {e.split for e in rep.entries if e.category == cat}
    for s in splits:
        if s not in present:
            rep.add(ERROR, "empty_split", where, f"split {s!r} of category {cat!r} has no images")


def _scan_mvtec(rep: CheckReport, root: Path, category: str | None) -> None:
    for c in _categories(root, lambda d: (d / "train").is_dir() and (d / "test").is_dir(), category):
        _add_folder(rep, c.name, "train", c / "train" / GOOD, 0, GOOD)
        types = _subdirs(c / "test")
        for t in types:
            gt = None if t.name == GOOD else c / "ground_truth" / t.name
            _add_folder(rep, c.name, "test", t, int(t.name != GOOD), t.name, gt)
        _orphan_mask_dirs(rep, c / "ground_truth", {t.name for t in types})
        _expect(rep, c.name, ("train", "test"), c)


def _scan_loco(rep: CheckReport, root: Path, category: str | None) -> None:
    for c in _categories(root, lambda d: (d / "test" / "logical_anomalies").is_dir()
                         or (d / "test" / "structural_anomalies").is_dir(), category):
        for split in ("train", "validation"):
            _add_folder(rep, c.name, split, c / split / GOOD, 0, GOOD)
        types = _subdirs(c / "test")
        for t in types:
            for p in list_images(t):
                masks: tuple[Path, ...] = ()
                if t.name != GOOD:
                    mask_dir = c / "ground_truth" / t.name / p.stem  # LOCO: one folder of masks per image
                    masks = tuple(list_images(mask_dir))
                    if not masks:
                        rep.add(ERROR, "missing_mask", p, f"defective image without masks in {mask_dir}")
                rep.entries.append(Entry(c.name, "test", p, int(t.name != GOOD), t.name, masks))
            gt = c / "ground_truth" / t.name
            if t.name != GOOD and gt.is_dir():
                stems = {p.stem for p in list_images(t)}
                for d in _subdirs(gt):
                    if d.name not in stems:
                        for m in list_images(d):
                            rep.add(ERROR, "orphan_mask", m, f"mask without an image: no {t / d.name}.png")
        _orphan_mask_dirs(rep, c / "ground_truth", {t.name for t in types})
        _expect(rep, c.name, ("train", "validation", "test"), c)


def _scan_btad(rep: CheckReport, root: Path, category: str | None) -> None:
    for c in _categories(root, lambda d: (d / "train" / "ok").is_dir() or (d / "test" / "ok").is_dir(), category):
        _add_folder(rep, c.name, "train", c / "train" / "ok", 0, GOOD)
        _add_folder(rep, c.name, "test", c / "test" / "ok", 0, GOOD)
        _add_folder(rep, c.name, "test", c / "test" / "ko", 1, "ko", c / "ground_truth" / "ko")
        _expect(rep, c.name, ("train", "test"), c)


def _scan_mvtec_ad2(rep: CheckReport, root: Path, category: str | None) -> None:
    from kdad.data.mvtec_ad2 import PRIVATE_SPLITS

    for c in _categories(root, lambda d: (d / "test_public").is_dir() or (d / "validation").is_dir(), category):
        _add_folder(rep, c.name, "train", c / "train" / GOOD, 0, GOOD)
        _add_folder(rep, c.name, "validation", c / "validation" / GOOD, 0, GOOD)
        _add_folder(rep, c.name, "test", c / "test_public" / GOOD, 0, GOOD)
        _add_folder(rep, c.name, "test", c / "test_public" / "bad", 1, "bad",
                    c / "test_public" / "ground_truth" / "bad")
        for split in PRIVATE_SPLITS:  # no ground truth: counted, read and hashed only
            if (c / split).is_dir():
                images = sorted(p for p in (c / split).rglob("*") if is_image_file(p))
                rep.entries += [Entry(c.name, split, p, -1, UNLABELED) for p in images]
        _expect(rep, c.name, ("train", "validation", "test"), c)


def _scan_visa(rep: CheckReport, root: Path, category: str | None, split_file: str | None) -> None:
    from kdad.data.visa import SPLIT_FILE, defect_names, read_split_csv

    if (root / "Data").is_dir():
        root, category = root.parent, root.name
    csv_path = Path(split_file) if split_file else SPLIT_FILE
    csv_path = csv_path if csv_path.is_absolute() else root / csv_path
    try:
        rows = read_split_csv(csv_path, root)
    except DatasetError as e:
        rep.add(ERROR, "split_file", csv_path, str(e))
        return
    cats = sorted({r.category for r in rows if category in (None, r.category)})
    listed: set[Path] = set()
    for cat in cats:
        names = defect_names(root / cat)
        for r in (r for r in rows if r.category == cat):
            listed.update(p for p in (r.image, r.mask) if p is not None)
            if not r.image.is_file():
                rep.add(ERROR, "missing_file", r.image, f"listed in {csv_path} line {r.line} but not found")
                continue
            masks: tuple[Path, ...] = ()
            if r.label == 1:
                if r.mask is None or not r.mask.is_file():
                    where = r.mask or "empty mask column"
                    rep.add(ERROR, "missing_mask", r.image, f"anomaly without a mask file ({where}, {csv_path} "
                            f"line {r.line})")
                else:
                    masks = (r.mask,)
            defect = names.get(r.image.name, "anomaly") if r.label else GOOD
            rep.entries.append(Entry(cat, r.split, r.image, r.label, defect, masks))
        for p in sorted(p for p in (root / cat / "Data").rglob("*") if is_image_file(p) and p not in listed):
            if "Masks" in p.relative_to(root / cat / "Data").parts:
                rep.add(ERROR, "orphan_mask", p, f"mask without an image: not referenced by {csv_path}")
            else:
                rep.add(WARNING, "unlisted", p, f"image not listed in {csv_path}: ignored by training and tests")
        _expect(rep, cat, ("train", "test"), csv_path)
    if not cats:
        rep.add(ERROR, "empty_split", csv_path, f"no rows for category {category!r}" if category else "no rows")


def _scan_realiad(rep: CheckReport, root: Path, category: str | None, split_file: str | None) -> None:
    from kdad.data.realiad import _base, find_image_dir, find_split_file, read_split_json

    base, _ = _base(root)
    json_dir = Path(split_file) if split_file else Path("realiad_jsons") / "realiad_jsons"
    json_dir = json_dir if json_dir.is_absolute() else base / json_dir
    if json_dir.is_file():
        cats = [json_dir.stem]
    elif json_dir.is_dir():
        cats = sorted(p.stem for p in json_dir.glob("*.json"))
    else:
        cats = sorted(p.stem for p in (base / "realiad_jsons").glob("*.json"))
    cats = [c for c in cats if category in (None, c)]
    if not cats:
        rep.add(ERROR, "split_file", json_dir,
                "no Real-IAD split JSON found" + (f" for {category!r}" if category else ""))
    for cat in cats:
        try:
            path = find_split_file(root, cat, split_file)
            data = read_split_json(path)
            prefix = str((data.get("meta") or {}).get("prefix") or cat).strip("/")
            image_dir = find_image_dir(root, prefix)
        except DatasetError as e:
            rep.add(ERROR, "split_file", json_dir, str(e))
            continue
        _realiad_entries(rep, cat, path, data, image_dir)
        _expect(rep, cat, ("train", "test"), path)


def _realiad_entries(rep: CheckReport, cat: str, path: Path, data: dict, image_dir: Path) -> None:
    normal = str((data.get("meta") or {}).get("normal_class", "OK"))
    listed: set[Path] = set()
    for split in ("train", "test"):
        for i, e in enumerate(data.get(split) or []):
            image = image_dir / e["image_path"]
            mask = image_dir / e["mask_path"] if e.get("mask_path") else None
            listed.update(p for p in (image, mask) if p is not None)
            if not image.is_file():
                rep.add(ERROR, "missing_file", image, f"listed in {path} ({split}[{i}]) but not found")
                continue
            label = int(str(e["anomaly_class"]) != normal)
            if label and (mask is None or not mask.is_file()):
                rep.add(ERROR, "missing_mask", image, f"anomalous view without a mask file ({path}: {split}[{i}])")
            masks = (mask,) if label and mask is not None and mask.is_file() else ()
            rep.entries.append(Entry(cat, split, image, label, str(e["anomaly_class"]) if label else GOOD, masks))
    stems = {p.with_suffix("") for p in listed}
    for p in sorted(p for p in image_dir.rglob("*") if is_image_file(p) and p not in listed):
        image_stem = p.with_name(p.stem.removesuffix("_mask"))
        if p.suffix.lower() == ".png" and image_stem not in stems and not any(
                image_stem.with_suffix(s).is_file() for s in (".jpg", ".JPG", ".jpeg")):
            rep.add(ERROR, "orphan_mask", p, "mask without an image")
        else:
            rep.add(WARNING, "unlisted", p, f"image not listed in {path}: ignored by training and tests")


# --------------------------------------------------------------------------------------------- file checks


@dataclass(frozen=True)
class _FileInfo:
    size: tuple[int, int] | None = None
    digest: str = ""
    error: str = ""
    mask_values: tuple[int, ...] = ()
    too_large: str = ""  # above the pixel cap: not decoded
    narrow_max: int | None = None  # 16-bit image holding only 8-bit values: its maximum


def _inspect(path: Path, is_mask: bool, cap: float) -> _FileInfo:
    """Hash, verify and decode one file; for masks also the distinct pixel values (first 8).

    A file above the pixel cap (``cap`` megapixels) is not decoded: its header says enough.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        return _FileInfo(error=f"cannot read: {e}")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if not data:
        return _FileInfo(error="empty file (0 bytes)", digest=digest)
    try:
        with Image.open(io.BytesIO(data)) as im:
            try:
                check_pixel_count(im.size, path, cap)
            except ImageTooLargeError as e:
                return _FileInfo(im.size, digest, too_large=str(e))
            im.verify()  # structure and checksums
        im = Image.open(io.BytesIO(data))
        size = im.size
        if not is_mask and im.format == "JPEG":
            im.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))  # still reads every byte
        im.load()  # truncated data fails here
        if not is_mask:
            return _FileInfo(size, digest, narrow_max=narrow_range_max(im))
        arr = np.asarray(im.convert("RGB") if im.mode in ("P", "CMYK") else im)
        if arr.ndim == 3 and im.mode in ("RGBA", "LA", "PA"):
            arr = arr[..., :-1]
        values = np.unique(arr)
        return _FileInfo(size, digest, mask_values=tuple(int(v) for v in values[:8]))
    except Exception as e:  # noqa: BLE001  (PIL raises many types on bad data)
        return _FileInfo(error=read_error_text(e), digest=digest)


def _check_files(rep: CheckReport, workers: int, cap: float) -> None:
    images = sorted({e.image for e in rep.entries})
    masks = sorted({m for e in rep.entries for m in e.masks})
    jobs = [(p, False) for p in images] + [(p, True) for p in masks]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = dict(zip(jobs, pool.map(lambda j: _inspect(j[0], j[1], cap), jobs)))
    for (p, is_mask), info in infos.items():
        what = "mask" if is_mask else "image"
        if info.too_large:
            rep.add(ERROR, "too_large", p, f"{what} not decoded: {info.too_large}")
        elif info.narrow_max is not None:
            rep.add(WARNING, "narrow_16bit", p, f"16-bit image whose values only reach {info.narrow_max} "
                    "(8-bit data?): scaled by 1/65535 it loads almost black; save it as 8-bit")
        if info.error:
            rep.add(ERROR, "unreadable", p, f"unreadable or truncated {what}: {info.error}")
        elif is_mask and len([v for v in info.mask_values if v != 0]) > 1:
            rep.add(WARNING, "mask_values", p, f"mask values {list(info.mask_values)}: expected 0 and one positive "
                    "value (every non-zero pixel is read as defect)")
    for e in rep.entries:
        size = infos[(e.image, False)].size
        for m in e.masks:
            msize = infos[(m, True)].size
            if size and msize and size != msize:
                rep.add(ERROR, "mask_size", m, f"mask is {msize[0]}x{msize[1]} but its image {e.image} is "
                        f"{size[0]}x{size[1]} (WxH)")
    _check_duplicates(rep, {p: infos[(p, False)].digest for p in images})


def _check_duplicates(rep: CheckReport, digests: dict[Path, str]) -> None:
    groups: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in rep.entries:
        if digests.get(e.image):
            groups[(e.category, digests[e.image])].append(e)
    for group in groups.values():
        if len(group) < 2:
            continue
        splits = {e.split for e in group}
        names = ", ".join(str(e.image) for e in group[1:])
        if "train" in splits and len(splits) > 1:
            rep.add(ERROR, "duplicate", group[0].image, f"same content in train and {sorted(splits - {'train'})}: "
                    f"{names} (evaluation would score training images)")
        else:
            rep.add(WARNING, "duplicate", group[0].image, f"same content within split {sorted(splits)}: {names}")


def check_dataset(
    path: PathLike,
    format: str = "auto",
    category: str | None = None,
    split_file: str | None = None,
    workers: int | None = None,
    max_megapixels: float | None = None,
) -> CheckReport:
    """Scan a dataset folder and every file in it; see the module docstring for what is reported.

    Args:
        path: a dataset folder or one category folder of it.
        format: ``"auto"`` (:func:`detect_format`) or one of :data:`FORMATS`.
        category: only this category of a multi-category folder.
        split_file: VisA CSV / Real-IAD JSON (or folder) when not at the released place.
        workers: threads reading files (default: CPU count, at least 4).
        max_megapixels: pixel cap (default :func:`kdad.data.transforms.pixel_cap`, the training cap).
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; valid: {['auto', *FORMATS]}")
    rep = CheckReport(root, fmt)
    if fmt == "visa":
        _scan_visa(rep, root, category, split_file)
    elif fmt == "realiad":
        _scan_realiad(rep, root, category, split_file)
    else:
        {"mvtec": _scan_mvtec, "loco": _scan_loco, "btad": _scan_btad, "mvtec_ad2": _scan_mvtec_ad2}[fmt](
            rep, root, category)
    _check_files(rep, workers or max(4, os.cpu_count() or 1), pixel_cap(max_megapixels))
    return rep


# --------------------------------------------------------------------------------------------- before training


def _header(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(W, H) and "" for a readable file, else (None, what is wrong). Reads the header, and for PNG every
    chunk's checksum (verify), without decoding pixels: cheap enough to run on every split before training."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        with Image.open(path) as im:
            size = im.size
            check_pixel_count(size, path)  # the same cap as loading ($KDAD_MAX_MEGAPIXELS or the default)
            im.verify()
        return size, ""
    except ImageTooLargeError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001  (missing file, bomb, truncated PNG, unknown format, ...)
        return None, read_error_text(e)


def check_sample_files(ds: Any, where: str, limit: int = 10, workers: int | None = None) -> None:
    """Raise one :class:`DatasetError` listing the unreadable images and masks of a dataset's samples
    (``ds.samples``, as every kdad dataset has) and the masks whose size differs from their image's.

    ``where`` names the split in the message (e.g. "bottle test"). Datasets without ``samples`` pass.
    """
    samples = getattr(ds, "samples", None) or []
    files = sorted({p for s in samples for p in (s.image_path, s.mask_path, *getattr(s, "channel_paths", ()))
                    if p is not None})
    with ThreadPoolExecutor(max_workers=workers or max(4, os.cpu_count() or 1)) as pool:
        info = dict(zip(files, pool.map(_header, files)))
    problems = [f"{p}: {err}" for p, (_, err) in info.items() if err]
    for s in samples:
        size, msize = info[s.image_path][0], info[s.mask_path][0] if s.mask_path is not None else None
        if size and msize and size != msize:
            problems.append(f"{s.mask_path}: mask is {msize[0]}x{msize[1]} but its image {s.image_path} is "
                            f"{size[0]}x{size[1]} (WxH)")
    if problems:
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise DatasetError(f"{len(problems)} bad file(s) in the {where} split:\n  " + "\n  ".join(problems[:limit])
                           + more + "\n(`kdad data check FOLDER` lists every problem of a dataset folder)")
