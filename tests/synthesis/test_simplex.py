import torch

from kdad.synthesis import SynthesisConfig, fractal_simplex_3d, simplex_noise_3d, simplex_patches, synthesize
from kdad.synthesis.simplex import make_permutation


def test_simplex_noise_range_and_continuity() -> None:
    perm = make_permutation(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y, z = (torch.rand(20000, generator=g) * 40 for _ in range(3))
    v = simplex_noise_3d(x, y, z, perm)
    assert v.abs().max() <= 1.1 and v.std() > 0.2
    eps = 1e-3
    assert (simplex_noise_3d(x + eps, y, z, perm) - v).abs().max() < 0.05


def test_fractal_shape_and_fixed_field_is_deterministic() -> None:
    perm = make_permutation(torch.Generator().manual_seed(0))
    f = fractal_simplex_3d((3, 31, 31), perm, octaves=6, persistence=0.6, frequency=32)
    assert f.shape == (3, 31, 31)
    assert torch.equal(f, fractal_simplex_3d((3, 31, 31), perm))
    # Amplitudes 1 + 0.6 + ... < 2.5 bound the octave sum.
    assert f.abs().max() < 2.5


def test_simplex_patches_shape_range_and_box() -> None:
    images = torch.full((6, 3, 256, 256), 0.5)
    out, mask = simplex_patches(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and mask.shape == (6, 1, 256, 256)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for m in mask[:, 0]:
        rows, cols = m.nonzero(as_tuple=True)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 10 <= h <= 31 and 10 <= w <= 31 and m.sum() == h * w and rows.min() >= 1 and cols.min() >= 1
    assert torch.equal(out * (1 - mask), images * (1 - mask))
    # 0.2 x octave sum: small perturbation.
    assert (out - images).abs().max() < 0.5


def test_simplex_synthesize_in_unit_range_and_fresh_mode_differs() -> None:
    images = torch.rand(4, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    out, masks = synthesize(images, SynthesisConfig(kind="simplex"), gen)
    assert out.min() >= 0 and out.max() <= 1 and masks.sum() > 0
    flat = torch.full((2, 3, 64, 64), 0.5)
    a, _ = simplex_patches(flat, torch.Generator().manual_seed(0), field="fresh")
    b, _ = simplex_patches(flat, torch.Generator().manual_seed(1), field="fresh")
    assert not torch.equal(a, b)
