import math

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


# ----------------------------------------------------------------------------- references written out per point
GRAD3 = [(1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0), (1, 0, 1), (-1, 0, 1), (1, 0, -1), (-1, 0, -1),
         (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1)]


def gustavson(x: float, y: float, z: float, perm: list[int]) -> float:
    """Stefan Gustavson's 'Simplex noise demystified' 3-D noise, branch by branch, in float64."""
    f3, g3 = 1 / 3, 1 / 6
    s = (x + y + z) * f3
    i, j, k = math.floor(x + s), math.floor(y + s), math.floor(z + s)
    t = (i + j + k) * g3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)
    if x0 >= y0:
        if y0 >= z0:
            o1, o2 = (1, 0, 0), (1, 1, 0)
        elif x0 >= z0:
            o1, o2 = (1, 0, 0), (1, 0, 1)
        else:
            o1, o2 = (0, 0, 1), (1, 0, 1)
    elif y0 < z0:
        o1, o2 = (0, 0, 1), (0, 1, 1)
    elif x0 < z0:
        o1, o2 = (0, 1, 0), (0, 1, 1)
    else:
        o1, o2 = (0, 1, 0), (1, 1, 0)
    total = 0.0
    for (oi, oj, ok), g in (((0, 0, 0), 0.0), (o1, g3), (o2, 2 * g3), ((1, 1, 1), 3 * g3)):
        dx, dy, dz = x0 - oi + g, y0 - oj + g, z0 - ok + g
        h = perm[(i & 255) + oi + perm[(j & 255) + oj + perm[(k & 255) + ok]]] % 12
        tt = 0.6 - dx * dx - dy * dy - dz * dz
        if tt > 0:
            total += tt**4 * (GRAD3[h][0] * dx + GRAD3[h][1] * dy + GRAD3[h][2] * dz)
    return 32 * total


def test_simplex_noise_matches_gustavson_at_random_points_and_on_lattice_ties() -> None:
    perm = make_permutation(torch.Generator().manual_seed(3))
    assert perm.shape == (512,) and torch.equal(perm[:256], perm[256:]) and sorted(perm[:256].tolist()) == list(
        range(256))
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([(torch.rand(200, 3, generator=g) - 0.3) * 20,  # random points, negative ones too
                     torch.tensor([[a / 4, b / 4, c / 4] for a in range(3) for b in range(3) for c in range(3)])])
    got = simplex_noise_3d(pts[:, 0], pts[:, 1], pts[:, 2], perm)
    want = torch.tensor([gustavson(*map(float, p), perm.tolist()) for p in pts])
    assert torch.allclose(got.double(), want.double(), atol=1e-4)
    assert got.abs().max() <= 1.0 and got.std() > 0.1


def test_fractal_octaves_halve_the_divisor_and_scale_by_persistence() -> None:
    perm = make_permutation(torch.Generator().manual_seed(1))
    got = fractal_simplex_3d((2, 3, 4), perm, octaves=3, persistence=0.5, frequency=8.0)
    zz, yy, xx = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), torch.arange(4.0), indexing="ij")
    want = sum(0.5**k * simplex_noise_3d(xx / (8.0 / 2**k), yy / (8.0 / 2**k), zz / (8.0 / 2**k), perm)
               for k in range(3))
    assert got.shape == (2, 3, 4) and torch.allclose(got, want, atol=1e-6)
    off = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    shifted = fractal_simplex_3d((2, 3, 4), perm, octaves=3, persistence=0.5, frequency=8.0, offset=off)
    big = fractal_simplex_3d((3, 5, 7), perm, octaves=3, persistence=0.5, frequency=8.0)
    assert shifted.shape == (2, 2, 3, 4) and torch.allclose(shifted[0], big[1:3, 2:5, 3:7], atol=1e-6)
    assert torch.allclose(shifted[1], got, atol=1e-6)
    default = fractal_simplex_3d((3, 4, 5), perm)  # RD++: 6 octaves, persistence 0.6, start 32
    zz, yy, xx = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), torch.arange(5.0), indexing="ij")
    want = sum(0.6**k * simplex_noise_3d(xx / (32 / 2**k), yy / (32 / 2**k), zz / (32 / 2**k), perm) for k in range(6))
    assert torch.allclose(default, want, atol=1e-5)


