import pytest
import torch

from kdad.blocks.decoders import generic_decoder, resnet_decoder
from kdad.blocks.losses import global_cosine_loss, normalized_l2_loss, pixel_cosine_loss
from kdad.blocks.ocbe import OCBE


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_wrn50_ocbe_and_decoder_match_rd4ad_sizes() -> None:
    # REFERENCE §3.1: OCBE 67.28 M incl. 8.39 M unused conv4/bn4 (we do not build those); decoder 24.92 M.
    ocbe = OCBE([256, 512, 1024], block="bottleneck", num_blocks=3, width_per_group=128)
    dec = resnet_decoder("wide_resnet50_2", [256, 512, 1024], ocbe.out_channels)
    assert abs(_count(ocbe) / 1e6 - (67.28 - 8.39)) < 0.01
    assert abs(_count(dec) / 1e6 - 24.92) < 0.01
    feats = [torch.randn(1, 256, 16, 16), torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4)]
    code = ocbe(feats)
    assert code.shape == (1, 2048, 2, 2)
    outs = dec(code)
    assert [tuple(o.shape[1:]) for o in outs] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    assert all((o >= 0).all() for o in outs)  # final ReLU, like the teacher


def test_generic_decoder_mirrors_any_channels() -> None:
    chans = [24, 40, 112]
    ocbe = OCBE(chans)
    dec = generic_decoder(chans, ocbe.out_channels)
    feats = [torch.randn(2, 24, 32, 32), torch.randn(2, 40, 16, 16), torch.randn(2, 112, 8, 8)]
    outs = dec(ocbe(feats))
    assert [tuple(o.shape) for o in outs] == [tuple(f.shape) for f in feats]


def test_linear_readout_reaches_a_signed_teacher() -> None:
    # RD4AD's stages end in a ReLU: never negative, so a signed teacher (EfficientNet-Lite) cannot be matched
    torch.manual_seed(0)
    code = torch.randn(2, 64, 4, 4)
    relu = generic_decoder([24, 40, 80], 64, (1, 1, 1))
    assert all((o >= 0).all() for o in relu(code)) and not any("readouts" in k for k in relu.state_dict())
    linear = generic_decoder([24, 40, 80], 64, (1, 1, 1), readout="linear")
    outs = linear(code)
    assert [o.shape[1] for o in outs] == [24, 40, 80] and all((o < 0).any() for o in outs)
    with pytest.raises(ValueError, match="readout"):
        generic_decoder([24, 40, 80], 64, readout="tanh")


@pytest.mark.parametrize("name", ["rd", "snl", "rdpp", "urd", "cfrg", "bkd", "dskd"])
def test_readout_option_is_checked_and_built(name: str) -> None:
    from kdad.blocks.decoders import MirrorDecoder
    from kdad.errors import ConfigError
    from kdad.methods import get_method

    spec = get_method(name)
    lite = {"backbone": "efficientnet_lite0", "layers": (2, 3, 4), "weights": "random"}
    if name == "cfrg":  # its student must give the teacher's strides (8, 16, 32)
        lite["student_indices"] = (2, 3, 4)
    if name == "dskd":  # its global student needs the teacher stage after the last layer
        lite["layers"] = (1, 2, 3)
    with pytest.raises(ConfigError, match=f"{name}.*model.readout='tanh'"):
        spec.Model(spec.Config(**lite, readout="tanh"))  # Config or Model refuses it, naming the option
    model = spec.Model(spec.Config(**lite, readout="linear"))
    decoders = [m for m in model.modules() if isinstance(m, MirrorDecoder)]
    assert decoders and all(d.readouts is not None and len(d.readouts) == 3 for d in decoders)
    plain = spec.Model(spec.Config(**lite))
    assert all(d.readouts is None for d in plain.modules() if isinstance(d, MirrorDecoder))


def test_losses_on_hand_checkable_values() -> None:
    t = [torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1)]
    s = [torch.tensor([[0.0, 1.0]]).view(1, 2, 1, 1)]
    assert torch.isclose(global_cosine_loss(t, s), torch.tensor(1.0))
    assert torch.isclose(pixel_cosine_loss(t, s), torch.tensor(1.0))
    assert torch.isclose(normalized_l2_loss(t, s), torch.tensor(2.0))  # ||e1 - e2||^2 = 2, no 1/2 factor
    assert torch.isclose(global_cosine_loss(t, t), torch.tensor(0.0), atol=1e-6)


def unequal_norm_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two positions (1, 2, 1, 2) where the flattened and the per-position cosine differ.

    T = (1, 0) at position 1 and (0, 3) at position 2; S = (1, 0) and (3, 0). Per position: cos 1 and 0, so the
    per-position loss is mean(0, 1) = 0.5. Flattened: vec T = (1, 0, 0, 3), vec S = (1, 3, 0, 0), cos = 1/10,
    so the global loss is 0.9.
    """
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    return t, s


def test_global_cosine_is_not_per_pixel() -> None:
    t, s = unequal_norm_pair()
    assert pixel_cosine_loss([t], [s]).item() == pytest.approx(0.5, abs=1e-6)
    assert global_cosine_loss([t], [s]).item() == pytest.approx(0.9, abs=1e-6)
    # two layers are summed, not averaged
    assert global_cosine_loss([t, t], [s, t]).item() == pytest.approx(0.9, abs=1e-6)


def test_global_cosine_is_layout_blind() -> None:
    """NHWC features take the view path (no copies): same loss and gradients as NCHW, and mixed layouts too."""
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, 8, 6, 5, generator=g), torch.randn(3, 16, 3, 3, generator=g)]
    s = [torch.randn(3, 8, 6, 5, generator=g), torch.randn(3, 16, 3, 3, generator=g)]
    grads = []
    for tl, sl in ((False, False), (True, True), (True, False)):
        tt = [x.contiguous(memory_format=torch.channels_last) if tl else x for x in t]
        ss = [x.detach().contiguous(memory_format=torch.channels_last if sl else torch.contiguous_format)
              .requires_grad_() for x in s]
        loss = global_cosine_loss(tt, ss)
        loss.backward()
        grads.append((loss.detach(), [x.grad for x in ss]))
    for loss, gs in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0])
        for a, b in zip(gs, grads[0][1]):
            torch.testing.assert_close(a, b)
