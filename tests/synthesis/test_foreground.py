import importlib.util

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
