"""URD: losses pinned to eqs. 1-6 on hand-checkable tensors, GII (Algorithm 1), expert/teacher roles, config."""

import math

import pytest
import torch

from kdad.config import from_dict, load_config
from kdad.errors import ConfigError
from kdad.methods import urd
from kdad.synthesis import BETA_RANGE_CODE, BETA_RANGE_PAPER, TextureBank

TINY = {"backbone": "resnet18", "weights": "random"}


def px(*values: float) -> torch.Tensor:
    """A one-pixel feature map (1, C, 1, 1)."""
    return torch.tensor(values).view(1, -1, 1, 1)


def test_teacher_loss_one_pixel_mask_0_and_1() -> None:
    e_n = [px(1.0, 0.0)]
    t_n = [px(1.0, 1.0)]  # D^n = 1 - 1/sqrt(2)
    t_a = [px(0.0, 1.0)]  # D^a = 1 (orthogonal to the expert's normal feature)
    d_n = 1 - 1 / math.sqrt(2)
    # mask 1 (anomalous pixel): |D^a - 1| = 0; mask 0: |D^a - 0| = 1
    assert urd.teacher_loss(t_n, t_a, e_n, [px(1.0)]).item() == pytest.approx(d_n, abs=1e-6)
    assert urd.teacher_loss(t_n, t_a, e_n, [px(0.0)]).item() == pytest.approx(d_n + 1, abs=1e-6)
    # the official code's extra global term 1 - cos(vec T(I_a), vec E(I_a)); here E(I_a) = (1, 1): 1 - 1/sqrt(2)
    official = urd.teacher_loss(t_n, t_a, e_n, [px(1.0)], e_a=[px(1.0, 1.0)])
    assert official.item() == pytest.approx(2 * d_n, abs=1e-6)


def test_teacher_loss_sums_layers_and_averages_pixels() -> None:
    e = torch.zeros(1, 2, 1, 2)
    e[:, 0] = 1.0  # expert (1, 0) at both pixels
    t_a = e.clone()
    t_a[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # second pixel orthogonal: D^a = (0, 1)
    mask = torch.tensor([[[[0.0, 1.0]]]])
    assert urd.teacher_loss([e], [t_a], [e], [mask]).item() == pytest.approx(0.0, abs=1e-6)
    # |0-1|, |1-0|: 1 per layer
    assert urd.teacher_loss([e, e], [t_a, t_a], [e, e], [1 - mask, 1 - mask]).item() == pytest.approx(2.0, abs=1e-6)


def test_layer_masks_resample_from_full_mask() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1.0
    m4, m2 = urd.layer_masks(mask, [(4, 4), (2, 2)])
    assert m4.shape == (1, 1, 4, 4) and set(m4.unique().tolist()) <= {0.0, 1.0}
    assert m2.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_student_loss_eqs_4_to_6() -> None:
    t_n, e_n = [px(1.0, 0.0)], [px(1.0, 0.0)]
    s_n, s_a = [px(2.0, 0.0)], [px(0.0, 3.0)]  # cos 1 -> 0, cos 0 -> 1
    assert urd.student_loss(s_n, s_a, t_n, e_n).item() == pytest.approx(2.0, abs=1e-6)  # L_ST + L_SE
    assert urd.student_loss(s_n, s_a, t_n, None).item() == pytest.approx(1.0, abs=1e-6)  # no expert: L_ST
    # the target is the *normal* feature, never T(I_a): S(T(I_a)) == T(I_n) costs nothing
    assert urd.student_loss(s_n, [px(1.0, 0.0)], t_n, e_n).item() == pytest.approx(0.0, abs=1e-6)


def test_student_loss_is_flattened_not_per_position() -> None:
    """Two positions with unequal norms: flattened cosine 1/10 (loss 0.9), per-position mean 0.5."""
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    assert urd.student_loss([s], [t], [t], None).item() == pytest.approx(0.9, abs=1e-6)
    assert urd.student_loss([s], [s], [t], [t]).item() == pytest.approx(3.6, abs=1e-6)


def _gii_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 4, 8, 8, generator=g), torch.rand(2, 6, 4, 4, generator=g), torch.rand(2, 6, 4, 4, generator=g)


