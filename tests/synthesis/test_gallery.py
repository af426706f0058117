from pathlib import Path

import torch
from PIL import Image

from kdad.synthesis import SynthesisConfig
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
