import importlib.util

import numpy as np
import pytest
import torch

from kdad.errors import ConfigError
from kdad.synthesis import SynthesisConfig, TextureBank, compute_foreground, synthesize
from kdad.synthesis.foreground import grabcut_foreground, otsu_foreground


def _dark_square_on_white() -> torch.Tensor:
    images = torch.ones(2, 3, 32, 32)
    images[:, :, 8:24, 8:24] = 0.1
    return images


def test_otsu_polarity() -> None:
    images = _dark_square_on_white()
    dark = otsu_foreground(images, "dark")
    assert dark.shape == (2, 1, 32, 32)
    assert dark[:, :, 8:24, 8:24].all() and dark.sum() == 2 * 16 * 16
    assert torch.equal(otsu_foreground(images, "bright"), 1 - dark)
    assert torch.equal(otsu_foreground(images, "auto"), dark)
    assert torch.equal(otsu_foreground(1 - images, "auto"), dark)  # bright object on dark background


def _white_bank() -> TextureBank:
    return TextureBank.from_tensor(torch.ones(1, 3, 32, 32))


def test_foreground_restriction_zeroes_outside() -> None:
    images = _dark_square_on_white()
    cfg = SynthesisConfig(foreground={"capsule": "otsu"}, perlin_threshold=-2.0)  # mask = whole image
    out, masks = synthesize(images, cfg, torch.Generator().manual_seed(0), _white_bank(), "capsule")
    fg = compute_foreground(images, "otsu")
    assert masks.sum() > 0 and (masks * (1 - fg)).sum() == 0
    assert torch.equal(out * (1 - fg), images * (1 - fg))
    # Categories missing from the mapping are unrestricted.
    _, masks_other = synthesize(images, cfg, torch.Generator().manual_seed(0), _white_bank(), "carpet")
    assert masks_other.sum() > masks.sum()


def test_default_foreground_follows_urd_table() -> None:
    cfg = SynthesisConfig()
    assert cfg.foreground_method("screw") == "otsu"
    assert cfg.foreground_method("bottle") == "grabcut"
    assert cfg.foreground_method("carpet") == "none"
    assert cfg.foreground_method(None) == "none"
    assert SynthesisConfig(kind="simplex").foreground_method("bottle") == "none"


def test_default_foreground_covers_urd_visa_table() -> None:
    """URD's train_visa.py restricts anomalies to a GrabCut foreground for all 12 VisA classes."""
    from kdad.synthesis import URD_FOREGROUND, URD_FOREGROUND_MVTEC, URD_FOREGROUND_VISA

    assert not set(URD_FOREGROUND_MVTEC) & set(URD_FOREGROUND_VISA)  # one merged table loses nothing
    assert len(URD_FOREGROUND_VISA) == 12
    assert set(URD_FOREGROUND) == set(URD_FOREGROUND_MVTEC) | set(URD_FOREGROUND_VISA)
    cfg = SynthesisConfig()
    for category in ("candle", "capsules", "pcb1", "pipe_fryum"):
        assert cfg.foreground_method(category) == "grabcut", category
    assert cfg.foreground_method("capsule") == "otsu"  # MVTec's capsule, not VisA's capsules


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="OpenCV installed")
def test_grabcut_without_opencv_says_how_to_install() -> None:
    with pytest.raises(ConfigError, match="pip install opencv-python-headless"):
        grabcut_foreground(torch.rand(1, 3, 16, 16))


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV not installed")
def test_grabcut_finds_central_object() -> None:
    images = torch.full((1, 3, 64, 64), 0.9)
    images[:, 0, 16:48, 16:48] = 0.8
    images[:, 1:, 16:48, 16:48] = 0.1
    fg = grabcut_foreground(images)
    assert fg[0, 0, 24:40, 24:40].mean() > 0.9 and fg[0, 0, :4].mean() < 0.1


def test_per_image_categories() -> None:
    images = _dark_square_on_white()
    cfg = SynthesisConfig(foreground={"capsule": "otsu"}, perlin_threshold=-2.0)
    _, masks = synthesize(images, cfg, torch.Generator().manual_seed(0), _white_bank(), ["capsule", "carpet"])
    assert masks[0].sum() == 16 * 16 and masks[1].sum() == 32 * 32


# ----------------------------------------------------------------------------- mutation-found edge cases
def test_gray_uint8_uses_opencv_weights_and_clamps() -> None:
    from kdad.synthesis.foreground import _gray_uint8

    px = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 0.3], [1.7, 1.2, 3.0],
                       [-0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [-1.0, 1.0, 1.0]]).t().reshape(1, 3, 1, 9)
    gray = _gray_uint8(px)
    # round(255 * w) for pure R, G, B; 0.3 -> 76.5 -> 76 (half to even) -> 76; above 1 and below 0 clamp
    assert gray.dtype == np.uint8 and gray.shape == (1, 1, 9)
    assert gray[0, 0].tolist() == [76, 150, 29, 76, 255, 0, 0, 76, 179]  # each channel clamped before mixing
    assert _gray_uint8(torch.full((1, 3, 1, 1), 0.8)).item() == 204  # 0.8 * 255