def patches_reference(images: torch.Tensor, seed: int, size_range: tuple[int, int], amplitude: float,
                      field_seed: int, frequency: float = 32.0, fresh: bool = False) -> tuple:
    """RD++'s box per image with the same draws, the field's top-left h x w crop added inside the box."""
    g = torch.Generator().manual_seed(seed)
    b, c, height, width = images.shape
    lo = min(size_range[0], height - 2, width - 2)
    hi = max(lo + 1, min(size_range[1], height - 1, width - 1))
    hs, ws = torch.randint(lo, hi, (b,), generator=g), torch.randint(lo, hi, (b,), generator=g)
    tops = torch.rand(b, generator=g)
    lefts = torch.rand(b, generator=g)
    shape = (c, int(hs.max()), int(ws.max()))
    if fresh:  # a new table from the generator, and each image's field offset by U[0, 256 * frequency) pixels
        perm = make_permutation(g)
        offsets = torch.rand(b, 3, generator=g) * 256 * frequency
        fields = [fractal_simplex_3d(shape, perm, 6, 0.6, frequency, offsets[i:i + 1])[0] for i in range(b)]
    else:
        field = fractal_simplex_3d(shape, make_permutation(torch.Generator().manual_seed(field_seed)), 6, 0.6,
                                   frequency)
        fields = [field] * b
    out, masks = images.clone(), torch.zeros(b, 1, height, width)
    for i in range(b):
        h, w = int(hs[i]), int(ws[i])
        top = int(1 + float(tops[i]) * max(height - h - 1, 1))
        left = int(1 + float(lefts[i]) * max(width - w - 1, 1))
        out[i, :, top:top + h, left:left + w] += amplitude * fields[i][:, :h, :w]
        masks[i, :, top:top + h, left:left + w] = 1
    return out, masks


def test_simplex_patches_match_a_per_image_reference() -> None:
    images = torch.rand(6, 3, 40, 36, generator=torch.Generator().manual_seed(2))
    for size_range, amplitude, field_seed in (((10, 32), 0.2, 0), ((4, 9), 0.7, 5), ((30, 50), 0.2, 0)):
        got, mask = simplex_patches(images, torch.Generator().manual_seed(1), size_range, amplitude,
                                    field_seed=field_seed)
        want, want_mask = patches_reference(images, 1, size_range, amplitude, field_seed)
        assert torch.equal(mask, want_mask) and torch.allclose(got, want, atol=1e-6)
    got, mask = simplex_patches(images, torch.Generator().manual_seed(1))
    assert torch.allclose(got, patches_reference(images, 1, (10, 32), 0.2, 0)[0], atol=1e-6)
    fresh, fresh_mask = simplex_patches(images, torch.Generator().manual_seed(1), field="fresh")
    assert torch.equal(fresh_mask, mask) and not torch.allclose(fresh, got)
    want, _ = patches_reference(images, 1, (10, 32), 0.2, 0, fresh=True)
    assert torch.allclose(fresh, want, atol=1e-5)
    got, _ = simplex_patches(images, torch.Generator().manual_seed(1), frequency=8.0)
    assert torch.allclose(got, patches_reference(images, 1, (10, 32), 0.2, 0, frequency=8.0)[0], atol=1e-6)
    # small and non-square images: box sides bounded by the shorter side, corners from 1 up
    for shape, sizes in (((3, 3, 9, 30), (10, 32)), ((3, 3, 30, 9), (10, 32)), ((4, 3, 6, 6), (10, 32)),
                         ((4, 3, 5, 14), (10, 32)), ((4, 3, 12, 30), (4, 32)), ((4, 3, 30, 12), (4, 32)),
                         ((2, 3, 20, 20), (5, 5))):
        small = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
        for seed in range(4):
            got, mask = simplex_patches(small, torch.Generator().manual_seed(seed), sizes)
            want, want_mask = patches_reference(small, seed, sizes, 0.2, 0)
            assert torch.equal(mask, want_mask) and torch.allclose(got, want, atol=1e-6), (shape, seed)
