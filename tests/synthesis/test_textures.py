import re
from pathlib import Path

import numpy as np
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


# ----------------------------------------------------------------------------- mutation-found edge cases
def test_rotate_turns_counter_clockwise_about_the_centre_with_zero_fill() -> None:
    from kdad.synthesis.textures import _rotate

    x = torch.arange(32.0).view(2, 1, 4, 4)
    assert torch.allclose(_rotate(x, torch.tensor([90.0, 0.0])), torch.stack([torch.rot90(x[0], 1, (1, 2)), x[1]]),
                          atol=1e-5)
    ones = _rotate(torch.ones(1, 1, 6, 6), torch.tensor([45.0]))[0, 0]
    corner = [0.0, 0.67, 1.0, 1.0, 0.67, 0.0]  # pixel centres (align_corners=False), zeros outside
    assert torch.allclose(ones[0], torch.tensor(corner), atol=0.01)
    assert torch.allclose(ones[:, 0], torch.tensor(corner), atol=0.01)
    assert torch.equal(ones[2:4, 2:4], torch.ones(2, 2))
    rect = torch.zeros(1, 1, 5, 5)
    rect[0, 0, 1, 1:4] = 1.0  # a bar above the centre turns to its left
    assert torch.allclose(_rotate(rect, torch.tensor([90.0]))[0, 0, 1:4, 1], torch.ones(3), atol=1e-5)


def augment_reference(tex: torch.Tensor, seed: int, n_ops: int) -> torch.Tensor:
    """DRAEM's ops (docstring of augment_textures) one image at a time, with the same draws."""
    from kdad.synthesis.textures import _rotate

    g = torch.Generator().manual_seed(seed)
    b = tex.shape[0]
    chosen = torch.rand(b, 7, generator=g).argsort(dim=1)[:, :n_ops]
    u = torch.rand(b, 8, generator=g)
    gamma = 0.5 * 4.0 ** torch.rand(b, 3, generator=g)
    out = []
    for i in range(b):
        ops = set(chosen[i].tolist())
        x = tex[i].clone()
        if 0 in ops:
            x = x ** gamma[i].view(3, 1, 1)
        if 1 in ops:
            x = (x * (0.8 + 0.4 * u[i, 0]) + (60 * u[i, 1] - 30) / 255).clamp(0, 1)
        if 2 in ops and u[i, 3] < 0.5:
            thr = (32 + 96 * u[i, 2]) / 255
            x = torch.where(x >= thr, 1 - x, x)
        if 3 in ops:
            bits = min(int(u[i, 4] * 8) + 1, 8)
            step = 256 / 2**bits
            x = torch.floor(x * 255 / step) * step / 255
        if 4 in ops:
            x = 1 - x
        if 5 in ops:
            lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
            x = torch.where(hi > lo, (x - lo) / (hi - lo), x)
        if 6 in ops:
            x = _rotate(x[None], (90 * u[i, 5] - 45).view(1))[0]
        out.append(x.clamp(0, 1))
    return torch.stack(out)


def test_augment_textures_matches_a_per_image_reference() -> None:
    g = torch.Generator().manual_seed(4)
    tex = 0.1 + 0.7 * torch.rand(24, 3, 6, 7, generator=g)
    tex[:, 1] *= 0.5  # channels with different ranges: per-channel gamma and autocontrast show
    for n_ops in (1, 3, 7):
        got = augment_textures(tex, torch.Generator().manual_seed(9), n_ops)
        assert torch.allclose(got, augment_reference(tex, 9, n_ops), atol=1e-5), n_ops
    assert torch.equal(augment_textures(tex, torch.Generator().manual_seed(9)),
                       augment_textures(tex, torch.Generator().manual_seed(9), 3))  # DRAEM's 3 ops by default
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert torch.equal(augment_textures(flat, torch.Generator().manual_seed(0), 0), flat)  # no op: unchanged


def test_blend_uses_the_texture_not_its_inverse() -> None:
    images, textures = torch.full((2, 3, 1, 1), 0.2), torch.full((2, 3, 1, 1), 0.5)
    out = blend(images, textures, torch.ones(2, 1, 1, 1), torch.tensor([0.25, 1.0]))
    assert torch.allclose(out.flatten(1)[:, 0], torch.tensor([0.75 * 0.2 + 0.25 * 0.5, 0.5]))


def test_texture_bank_size_resize_and_folder(tmp_path: Path) -> None:
    _write_images(tmp_path)
    bank = TextureBank(tmp_path, (8, 12))
    assert bank.images.shape == (2, 3, 8, 12) and bank.size == (8, 12) and bank.folder == tmp_path
    assert bank.paths == [tmp_path / "banded" / "a.jpg", tmp_path / "dotted" / "deep" / "b.png"]
    gray = tmp_path / "gray"
    gray.mkdir()
    img = Image.linear_gradient("L").resize((30, 20))  # one channel: converted to RGB, then bilinear
    img.save(gray / "g.png")
    want = np.asarray(img.convert("RGB").resize((12, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(TextureBank(gray, (8, 12)).images[0].permute(1, 2, 0).numpy(), want)


def test_texture_bank_messages(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"holds no images \(looked recursively for \.jpg, \.jpeg, \.png"):
        TextureBank(empty, 16)
    (empty / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DatasetError, match="broken.png"):
        TextureBank(empty, 16)
    (empty / "broken.png").unlink()
    Image.effect_noise((64, 64), 50).save(empty / "cut.png")
    (empty / "cut.png").write_bytes((empty / "cut.png").read_bytes()[:600])  # the header reads, the pixels do not
    with pytest.raises(DatasetError, match=rf"cannot read texture image {re.escape(repr(str(empty / 'cut.png')))}: "):
        TextureBank(empty, 16)


def test_texture_bank_from_tensor_and_sample() -> None:
    floats = torch.tensor([-0.2, 1.3, 0.5, 0.2]).view(1, 1, 2, 2).expand(3, 3, 2, 2)
    floats = torch.cat([floats, floats.flip(-1)], dim=-1)[:2]  # (2, 3, 2, 4): non-square, N != C
    bank = TextureBank.from_tensor(floats)
    assert bank.images.dtype == torch.uint8 and bank.images[0, 0].tolist() == [[0, 255, 255, 0], [128, 51, 51, 128]]
    assert bank.size == (2, 4) and bank.folder is None and len(bank.paths) == len(bank) == 2
    same = bank.sample(2, torch.Generator().manual_seed(0))
    assert torch.equal(same, bank.images[:2].float() / 255)  # every texture is the same here
    assert torch.equal(bank.sample(2, torch.Generator().manual_seed(0), (2, 4)), same)  # no resize at the bank size
    small = bank.sample(1, torch.Generator(), (1, 2))
    want = torch.nn.functional.interpolate(same[:1], size=(1, 2), mode="bilinear", antialias=True)
    assert torch.allclose(small, want.clamp(0, 1)) and small.min() >= 0 and small.max() <= 1
    for bad in (torch.rand(3, 4, 4), torch.rand(2, 1, 4, 4), torch.rand(0, 3, 4, 4)):
        with pytest.raises(DatasetError, match=re.escape(f"N >= 1, got {tuple(bad.shape)}")):
            TextureBank.from_tensor(bad)
