"""Shared feature losses against their formulas (edge cases found by benchmarks/mutation.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdad.blocks.losses import _nhwc, flatten_pair, global_cosine_loss, normalized_l2_loss, pixel_cosine_loss


def _pair(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_normalized_l2_loss_is_stfpms_formula_summed_over_layers() -> None:
    (t1, s1), (t2, s2) = _pair(0, (2, 3, 4, 5)), _pair(1, (2, 6, 2, 3))
    expected = 0.0
    for t, s in ((t1, s1), (t2, s2)):
        tn = t / t.norm(dim=1, keepdim=True)
        sn = s / s.norm(dim=1, keepdim=True)
        expected += ((tn - sn) ** 2).sum(dim=1).mean()
    assert torch.allclose(normalized_l2_loss([t1, t2], [s1, s2]), expected, atol=1e-6)
    assert normalized_l2_loss([t1], [t1.clone() * 3.0]).item() < 1e-10  # scale-free: same direction, no loss
    assert torch.allclose(normalized_l2_loss([t1], [s1]), expected - normalized_l2_loss([t2], [s2]), atol=1e-6)


def test_cosine_losses_against_their_formulas() -> None:
    (t1, s1), (t2, s2) = _pair(2, (2, 3, 4, 5)), _pair(3, (2, 6, 2, 3))
    glob = sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean() for t, s in ((t1, s1), (t2, s2)))
    pix = sum((1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in ((t1, s1), (t2, s2)))
    assert torch.allclose(global_cosine_loss([t1, t2], [s1, s2]), glob, atol=1e-6)
    assert torch.allclose(pixel_cosine_loss([t1, t2], [s1, s2]), pix, atol=1e-6)
    one = (1 - F.cosine_similarity(t1.flatten(1), s1.flatten(1))).mean()
    assert torch.allclose(global_cosine_loss([t1], [s1]), one)


def test_nhwc_is_only_a_4d_channels_last_tensor() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert _nhwc(x.contiguous(memory_format=torch.channels_last))
    assert not _nhwc(x)
    assert not _nhwc(x.transpose(2, 3))  # neither contiguous nor channels_last
    assert not _nhwc(torch.randn(2, 3, 4))


def test_flatten_pair_reads_channels_last_in_memory_order_without_copies() -> None:
    t, s = _pair(4, (2, 3, 4, 5))
    tc, sc = t.contiguous(memory_format=torch.channels_last), s.contiguous(memory_format=torch.channels_last)
    ft, fs = flatten_pair(tc, sc)
    assert ft.shape == fs.shape == (2, 60)
    assert ft.data_ptr() == tc.data_ptr() and fs.data_ptr() == sc.data_ptr()  # views, not copies
    assert torch.equal(ft, t.permute(0, 2, 3, 1).flatten(1)) and torch.equal(fs, s.permute(0, 2, 3, 1).flatten(1))
    # one channels_last, one not: both in (C, H, W) order, so element i of one meets element i of the other
    mt, ms = flatten_pair(tc, s)
    assert torch.equal(mt, t.flatten(1)) and torch.equal(ms, s.flatten(1))
    mt, ms = flatten_pair(t, sc)
    assert torch.equal(mt, t.flatten(1)) and torch.equal(ms, s.flatten(1))
    assert torch.allclose(global_cosine_loss([tc], [sc]), global_cosine_loss([t], [s]), atol=1e-6)
