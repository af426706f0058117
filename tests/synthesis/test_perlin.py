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
