from pathlib import Path

import pytest
import torch
from PIL import Image

from kdad.errors import DatasetError
from kdad.synthesis import TextureBank, augment_textures, blend


def test_blend_formula_hand_checked() -> None:
    # I = 0.2, T = 1, M = 1, beta = 0.5 -> (1 - 0.5) * 0.2 + 0.5 * 1 = 0.6; outside the mask: I.
    images = torch.full((1, 3, 2, 2), 0.2)
    textures = torch.ones(1, 3, 2, 2)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = blend(images, textures, masks, 0.5)
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), 0.6))
    assert torch.allclose(out[0, :, 0, 1], torch.full((3,), 0.2))
    out = blend(images, textures, masks, torch.tensor([1.0]))
    assert torch.allclose(out[0, :, 1, 1], torch.ones(3))


def _write_images(folder: Path) -> None:
    (folder / "banded").mkdir(parents=True)
    (folder / "dotted" / "deep").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "banded" / "a.jpg")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / "dotted" / "deep" / "b.png")
    (folder / "notes.txt").write_text("not an image")


def test_texture_bank_loads_recursively(tmp_path: Path) -> None:
    _write_images(tmp_path)
    bank = TextureBank(tmp_path, 16)
    assert len(bank) == 2 and bank.images.shape == (2, 3, 16, 16) and bank.images.dtype == torch.uint8
    tex = bank.sample(5, torch.Generator().manual_seed(0), (8, 12))
    assert tex.shape == (5, 3, 8, 12) and tex.min() >= 0 and tex.max() <= 1


def test_texture_bank_errors_name_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="nope"):
        TextureBank(missing, 16)
    empty = tmp_path / "empty_textures"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty_textures"):
        TextureBank(empty, 16)


def test_augment_textures_range_and_determinism() -> None:
    tex = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = augment_textures(tex, torch.Generator().manual_seed(1))
    b = augment_textures(tex, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, tex)
