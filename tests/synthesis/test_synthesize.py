import pytest
import torch

from kdad.errors import ConfigError
from kdad.synthesis import BETA_RANGE_PAPER, SynthesisConfig, TextureBank, synthesize


def _random_bank() -> TextureBank:
    gen = torch.Generator().manual_seed(9)
    return TextureBank.from_tensor(torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8, generator=gen))


CONFIGS = [
    SynthesisConfig(kind="perlin_texture"),
    SynthesisConfig(kind="perlin_texture", texture_augment=True, beta_range=BETA_RANGE_PAPER),
    SynthesisConfig(kind="simplex"),
    SynthesisConfig(kind="simplex", simplex_field="fresh"),
    SynthesisConfig(kind="cutpaste"),
    SynthesisConfig(kind="cutpaste", cutpaste_variant="both"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}")
def test_deterministic_binary_and_in_range(cfg: SynthesisConfig) -> None:
    images = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    bank = _random_bank()
    out1, m1 = synthesize(images, cfg, torch.Generator().manual_seed(7), bank)
    out2, m2 = synthesize(images, cfg, torch.Generator().manual_seed(7), bank)
    assert torch.equal(out1, out2) and torch.equal(m1, m2)
    assert out1.shape == images.shape and m1.shape == (4, 1, 48, 48) and m1.dtype == images.dtype
    assert set(m1.unique().tolist()) <= {0.0, 1.0}
    assert out1.min() >= 0 and out1.max() <= 1
    assert torch.equal(out1 * (1 - m1), images * (1 - m1))
    out3, _ = synthesize(images, cfg, torch.Generator().manual_seed(8), bank)
    assert not torch.equal(out1, out3)


def test_perlin_texture_beta_within_range() -> None:
    images = torch.zeros(32, 3, 32, 32)
    bank = TextureBank.from_tensor(torch.ones(1, 3, 48, 48))  # white: I_a = beta inside the mask
    cfg = SynthesisConfig(perlin_threshold=-2.0)
    out, masks = synthesize(images, cfg, torch.Generator().manual_seed(0), bank)
    assert masks.all()
    beta = out[:, 0, 16, 16]
    assert (beta > 0.2).all() and (beta <= 1.0).all()


def test_clean_prob_leaves_images_clean() -> None:
    images = torch.rand(6, 3, 32, 32)
    out, masks = synthesize(
        images, SynthesisConfig(kind="cutpaste", clean_prob=1.0), torch.Generator().manual_seed(0)
    )
    assert masks.sum() == 0 and torch.equal(out, images)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="kind"):
        SynthesisConfig(kind="draem")
    with pytest.raises(ConfigError, match="foreground"):
        SynthesisConfig(foreground={"bottle": "magic"})
    with pytest.raises(ConfigError, match="TextureBank"):
        synthesize(torch.rand(1, 3, 8, 8), SynthesisConfig(), torch.Generator())
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        synthesize(torch.rand(3, 8, 8), SynthesisConfig(kind="simplex"), torch.Generator())
    assert SynthesisConfig(beta_range=[0.15, 1.0]).beta_range == (0.15, 1.0)


@pytest.mark.parametrize("beta_range", [(0.2, 1.0), BETA_RANGE_PAPER])
def test_perlin_texture_beta_varies_and_matches_its_sampler(beta_range: tuple[float, float]) -> None:
    """Black image, white texture, full mask: I_a = beta per image. The betas are the draws of
    sample_beta replayed on the same generator stream (keep-clean draw, Perlin masks, texture pick)."""
    from kdad.synthesis import perlin_masks, sample_beta

    n, size = 32, (32, 32)
    images = torch.zeros(n, 3, *size)
    bank = TextureBank.from_tensor(torch.ones(1, 3, 48, 48))
    cfg = SynthesisConfig(perlin_threshold=-2.0, beta_range=beta_range)
    out, masks = synthesize(images, cfg, torch.Generator().manual_seed(3), bank)
    assert masks.all()
    beta = out[:, 0, 16, 16]
    replay = torch.Generator().manual_seed(3)
    torch.rand(n, generator=replay)  # synthesize's keep-clean draw
    perlin_masks(n, size, replay, cfg.perlin_scale_exp, cfg.perlin_rotation, cfg.perlin_threshold)
    bank.sample(n, replay, size)
    torch.testing.assert_close(beta, sample_beta(n, cfg.beta_range, replay), rtol=0, atol=1e-6)
    lo, hi = beta_range
    assert (beta > lo).all() and (beta <= hi).all()
    assert beta.unique().numel() == n and beta.std() > 0.15 * (hi - lo)  # U(lo, hi]: std = 0.29 (hi - lo)
