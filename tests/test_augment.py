"""Geometric augmentation of normal training batches (kdad.augment, train.augment)."""

from __future__ import annotations

import pytest
import torch

from kdad.augment import _rotate, augment_batch, check_augment
from kdad.errors import ConfigError


def _images(n: int = 64, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_no_op_returns_the_batch_and_draws_nothing() -> None:
    x, g = _images(), torch.Generator().manual_seed(3)
    before = g.get_state()
    assert augment_batch(x, [], g) is x
    assert torch.equal(g.get_state(), before)  # a run without augmentation keeps its random stream


def test_flips_give_each_image_itself_or_its_mirror_and_both_occur() -> None:
    x = _images()
    y = augment_batch(x, ["hflip"], torch.Generator().manual_seed(0))
    same = [torch.equal(a, b) for a, b in zip(y, x)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(y, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54
    assert torch.equal(x, _images())  # the input is not modified


def test_rot90_draws_all_four_quarter_turns_on_square_images() -> None:
    x = _images()
    y = augment_batch(x, ["rot90"], torch.Generator().manual_seed(0))
    turns = [next(k for k in range(4) if torch.equal(a, b.rot90(k, dims=(-2, -1)))) for a, b in zip(y, x)]
    assert set(turns) == {0, 1, 2, 3}


def test_rot90_keeps_the_shape_of_a_non_square_image() -> None:
    x = torch.rand(32, 3, 6, 10)
    y = augment_batch(x, ["rot90"], torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert all(torch.equal(a, b) or torch.equal(a, b.rot90(2, dims=(-2, -1))) for a, b in zip(y, x))


def test_rotate_by_a_quarter_turn_matches_rot90_and_keeps_a_flat_image_flat() -> None:
    x = _images(4, 9)
    y = _rotate(x, torch.full((4,), 90.0))
    # one direction or the other: a rigid quarter turn, not a shear (the h/w factors) or a shift
    assert min((y - x.rot90(k, dims=(-2, -1))).abs().max().item() for k in (1, 3)) < 1e-5
    flat = torch.full((2, 3, 8, 12), 0.3)
    out = augment_batch(flat, ["rotate"], torch.Generator().manual_seed(0), angle=45.0)
    assert torch.allclose(out, flat, atol=1e-6)  # reflection padding: no black corners to learn


def test_same_generator_state_gives_the_same_batch() -> None:
    x = _images()
    ops = ["hflip", "vflip", "rot90", "rotate"]
    a = augment_batch(x, ops, torch.Generator().manual_seed(5))
    b = augment_batch(x, ops, torch.Generator().manual_seed(5))
    c = augment_batch(x, ops, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_channels_last_batches_stay_channels_last() -> None:
    x = _images().contiguous(memory_format=torch.channels_last)
    y = augment_batch(x, ["hflip", "rot90"], torch.Generator().manual_seed(0))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("names", "angle", "needle"), [(["shear"], 180.0, "train.augment"),
                                                        (["rotate"], -5.0, "train.augment_angle")])
def test_bad_options_are_refused_by_name(names: list[str], angle: float, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_augment(names, angle)