def test_gii_sim_one_is_plain_skip_injection() -> None:
    torch.manual_seed(0)
    gii = urd.GII(4, 6, "gii").eval()
    skip = urd.GII(4, 6, "wogii").eval()
    skip.load_state_dict({k: v for k, v in gii.state_dict().items() if not k.startswith("ssa.")})
    gii.ssa = torch.nn.Identity()  # with Sim = 1 the SSA input is F_Fuse; drop its conv to compare with SC
    t_lo, t_hi, s = _gii_inputs(0)
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(gii(t_lo, t_hi, s, sim=ones), skip(t_lo, t_hi, s), atol=1e-6)


def test_gii_sim_zero_injects_nothing_from_teacher() -> None:
    torch.manual_seed(0)
    gii = urd.GII(4, 6, "gii").eval()
    t_lo, t_hi, s = _gii_inputs(0)
    t_lo2, t_hi2, _ = _gii_inputs(1)
    zeros = torch.zeros(2, 1, 4, 4)
    assert torch.equal(gii(t_lo, t_hi, s, sim=zeros), gii(t_lo2, t_hi2, s, sim=zeros))
    assert not torch.allclose(gii(t_lo, t_hi, s), gii(t_lo2, t_hi2, s))  # SA does let the teacher in


def test_gii_similarity_is_channel_cosine_without_gradient() -> None:
    t_hi = torch.rand(2, 6, 4, 4, requires_grad=True)
    s = torch.rand(2, 6, 4, 4, requires_grad=True)
    sim = urd.GII.sim(t_hi, s)
    assert sim.shape == (2, 1, 4, 4) and not sim.requires_grad
    assert torch.allclose(sim, torch.nn.functional.cosine_similarity(t_hi, s, dim=1).unsqueeze(1))
    torch.manual_seed(0)
    sc = urd.GII(4, 6, "gii", "SC").eval()
    t_lo, t_hi2, s2 = _gii_inputs(2)
    assert torch.equal(sc(t_lo, t_hi2, s2), sc(t_lo, t_hi2, s2, sim=torch.ones(2, 1, 4, 4)))


def _batch(n: int = 2, size: int = 32) -> dict:
    return {"image": torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5)),
            "mask": torch.zeros(n, 1, size, size)}


def test_expert_frozen_teacher_trained_from_expert_init() -> None:
    cfg = from_dict(urd.Config, TINY)
    torch.manual_seed(0)
    model = urd.Model(cfg)
    assert model.expert is not None
    assert all(torch.equal(a, b) for a, b in zip(model.expert.state_dict().values(),
                                                 model.teacher.state_dict().values()))
    assert not any(p.requires_grad for p in model.expert.parameters())
    expert_before = {k: v.clone() for k, v in model.expert.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opts = urd.optimizers(model, cfg)
    assert set(opts) == {"student", "teacher"} and opts["teacher"].param_groups[0]["lr"] == 1e-4
    model.train()
    logs = urd.train_step(model, _batch(), opts, cfg, torch.Generator().manual_seed(0))
    assert {"loss_teacher", "loss_student", "loss"} <= set(logs)
    assert all(torch.equal(expert_before[k], v) for k, v in model.expert.state_dict().items())
    assert any(not torch.equal(teacher_before[k], v) for k, v in model.teacher.state_dict().items())


def test_without_expert_teacher_is_frozen() -> None:
    cfg = from_dict(urd.Config, {**TINY, "expert": False, "injection": "none"})
    model = urd.Model(cfg)
    assert model.expert is None and len(model.gii) == 0
    opts = urd.optimizers(model, cfg)
    assert set(opts) == {"student"}
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    logs = urd.train_step(model, _batch(), opts, cfg, torch.Generator().manual_seed(0))
    assert "loss_teacher" not in logs
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())


