import math

import torch

from kdad.synthesis import perlin_masks, perlin_noise_2d


def test_perlin_mask_binary_shape_and_determinism() -> None:
    a = perlin_masks(4, (64, 48), torch.Generator().manual_seed(3))
    b = perlin_masks(4, (64, 48), torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 64, 48) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b)


def test_perlin_threshold_fraction_plausible() -> None:
    # DRAEM noise is ~N(0, 0.3) in [-1, 1]: a few percent of pixels exceed 0.5, far fewer exceed 0.8.
    masks = perlin_masks(64, (64, 64), torch.Generator().manual_seed(0))
    frac = masks.mean().item()
    assert 0.01 < frac < 0.15
    high = perlin_masks(64, (64, 64), torch.Generator().manual_seed(0), threshold=0.8).mean().item()
    assert high < frac
    assert perlin_masks(8, (64, 64), torch.Generator().manual_seed(0), threshold=-2.0).mean() > 0.5


def test_perlin_noise_is_smooth_and_zero_on_lattice() -> None:
    res = torch.tensor([[4, 4]])
    noise = perlin_noise_2d((64, 64), res, torch.Generator().manual_seed(0))
    assert noise.shape == (1, 64, 64) and noise.abs().max() <= 1.0 + 1e-5
    # Gradient noise is 0 at lattice points (every 16 px here).
    assert noise[0, ::16, ::16].abs().max() < 1e-6
    assert (noise[0, 1:] - noise[0, :-1]).abs().max() < 0.3


def test_perlin_rotation_zeroes_outside_canvas() -> None:
    res = torch.tensor([[1, 1]])
    angle = torch.tensor([45.0])
    noise = perlin_noise_2d((65, 65), res, torch.Generator().manual_seed(0), angle)
    # At 45 degrees the image corners come from outside the un-rotated canvas.
    assert noise[0, 0, 0] == 0 and noise[0, -1, -1] == 0


def noise_reference(size: tuple[int, int], res: list[tuple[int, int]], seed: int,
                    angles: list[float] | None) -> torch.Tensor:
    """DRAEM's gradient noise per pixel: unit gradients at lattice corners (angles 2 pi U[0, 1) on an
    (r_max + 2)^2 grid), dot with the offset, quintic fade, bilinear mix, times sqrt(2); rotation by sampling at
    the inversely rotated coordinate about the centre, 0 where that lies outside the canvas."""
    height, width = size
    r_max = max(max(r) for r in res) + 2
    grid = 2 * math.pi * torch.rand(len(res), r_max, r_max, generator=torch.Generator().manual_seed(seed))
    out = torch.zeros(len(res), height, width, dtype=torch.float64)

    def fade(t: float) -> float:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    for b, (ry, rx) in enumerate(res):
        t = math.radians(angles[b]) if angles else 0.0
        cy, cx = (height - 1) / 2, (width - 1) / 2
        for i in range(height):
            for j in range(width):
                y = cy + math.cos(t) * (i - cy) - math.sin(t) * (j - cx)
                x = cx + math.sin(t) * (i - cy) + math.cos(t) * (j - cx)
                if angles and not (0 <= y <= height - 1 and 0 <= x <= width - 1):
                    continue
                py, px = y * ry / height, x * rx / width
                gy, gx = math.floor(py), math.floor(px)
                fy, fx = py - gy, px - gx

                def dot(dy: int, dx: int, b: int = b, gy: int = gy, gx: int = gx, fy: float = fy,
                        fx: float = fx) -> float:
                    a = float(grid[b, gy + dy, gx + dx])
                    return math.cos(a) * (fy - dy) + math.sin(a) * (fx - dx)

                top = dot(0, 0) + fade(fy) * (dot(1, 0) - dot(0, 0))
                bottom = dot(0, 1) + fade(fy) * (dot(1, 1) - dot(0, 1))
                out[b, i, j] = math.sqrt(2) * (top + fade(fx) * (bottom - top))
    return out


def test_perlin_noise_matches_a_per_pixel_reference() -> None:
    res = [(2, 4), (1, 8), (4, 1)]
    got = perlin_noise_2d((12, 10), torch.tensor(res), torch.Generator().manual_seed(6))
    assert torch.allclose(got.double(), noise_reference((12, 10), res, 6, None), atol=1e-5)
    angles = [30.0, -70.0, 0.0]
    got = perlin_noise_2d((12, 10), torch.tensor(res), torch.Generator().manual_seed(6), torch.tensor(angles))
    assert torch.allclose(got.double(), noise_reference((12, 10), res, 6, angles), atol=1e-4)


def test_perlin_masks_draw_scales_then_angles_then_noise() -> None:
    gen, twin = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    masks = perlin_masks(3, (16, 12), gen, scale_exp=(1, 4), rotation_deg=60.0, threshold=0.2)
    res = 2 ** torch.randint(1, 4, (3, 2), generator=twin)
    angles = (torch.rand(3, generator=twin) * 2 - 1) * 60.0
    noise = perlin_noise_2d((16, 12), res, twin, angles)
    assert torch.equal(masks, (noise > 0.2).float().unsqueeze(1))
    assert torch.equal(gen.get_state(), twin.get_state())
    assert 0 < masks.mean() < 1
    default = perlin_masks(3, (16, 12), torch.Generator().manual_seed(2))
    twin = torch.Generator().manual_seed(2)
    res = 2 ** torch.randint(0, 6, (3, 2), generator=twin)
    angles = (torch.rand(3, generator=twin) * 2 - 1) * 90.0
    assert torch.equal(default, (perlin_noise_2d((16, 12), res, twin, angles) > 0.5).float().unsqueeze(1))