def test_border_fraction_counts_each_border_pixel_once() -> None:
    from kdad.synthesis.foreground import _border_fraction

    rng = np.random.default_rng(0)
    for h, w in ((7, 9), (5, 4), (6, 6)):
        mask = rng.random((h, w)) < 0.5
        ring = np.zeros((h, w), bool)
        ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
        assert _border_fraction(mask) == pytest.approx(mask[ring].mean())
    one_side = np.zeros((5, 6), bool)
    for side in (np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1]):
        m = one_side.copy()
        m[side] = True
        assert _border_fraction(m) == pytest.approx(m.shape[0 if side in (np.s_[:, 0], np.s_[:, -1]) else 1] / 18)


def test_otsu_defaults_to_dark_keeps_dark_at_a_half_border_and_names_bad_polarity() -> None:
    images = _dark_square_on_white()
    assert torch.equal(otsu_foreground(images), otsu_foreground(images, "dark"))
    half = torch.ones(1, 3, 8, 8)
    half[:, :, :, :4] = 0.1  # left half dark: exactly half of the border is dark
    assert torch.equal(otsu_foreground(half, "auto"), otsu_foreground(half, "dark"))
    with pytest.raises(ConfigError, match=r"otsu_polarity='light' is not valid; choose one of \('dark'"):
        otsu_foreground(images, "light")


def test_otsu_on_a_constant_image_keeps_everything() -> None:
    assert otsu_foreground(torch.full((1, 3, 4, 5), 0.4), "dark").sum() == 20


def test_compute_foreground_dispatches_and_names_bad_method(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdad.synthesis import foreground

    images = _dark_square_on_white()
    assert compute_foreground(images, "none") is None
    assert torch.equal(compute_foreground(images, "otsu", "bright"), otsu_foreground(images, "bright"))
    seen = []
    monkeypatch.setattr(foreground, "grabcut_foreground", lambda im, it: seen.append((im, it)) or im[:, :1])
    out = compute_foreground(images, "grabcut", grabcut_iterations=3)
    assert out is not None and seen[0][0] is images and seen[0][1] == 3
    compute_foreground(images, "grabcut")
    assert seen[1][1] == 11  # URD's iterations
    with pytest.raises(ConfigError, match=r"foreground method 'sam' is not valid; choose one of \('none'"):
        compute_foreground(images, "sam")


def test_missing_opencv_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kdad.synthesis.foreground import _import_cv2

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(ConfigError) as err:
        _import_cv2()
    assert str(err.value) == ("foreground method 'grabcut' needs OpenCV, which is not installed; run `pip install "
                              "opencv-python-headless`, or choose foreground 'otsu' or 'none'")


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV not installed")
def test_grabcut_is_urds_call_per_image() -> None:
    """URD's recipe: BGR uint8, rect (1, 1, w-1, h-1), 11 iterations, init with rect, OpenCV RNG seed 0."""
    import cv2

    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 40, 48, generator=g), 3, 1, 1)
    images[:, 0, 10:30, 12:30] += 0.3  # smooth noise with a reddish and a yellowish patch: the labels near the
    images[:, 2, 5:25, 20:44] -= 0.3  # border depend on the rectangle's exact corners
    got = grabcut_foreground(images)
    assert got.shape == (2, 1, 40, 48) and got.dtype == torch.float32
    for i in range(2):
        rgb = (images[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        labels = np.zeros((40, 48), np.uint8)
        cv2.setRNGSeed(0)
        cv2.grabCut(bgr, labels, (1, 1, 47, 39), np.zeros((1, 65)), np.zeros((1, 65)), 11, cv2.GC_INIT_WITH_RECT)
        want = torch.from_numpy((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).float()
        assert torch.equal(got[i, 0], want)


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV not installed")
def test_grabcut_clamps_values_outside_0_1_before_the_uint8_cast() -> None:
    # Out-of-range pixels (e.g. after a colour jitter) must act as 0 and 1, not wrap around in the uint8 cast.
    g = torch.Generator().manual_seed(3)
    images = torch.full((1, 3, 48, 48), 0.9) + 0.3 * torch.rand(1, 3, 48, 48, generator=g)  # up to 1.2
    images[:, :, 12:36, 12:36] = -0.4 + 0.3 * torch.rand(1, 3, 24, 24, generator=g)  # down to -0.4
    fg = grabcut_foreground(images)
    assert torch.equal(fg, grabcut_foreground(images.clamp(0, 1)))
    assert fg[0, 0, 18:30, 18:30].mean() > 0.9 and fg[0, 0, :3].mean() < 0.1
