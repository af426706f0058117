"""Generated stand-ins for the datasets kdad reads, in their released layouts (shared by the data, method and
deploy tests; tiny images, so building one takes milliseconds)."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 96, 64  # VisA images are landscape JPEGs (about 1.5k px; small here)
BTAD_SIZE = (64, 64)
AD2_SIZE = (80, 60)
REALIAD_SIZE = (64, 64)
REALIAD_VIEWS = ["C1", "C2", "C3", "C4", "C5"]
REALIAD_STAMP = "20231021130905"


def forged_png(path: Path, width: int, height: int) -> Path:
    """A tiny 8x8 16-bit gray PNG whose header claims width x height: a decompression bomb in a few hundred
    bytes, so a test never allocates the pixels it declares (decoding it would fail on the missing data)."""
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def part_image(path: Path, seed: int, defect: bool = False, size: tuple[int, int] = (W, H)) -> None:
    """A smooth part on a dark background with sensor noise; a bright blob when ``defect``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    part = ((xx - w / 2) ** 2 / (w / 3) ** 2 + (yy - h / 2) ** 2 / (h / 3) ** 2) < 1
    arr = np.stack([30 + 150 * part + 20 * xx / w, 30 + 120 * part, 40 + 90 * part + 30 * yy / h], axis=2)
    arr = arr + rng.normal(0, 4, arr.shape)
    if defect:
        arr[h // 3:h // 2, w // 3:w // 2] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)


def defect_mask(path: Path, value: int = 255, size: tuple[int, int] = (W, H)) -> None:
    """The blob of :func:`part_image` as a mask with one positive ``value``."""
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    arr[h // 3:h // 2, w // 3:w // 2] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_visa(root: Path) -> Path:
    """Two categories; candle: 3 train normals, test = 1 normal + 2 anomalies (mask values 255 and 1)."""
    rows = [("object", "split", "label", "image", "mask")]
    for k, cat in enumerate(["candle", "pcb1"]):
        imgs = root / cat / "Data" / "Images"
        for i in range(4):
            part_image(imgs / "Normal" / f"{i:04d}.JPG", seed=10 * k + i)
            rows.append((cat, "train" if i < 3 else "test", "normal", f"{cat}/Data/Images/Normal/{i:04d}.JPG", ""))
        for i, value in enumerate([255, 1]):
            part_image(imgs / "Anomaly" / f"{i:03d}.JPG", seed=100 + i, defect=True)
            defect_mask(root / cat / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", value)
            rows.append((cat, "test", "anomaly", f"{cat}/Data/Images/Anomaly/{i:03d}.JPG",
                         f"{cat}/Data/Masks/Anomaly/{i:03d}.png"))
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def make_btad(root: Path) -> Path:
    """Product 01 with .bmp images and .png masks, product 03 with .png images and .bmp masks."""
    for product, ext, mask_ext in [("01", "bmp", "png"), ("03", "png", "bmp")]:
        p = root / product
        for i in range(3):
            part_image(p / "train" / "ok" / f"{i:04d}.{ext}", seed=i, size=BTAD_SIZE)
        part_image(p / "test" / "ok" / f"0000.{ext}", seed=7, size=BTAD_SIZE)
        for i in range(2):
            part_image(p / "test" / "ko" / f"{i:04d}.{ext}", seed=20 + i, defect=True, size=BTAD_SIZE)
            defect_mask(p / "ground_truth" / "ko" / f"{i:04d}.{mask_ext}", size=BTAD_SIZE)
    return root


def make_mvtec_ad2(root: Path) -> Path:
    """Category ``can``: 3 train, 2 validation, test_public 1 good + 2 bad, and private test images."""
    c = root / "can"
    for i in range(3):
        part_image(c / "train" / "good" / f"{i:03d}_regular.png", seed=i, size=AD2_SIZE)
    for i in range(2):
        part_image(c / "validation" / "good" / f"{i:03d}_regular.png", seed=10 + i, size=AD2_SIZE)
    part_image(c / "test_public" / "good" / "000_regular.png", seed=20, size=AD2_SIZE)
    for i in range(2):
        part_image(c / "test_public" / "bad" / f"{i:03d}_regular.png", seed=30 + i, defect=True, size=AD2_SIZE)
        defect_mask(c / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", size=AD2_SIZE)
    part_image(c / "test_private" / "000_regular.png", seed=40, size=AD2_SIZE)
    part_image(c / "test_private_mixed" / "000_overexposed.png", seed=41, size=AD2_SIZE)
    return root


def _realiad_view(root: Path, rel: str, seed: int, defect: bool = False) -> None:
    part_image(root / "realiad_256" / "audiojack" / rel, seed=seed, defect=defect, size=REALIAD_SIZE)


def _realiad_entry(anomaly_class: str, image: str, mask: str | None) -> dict:
    return {"category": "audiojack", "anomaly_class": anomaly_class, "image_path": image, "mask_path": mask}


def make_realiad(root: Path) -> Path:
    """audiojack: train = OK samples 0001, 0003; test = OK sample 0004 and NG (QS) sample 0002 whose
    defect shows in views C1 and C3 only (the other views are labelled OK, without masks)."""
    train, test = [], []
    for sid, entries in [("0001", train), ("0003", train), ("0004", test)]:
        for v in REALIAD_VIEWS:
            rel = f"OK/S{sid}/audiojack_{sid}_OK_{v}_{REALIAD_STAMP}.jpg"
            _realiad_view(root, rel, seed=int(sid) * 10 + int(v[1]))
            entries.append(_realiad_entry("OK", rel, None))
    for v in REALIAD_VIEWS:
        rel = f"NG/QS/S0002/audiojack_0002_NG_QS_{v}_{REALIAD_STAMP}.jpg"
        visible = v in ("C1", "C3")
        _realiad_view(root, rel, seed=50 + int(v[1]), defect=visible)
        if visible:
            defect_mask(root / "realiad_256" / "audiojack" / rel.replace(".jpg", ".png"), size=REALIAD_SIZE)
        test.append(_realiad_entry("QS" if visible else "OK", rel, rel.replace(".jpg", ".png") if visible else None))
    doc = {"meta": {"prefix": "audiojack", "normal_class": "OK"}, "train": train, "test": test}
    jdir = root / "realiad_jsons" / "realiad_jsons"
    jdir.mkdir(parents=True, exist_ok=True)
    (jdir / "audiojack.json").write_text(json.dumps(doc))
    return root


def solid_image(path: Path, wh: tuple[int, int], value: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((wh[1], wh[0], 3), value, np.uint8)).save(path)


def box_mask(path: Path, wh: tuple[int, int], boxes: list[tuple[int, int, int, int]], rgb: bool = False) -> None:
    """Mask with one filled box per (x0, y0, x1, y1); rgb=True stores it with 3 channels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((wh[1], wh[0]), np.uint8)
    for x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = 255
    Image.fromarray(np.repeat(arr[..., None], 3, axis=2) if rgb else arr).save(path)


def make_threecad(root: Path) -> Path:
    """Two categories in the 3CAD release layout, at real 3CAD sizes (288-1024 px, non-square)."""
    acc = root / "Aluminum_Camera_Cover"  # sizes vary per image in this category
    for i, wh in enumerate([(288, 320), (400, 288), (1024, 960)]):
        solid_image(acc / "train" / "good" / f"{i:04d}.png", wh)
    solid_image(acc / "train" / "good" / "0099.jpg", (288, 288))  # not PNG: ignored, as the official loader
    (acc / "train" / "good" / "Thumbs.db").write_bytes(b"\0")
    solid_image(acc / "test" / "good" / "0000.png", (300, 288))
    # several regions (up to 23 in 3CAD) in one image, and a 3-channel mask
    solid_image(acc / "test" / "scratch" / "0000.png", (288, 320), 60)
    box_mask(acc / "ground_truth" / "scratch" / "0000.png", (288, 320), [(10, 10, 80, 80), (150, 200, 260, 300)])
    solid_image(acc / "test" / "bump" / "0001.png", (320, 288), 60)
    box_mask(acc / "ground_truth" / "bump" / "0001.png", (320, 288), [(100, 100, 200, 200)], rgb=True)
    # a tiny defect: vanishes at 32 px, but the image stays defective (label from the folder)
    solid_image(acc / "test" / "bump" / "0002.png", (320, 288), 60)
    box_mask(acc / "ground_truth" / "bump" / "0002.png", (320, 288), [(5, 5, 7, 7)])
    cs = root / "Copper_Stator"  # CS and IS are 1024 x 1024
    solid_image(cs / "train" / "good" / "0000.png", (1024, 1024))
    solid_image(cs / "train" / "good" / "0001.png", (1024, 1024))
    solid_image(cs / "test" / "good" / "0000.png", (1024, 1024))
    solid_image(cs / "test" / "iron_core_airflow" / "0000.png", (1024, 1024), 30)
    box_mask(cs / "ground_truth" / "iron_core_airflow" / "0000.png", (1024, 1024), [(0, 0, 512, 512)])
    return root


def blob_map(size: int, hot: int) -> np.ndarray:
    """A (size, size) anomaly map with a 4-px region at [2:4, 2:4] and a single hot pixel at (hot, hot): what a
    defect mask with a minimum area of 4 keeps and drops."""
    amap = np.zeros((size, size), np.float32)
    amap[2:4, 2:4] = 1.0
    amap[hot, hot] = 1.0
    return amap


# a tiny, fast run on generated parts (64 px, random-weight resnet18): for the calibrate and feedback tests
TINY_RUN = ["model.backbone=resnet18", "model.weights=random", "data.image_size=64", "train.batch_size=4",
            "train.progress=false", "train.eval_batch_size=8", "train.amp=false"]


def tiny_run(root: Path, preset: str, n_train: int, n_test: int, overrides: list[str]) -> Path:
    """Fit `preset` on a generated object dataset of `n_train` good and `n_test` good + `n_test` defective
    test images at 64 px, with TINY_RUN plus `overrides`; returns the run folder root/run."""
    from kdad.config import load_config
    from kdad.data.demo import make_demo_dataset
    from kdad.train import fit

    demo = make_demo_dataset(root / "d", n_train=n_train, n_test_good=n_test, n_test_bad=n_test, size=64,
                             kind="object")
    return fit(load_config(preset, [], [f"data.root={demo}", *TINY_RUN, *overrides]), root / "run")


class FakeRunner:
    """The runner interface (kdad.deploy.runner.Runner) over a stand-in detector: an nn.Module whose forward
    returns an AnomalyOutput. For the runner views (tiling, alignment) without a trained model."""

    image_threshold, pixel_threshold, vmin, vmax = 0.5, 0.4, 0.0, 1.0

    def __init__(self, detector: object, image_size: int = 128) -> None:
        self.detector, self.image_size = detector, image_size

    def __call__(self, images01: object) -> tuple[np.ndarray, np.ndarray]:
        out = self.detector(images01)  # type: ignore[operator]
        return out.anomaly_map[:, 0].numpy(), out.score.numpy()

    def info(self) -> dict:
        return {"method": "fake"}
