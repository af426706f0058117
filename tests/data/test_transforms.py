"""Image/mask loading: modes, sizes, ranges, binarisation and errors naming the file."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.data.transforms import (
    MAX_MEGAPIXELS_ENV,
    ImageTooLargeError,
    NarrowRangeWarning,
    images_to_batch,
    list_images,
    load_image,
    load_image_and_mask,
    load_mask,
)
from kdad.errors import ConfigError, DatasetError
from tests.fakes import forged_png


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(path)
    return path


def _rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_shape_dtype_range_and_size(tmp_path: Path) -> None:
    p = _save(tmp_path / "a.png", _rgb())
    x = load_image(p, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert load_image(p, (20, 30)).shape == (3, 20, 30)  # (H, W)


def test_same_size_keeps_pixels_exactly(tmp_path: Path) -> None:
    arr = _rgb()
    x = load_image(_save(tmp_path / "a.png", arr), (12, 10))
    assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_resize_matches_torchvision_resize_on_pil(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision.transforms")
    p = _save(tmp_path / "a.png", _rgb(90, 70))
    expected = tv.Compose([tv.Resize((32, 40)), tv.ToTensor()])(Image.open(p).convert("RGB"))
    assert torch.allclose(load_image(p, (32, 40)), expected, atol=1e-6)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    p = _save(tmp_path / "g.png", np.full((8, 8), 128, np.uint8))
    x = load_image(p, 8)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 128 / 255))


def test_rgba_alpha_is_dropped(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., :3] = (200, 100, 50)  # fully transparent, colour must be kept as stored
    x = load_image(_save(tmp_path / "a.png", arr), 4)
    assert torch.allclose(x[:, 0, 0], torch.tensor([200, 100, 50]) / 255)


def test_palette_la_and_cmyk_images(tmp_path: Path) -> None:
    arr = _rgb(8, 8)
    for name, mode in [("p.png", "P"), ("la.png", "LA"), ("c.tif", "CMYK"), ("b.bmp", "1")]:
        x = load_image(_save(tmp_path / name, arr, mode), 8)
        assert x.shape == (3, 8, 8) and 0 <= x.min() and x.max() <= 1, name


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 16384], [32768, 65535]], np.uint16)
    p = tmp_path / "d.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    x = load_image(p, 2)
    assert torch.allclose(x[0], torch.from_numpy(arr.astype(np.float32) / 65535), atol=1e-6)
    assert torch.equal(x[0], x[2])


def test_16bit_holding_8bit_values_warns(tmp_path: Path) -> None:
    narrow = _save(tmp_path / "narrow.png", np.array([[0, 17], [128, 255]], np.uint16))
    with pytest.warns(NarrowRangeWarning, match="narrow.png.*only reach 255"):
        load_image(narrow, 2)
    full = _save(tmp_path / "full.png", np.array([[0, 300], [9000, 65535]], np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real 16-bit data loads silently
        load_image(full, 2)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; we refuse
def test_image_above_the_pixel_cap_is_refused_from_its_header(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = forged_png(tmp_path / "bomb.png", 13000, 13000)  # 169 MP, under PIL's own 179 MP limit
    assert bomb.stat().st_size < 1000
    with pytest.raises(ImageTooLargeError, match=r"bomb.png is 13000x13000 = 169.0 megapixels, above the 50 MP"):
        load_image(bomb, 8)
    mask = _save(tmp_path / "mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageTooLargeError, match="bomb.png"):  # the dataset loaders' path too
        load_image_and_mask(bomb, mask, 8)
    small = _save(tmp_path / "small.png", _rgb(40, 40))  # 1600 px
    assert load_image(small, 8, max_megapixels=0.002).shape == (3, 8, 8)
    with pytest.raises(ImageTooLargeError, match="0.001 MP"):
        load_image(small, 8, max_megapixels=0.001)
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "0.001")  # the cap for entry points without an option (training)
    with pytest.raises(ImageTooLargeError, match=MAX_MEGAPIXELS_ENV):
        load_image(small, 8)
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=MAX_MEGAPIXELS_ENV):
        load_image(small, 8)


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_corrupt_or_truncated_file_names_the_file(tmp_path: Path, content: bytes | str) -> None:
    good = _save(tmp_path / "ok.png", _rgb(64, 64))
    bad = tmp_path / "broken_image.png"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content == "truncated" else content)
    with pytest.raises(DatasetError, match="broken_image.png"):
        load_image(bad, 8)
    with pytest.raises(DatasetError, match="broken_image.png"):
        load_mask(bad, 8)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.png"):
        load_image(tmp_path / "nope.png", 8)


def test_mask_nonzero_is_defect_and_values_are_binary(tmp_path: Path) -> None:
    arr = np.zeros((6, 6), np.uint8)
    arr[2, 3] = 1  # any non-zero value is defect
    m = load_mask(_save(tmp_path / "m.png", arr), 6)
    assert m.shape == (1, 6, 6) and m.dtype == torch.float32
    assert m.sum() == 1 and m[0, 2, 3] == 1


def test_mask_binarised_at_half_after_resize(tmp_path: Path) -> None:
    arr = np.zeros((16, 16), np.uint8)
    arr[4:12, 4:12] = 255  # a block aligned with the 2x reduction survives exactly
    arr[0, :] = 255  # a 1-px line covers < 50 % of any output pixel and vanishes
    m = load_mask(_save(tmp_path / "m.png", arr), 8)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    expected = torch.zeros(8, 8)
    expected[2:6, 2:6] = 1
    assert torch.equal(m[0], expected)


def test_colour_mask_counts_any_channel(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[1, 1] = (0, 0, 1)
    assert load_mask(_save(tmp_path / "m.png", arr), 4).sum() == 1


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    img = _save(tmp_path / "img_007.png", _rgb(12, 10))
    mask = _save(tmp_path / "img_007_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match="img_007_mask.png.*img_007.png"):
        load_mask(mask, 8, image_path=img)
    with pytest.raises(DatasetError, match="img_007_mask.png.*img_007.png"):
        load_image_and_mask(img, mask, 8)


def test_image_and_mask_without_mask_gives_zeros(tmp_path: Path) -> None:
    img, mask = load_image_and_mask(_save(tmp_path / "a.png", _rgb()), None, (6, 5))
    assert img.shape == (3, 6, 5) and mask.shape == (1, 6, 5) and mask.sum() == 0


def test_images_to_batch(tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"{i}.png", _rgb(seed=i)) for i in range(3)]
    batch = images_to_batch(paths, 8)
    assert batch.shape == (3, 3, 8, 8)
    assert torch.equal(batch[1], load_image(paths[1], 8))
    assert images_to_batch([], 8).shape == (0, 3, 8, 8)


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpeg", "c.Tif", ".hidden.png", "notes.txt", "d.bmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpeg", "b.PNG", "c.Tif", "d.bmp"]
    assert list_images(tmp_path / "missing") == []