def test_visa_categories_synthesise_on_the_foreground_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VisA batch gets URD's VisA foreground (GrabCut): the anomaly mask stays inside it. GrabCut is stubbed
    (left half = foreground) so the test needs no OpenCV; cfrg, whose code has no foreground, is unrestricted."""
    calls = []

    def left_half(images: torch.Tensor, method: str, *args: object) -> torch.Tensor:
        calls.append(method)
        fg = torch.zeros(images.shape[0], 1, *images.shape[2:])
        fg[..., : images.shape[-1] // 2] = 1.0
        return fg

    monkeypatch.setattr(urd, "compute_foreground", left_half)
    cfg = from_dict(urd.Config, TINY)
    assert cfg.synthesis_config().foreground_method("pcb1") == "grabcut"
    model = urd.Model(cfg)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = {"image": images, "category": "pcb1", "path": [f"{i}.JPG" for i in range(4)]}
    _, masks = urd._synthesize(model, batch, cfg, torch.Generator().manual_seed(0))
    assert calls == ["grabcut"]
    assert masks[..., :16].sum() > 0 and masks[..., 16:].sum() == 0

    from kdad.methods import cfrg

    assert cfrg.SYNTHESIS.foreground_method("pcb1") == "none"


def test_textures_from_batch_and_cached_foreground() -> None:
    cfg = from_dict(urd.Config, {**TINY, "injection": "wogii", "synthesis": {"foreground": "otsu"}})
    model = urd.Model(cfg)
    batch = _batch()
    batch["textures"] = TextureBank.from_tensor(torch.rand(3, 3, 32, 32))
    batch["category"], batch["path"] = "capsule", ["a.png", "b.png"]
    model.train()
    urd.train_step(model, batch, urd.optimizers(model, cfg), cfg, torch.Generator().manual_seed(0))
    assert set(model._foreground) == {"a.png", "b.png"}
    model.eval()
    with torch.inference_mode():
        out = model(batch["image"])
    assert out.anomaly_map.shape == (2, 1, 32, 32)


def test_config_validation_and_synthesis_overrides() -> None:
    with pytest.raises(ConfigError, match="injection"):
        urd.Config(injection="skip")
    with pytest.raises(ConfigError, match="similarity"):
        urd.Config(similarity="sa")
    with pytest.raises(ConfigError, match="perlin_texture"):
        urd.Config(synthesis={"kind": "simplex"})
    with pytest.raises(ConfigError, match="model.synthesis"):
        urd.Config(synthesis={"nonsense": 1})
    assert urd.Config().synthesis_config().beta_range == BETA_RANGE_PAPER
    partial = urd.Config(synthesis={"foreground": "none"}).synthesis_config()
    assert partial.beta_range == BETA_RANGE_PAPER and partial.kind == "perlin_texture"


def test_presets() -> None:
    paper, official, cpu = load_config("urd_paper"), load_config("urd_official"), load_config("urd_cpu")
    assert paper.model["injection"] == "gii" and paper.train.max_iters == 10000 and paper.train.batch_size == 16
    assert paper.model["backbone"] == "wide_resnet50_2"
    assert official.model["injection"] == "wogii" and official.model["teacher_loss"] == "official"
    assert tuple(official.model["synthesis"]["beta_range"]) == BETA_RANGE_CODE
    assert cpu.model["backbone"] == "efficientnet_lite0" and cpu.data.texture_dir == ""


def test_layer_masks_align_corners_and_strict_threshold() -> None:
    m = torch.zeros(1, 1, 3, 3)
    m[0, 0, :, 1] = 1.0  # a middle column: 3 -> 5 with align_corners puts exactly 0.5 beside it (0.4 without)
    middle = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).expand(5, 5)
    assert torch.equal(urd.layer_masks(m, [(5, 5)])[0][0, 0], middle)  # 0.5 is not above 0.5
    wide = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]).expand(5, 5)
    assert torch.equal(urd.layer_masks(m, [(5, 5)], 0.45)[0][0, 0], wide)
