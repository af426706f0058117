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


# ----------------------------------------------------------------------------- each kind against its parts
def _after_clean_draw(seed: int, batch: int) -> torch.Generator:
    gen = torch.Generator().manual_seed(seed)
    torch.rand(batch, generator=gen)  # synthesize draws clean_prob first
    return gen


def _restricted(images: torch.Tensor, out: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return torch.where(masks > 0.5, out, images).clamp(0, 1)


CUTPASTE = {"cutpaste_area_ratio": (0.1, 0.3), "cutpaste_aspect_ratio": 0.5, "scar_width": (3, 5),
            "scar_length": (8, 12), "scar_rotation": 20.0, "cutpaste_jitter": 0.3, "foreground": "none"}


def test_cutpaste_variants_pass_every_option() -> None:
    from kdad.synthesis import cutpaste_normal, cutpaste_scar

    images = torch.rand(8, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    normal = cutpaste_normal(images, _after_clean_draw(3, 8), (0.1, 0.3), 0.5, 0.3)
    scar = cutpaste_scar(images, _after_clean_draw(3, 8), (3, 5), (8, 12), 20.0, 0.3)
    for variant, (want, want_mask) in (("normal", normal), ("scar", scar)):
        out, masks = synthesize(images, SynthesisConfig(kind="cutpaste", cutpaste_variant=variant, **CUTPASTE),
                                torch.Generator().manual_seed(3))
        assert torch.equal(masks, want_mask) and torch.equal(out, _restricted(images, want, want_mask)), variant
    gen = _after_clean_draw(3, 8)
    pick = torch.rand(8, generator=gen) < 0.5
    n_img, n_mask = cutpaste_normal(images, gen, (0.1, 0.3), 0.5, 0.3)
    s_img, s_mask = cutpaste_scar(images, gen, (3, 5), (8, 12), 20.0, 0.3)
    assert 0 < pick.sum() < 8
    want_mask = torch.where(pick.view(-1, 1, 1, 1), s_mask, n_mask)
    out, masks = synthesize(images, SynthesisConfig(kind="cutpaste", cutpaste_variant="both", **CUTPASTE),
                            torch.Generator().manual_seed(3))
    assert torch.equal(masks, want_mask)
    assert torch.equal(out, _restricted(images, torch.where(pick.view(-1, 1, 1, 1), s_img, n_img), want_mask))


def test_simplex_passes_every_option_and_scales_the_box_with_the_height() -> None:
    from kdad.synthesis import _scaled_range, simplex_patches

    assert [_scaled_range((10, 32), h) for h in (256, 128, 64, 512, 100, 2570)] == [
        (10, 32), (10, 16), (10, 11), (10, 64), (10, 12), (10, 321)]
    images = torch.rand(4, 3, 128, 40, generator=torch.Generator().manual_seed(1)) * 0.5
    cfg = SynthesisConfig(kind="simplex", simplex_size_range=(6, 40), simplex_amplitude=0.6, simplex_octaves=3,
                          simplex_persistence=0.8, simplex_frequency=8.0, simplex_field="fresh", simplex_seed=4)
    want, want_mask = simplex_patches(images, _after_clean_draw(2, 4), (6, 20), 0.6, 3, 0.8, 8.0, "fresh", 4)
    out, masks = synthesize(images, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(masks, want_mask) and torch.equal(out, _restricted(images, want, want_mask))
    fixed = SynthesisConfig(kind="simplex", simplex_seed=4)
    want, want_mask = simplex_patches(images, _after_clean_draw(2, 4), (10, 16), field="fixed", field_seed=4)
    out, masks = synthesize(images, fixed, torch.Generator().manual_seed(2))
    assert torch.equal(out, _restricted(images, want, want_mask))


def test_perlin_texture_is_perlin_masks_then_textures_then_beta() -> None:
    from kdad.synthesis import blend, perlin_masks, sample_beta

    images = torch.rand(6, 3, 20, 28, generator=torch.Generator().manual_seed(5)).double()
    bank = _random_bank()
    cfg = SynthesisConfig(perlin_scale_exp=(1, 3), perlin_rotation=30.0, perlin_threshold=0.1, beta_range=(0.4, 0.6),
                          foreground="none")
    gen = _after_clean_draw(6, 6)
    want_mask = perlin_masks(6, (20, 28), gen, (1, 3), 30.0, 0.1).double()
    tex = bank.sample(6, gen, (20, 28)).double()
    want = blend(images, tex, want_mask, sample_beta(6, (0.4, 0.6), gen))
    out, masks = synthesize(images, cfg, torch.Generator().manual_seed(6), bank)
    assert masks.dtype == torch.float64 and torch.equal(masks, want_mask)
    assert torch.allclose(out, want.clamp(0, 1)) and 0 < masks.mean() < 1
    with pytest.raises(ConfigError) as err:
        synthesize(images, SynthesisConfig(texture_dir="/dtd"), torch.Generator())
    assert str(err.value) == ("synthesis kind 'perlin_texture' needs a TextureBank: pass textures=TextureBank("
                              "cfg.texture_dir, size) (synthesis.texture_dir='/dtd')")


def test_foreground_per_image_categories_pass_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdad.synthesis as synthesis

    calls = []

    def fake(images: torch.Tensor, method: str, polarity: str, iterations: int) -> torch.Tensor | None:
        calls.append((images.shape[0], method, polarity, iterations))
        if method == "none":
            return None
        fg = torch.zeros(images.shape[0], 1, *images.shape[2:], dtype=torch.float32)
        fg[..., : images.shape[-1] // 2] = 1.0  # left half
        return fg

    monkeypatch.setattr(synthesis, "compute_foreground", fake)
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    cfg = SynthesisConfig(kind="cutpaste", foreground={"a": "grabcut"}, otsu_polarity="bright", grabcut_iterations=4)
    fg = synthesis._foreground(images, cfg, ["a", "b", "a"])
    assert calls == [(2, "grabcut", "bright", 4)] and fg is not None and fg.dtype == torch.float64
    assert fg[[0, 2], :, :, 4:].sum() == 0 and fg[1].sum() == 64 and fg[[0, 2], :, :, :4].all()
    assert synthesis._foreground(images, cfg, ["b", "c", "d"]) is None  # no restricted image: no mask at all
    synthesis._foreground(images, cfg, "a")
    assert calls[-1] == (3, "grabcut", "bright", 4)
    with pytest.raises(ConfigError, match="got 3 categories for a batch of 2 images"):
        synthesis._foreground(images[:2], cfg, ["a", "b", "a"])


def test_precomputed_foreground_shape_threshold_and_message() -> None:
    images = torch.rand(2, 3, 8, 8)
    cfg = SynthesisConfig(kind="simplex", simplex_size_range=(6, 7))
    _, full = synthesize(images, cfg, torch.Generator().manual_seed(0))
    half = torch.full((2, 1, 8, 8), 0.5)  # 0.5 is not foreground
    _, masks = synthesize(images, cfg, torch.Generator().manual_seed(0), foreground=half)
    assert full.sum() > 0 and masks.sum() == 0
    with pytest.raises(ConfigError) as err:
        synthesize(images, cfg, torch.Generator(), foreground=torch.ones(2, 1, 8, 7))
    assert str(err.value) == "foreground must have shape (2, 1, 8, 8), got (2, 1, 8, 7)"


def test_config_bounds_and_messages() -> None:
    for kwargs, message in (
        ({"clean_prob": 1.5}, "synthesis.clean_prob=1.5 must lie in [0, 1]"),
        ({"beta_range": (0.5, 1.2)}, "synthesis.beta_range=(0.5, 1.2) must satisfy 0 <= lo <= hi <= 1"),
        ({"perlin_scale_exp": (2, 2)}, "synthesis.perlin_scale_exp=(2, 2) must satisfy 0 <= lo < hi"),
    ):
        with pytest.raises(ConfigError) as err:
            SynthesisConfig(**kwargs)
        assert str(err.value) == message
    assert SynthesisConfig(beta_range=(0.0, 0.0), clean_prob=1.0).beta_range == (0.0, 0.0)  # bounds are inclusive
    assert SynthesisConfig(beta_range=(0.3, 0.3)).beta_range == (0.3, 0.3)
    from types import MappingProxyType

    cfg = SynthesisConfig(foreground=MappingProxyType({"a": "otsu"}))
    assert type(cfg.foreground) is dict and cfg.foreground_method("a") == "otsu"
    assert cfg.foreground_method(None) == "none" and cfg.foreground_method("b") == "none"
    assert SynthesisConfig(foreground="otsu").foreground_method("carpet") == "otsu"
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\), got \(2, 3, 8\)"):
        synthesize(torch.rand(2, 3, 8), SynthesisConfig(kind="simplex"), torch.Generator())
