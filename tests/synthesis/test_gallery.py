import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.synthesis import SynthesisConfig, TextureBank
from kdad.synthesis.gallery import save_gallery


def test_save_gallery_writes_png_atomically(tmp_path: Path) -> None:
    images = torch.rand(5, 3, 32, 32)
    out = save_gallery(images, SynthesisConfig(kind="cutpaste"), tmp_path / "sub" / "g.png", n=4, seed=1)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 4 * 32 and img.height > 3 * 32
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.png"]  # no temp file left


def test_save_gallery_perlin_from_texture_dir(tmp_path: Path) -> None:
    tex = tmp_path / "tex" / "cat"
    tex.mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tex / "t.jpg")
    cfg = SynthesisConfig(texture_dir=str(tmp_path / "tex"))
    out = save_gallery(torch.rand(2, 3, 32, 32), cfg, tmp_path / "g.png")
    assert out.exists()


# ----------------------------------------------------------------------------- layout and arguments, exactly
def test_render_gallery_layout_pixel_by_pixel() -> None:
    from PIL import ImageDraw

    from kdad.synthesis.gallery import render_gallery

    g = torch.Generator().manual_seed(0)
    h, w, n, pad, label = 21, 5, 3, 2, 72
    originals, synthetic = torch.rand(n, 3, h, w, generator=g), torch.rand(n, 3, h, w, generator=g)
    masks = (torch.rand(n, 1, h, w, generator=g) > 0.5).float()
    img = render_gallery(originals, synthetic, masks)
    assert img.mode == "RGB" and img.size == (label + n * (w + pad) + pad, 3 * (h + pad) + pad)
    arr = np.asarray(img)
    want = np.full_like(arr, 255)
    for row, batch in enumerate((originals, synthetic, masks.expand(-1, 3, -1, -1))):
        top = pad + row * (h + pad)
        for col in range(n):
            left = label + pad + col * (w + pad)
            want[top:top + h, left:left + w] = (batch[col] * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(arr[:, label:], want[:, label:])  # tiles on white, 2 px apart
    labels = Image.new("RGB", img.size, (255, 255, 255))
    draw = ImageDraw.Draw(labels)
    for row, text in enumerate(("original", "synthetic", "mask")):
        draw.text((4, pad + row * (h + pad) + h // 2 - 5), text, fill=(0, 0, 0))
    assert np.array_equal(arr[:, :label], np.asarray(labels)[:, :label])  # black labels, vertically centred
    assert (arr[:, :label] < 100).all(axis=2).sum() > 20  # the text is there


def test_to_pil_clamps_and_expands_a_mask() -> None:
    from kdad.synthesis.gallery import _to_pil

    img = _to_pil(torch.tensor([[[1.0, 0.3, -0.2, 1.5]]]))
    assert img.mode == "RGB" and img.size == (4, 1)
    assert np.asarray(img).tolist() == [[[255] * 3, [76] * 3, [0] * 3, [255] * 3]]


def test_save_gallery_defaults_seed_category_and_nested_folder(tmp_path: Path) -> None:
    from kdad.synthesis import synthesize
    from kdad.synthesis.gallery import render_gallery

    images = torch.rand(10, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    images[:, :, 4:12, 6:18] = 0.05  # a dark object: otsu restricts the masks for "capsule"
    cfg = SynthesisConfig(kind="cutpaste", foreground={"capsule": "otsu"})
    out = save_gallery(images.double(), cfg, tmp_path / "a" / "b" / "g.png", category="capsule")
    synthetic, masks = synthesize(images[:8], cfg, torch.Generator().manual_seed(0), None, "capsule")
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(render_gallery(images[:8], synthetic, masks)))
    assert masks.sum() > 0


def test_save_gallery_rejects_bad_batches_and_a_missing_texture_dir(tmp_path: Path) -> None:
    from kdad.errors import ConfigError

    for bad in (torch.rand(3, 16, 16), torch.rand(0, 3, 16, 16)):
        with pytest.raises(ConfigError, match=rf"B >= 1, got {re.escape(str(tuple(bad.shape)))}"):
            save_gallery(bad, SynthesisConfig(kind="cutpaste"), tmp_path / "g.png")
    save_gallery(torch.rand(1, 3, 16, 16), SynthesisConfig(kind="cutpaste"), tmp_path / "one.png")
    with pytest.raises(ConfigError) as err:
        save_gallery(torch.rand(2, 3, 16, 16), SynthesisConfig(), tmp_path / "g.png")
    assert str(err.value) == "synthesis.texture_dir must be set to show kind 'perlin_texture' (or pass textures=)"


def test_save_gallery_textures_sized_like_a_non_square_image(tmp_path: Path) -> None:
    tex = tmp_path / "tex" / "cat"
    tex.mkdir(parents=True)
    Image.linear_gradient("L").rotate(45).resize((40, 30)).convert("RGB").save(tex / "t.png")  # varies along x and y
    cfg = SynthesisConfig(texture_dir=str(tmp_path / "tex"), perlin_threshold=-2.0, beta_range=(1.0, 1.0),
                          foreground="none")
    out = save_gallery(torch.zeros(2, 3, 16, 24), cfg, tmp_path / "g.png")
    with Image.open(out) as img:
        tile = np.asarray(img)[2 + 16 + 2: 2 + 16 + 2 + 16, 72 + 2: 72 + 2 + 24]
    bank = TextureBank(tmp_path / "tex", (16, 24))  # loaded at the image size: no second resize
    want = (bank.images[0].permute(1, 2, 0).float() / 255 * 255).round().byte().numpy()
    assert np.array_equal(tile, want)  # the whole synthetic tile is the texture


def test_save_gallery_leaves_no_temp_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_gallery(torch.rand(2, 3, 16, 16), SynthesisConfig(kind="cutpaste"), tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []
