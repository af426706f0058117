"""DSKD: the contextual affinity loss on tiny tensors, every Config switch, calibration (eq. 8), LOCO end to end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from kdad.config import from_dict, load_config
from kdad.methods import dskd, get_method

TINY = {"backbone": "resnet18", "weights": "random"}


def test_identical_student_and_teacher_give_zero_loss() -> None:
    t = torch.randn(2, 8, 5, 4, generator=torch.Generator().manual_seed(0))
    assert float(dskd.contextual_affinity_loss([t, t], [t.clone(), t.clone()])) == pytest.approx(0.0, abs=1e-5)
    assert float(dskd.contextual_affinity_map(t, 3.0 * t).abs().max()) < 1e-5  # cosine: scale does not matter


def test_position_swapped_student_is_penalised() -> None:
    t = torch.randn(1, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    s = t.flatten(2).clone()
    s[..., [0, 4]] = s[..., [4, 0]]  # two positions exchanged: every vector is still a "normal" teacher vector
    kl = dskd.contextual_affinity_map(t, s.view_as(t)).flatten()
    assert kl[0] > 1e-3 and kl[4] > 1e-3
    assert float(kl[[1, 2, 3, 5, 6, 7, 8]].abs().max()) < 1e-5  # untouched positions match exactly


def test_hand_checked_two_positions() -> None:
    # teacher f1 = (1, 0), f2 = (0, 1); student s1 = (0, 1) (wrong), s2 = (0, 1) (right).
    # P_T,1 = softmax(1, 0) = (p, 1-p), p = e/(e+1); P_S,1 = softmax(0, 1) = (1-p, p);
    # KL_1 = p log(p/(1-p)) + (1-p) log((1-p)/p) = 2p - 1 = (e-1)/(e+1); KL_2 = 0.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    kl = dskd.contextual_affinity_map(t, s).flatten()
    assert float(kl[0]) == pytest.approx((math.e - 1) / (math.e + 1), rel=1e-6)
    assert float(kl[1]) == pytest.approx(0.0, abs=1e-7)
    assert float(dskd.contextual_affinity_loss([t], [s])) == pytest.approx((math.e - 1) / (2 * (math.e + 1)), rel=1e-6)
    # temperature T = 2: logits halve, log(p/(1-p)) = 1/2, KL_1 = T^2 (2p - 1) / 2 with p = e^0.5 / (e^0.5 + 1)
    p = math.exp(0.5) / (math.exp(0.5) + 1)
    assert float(dskd.contextual_affinity_map(t, s, temperature=2.0).flatten()[0]) == pytest.approx(4 * (2 * p - 1) / 2)


def test_hand_checked_asymmetric_case_fixes_the_kl_direction() -> None:
    # teacher f1 = (1, 0), f2 = (0, 1); student s1 = (1, 1) (halfway), s2 = (0, 1) (right).
    # P_T,1 = softmax(1, 0) = (p, 1-p), p = e/(e+1); P_S,1 = softmax(1/sqrt2, 1/sqrt2) = (1/2, 1/2).
    # KL(P_T || P_S) = log 2 + p log p + (1-p) log(1-p) = 0.1109 (eq. 6), while the reverse direction
    # KL(P_S || P_T) = -log 2 - (log p + log(1-p))/2 = 0.1202: this case tells the two apart.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    p = math.e / (math.e + 1)
    forward = math.log(2) + p * math.log(p) + (1 - p) * math.log(1 - p)
    reverse = -math.log(2) - (math.log(p) + math.log(1 - p)) / 2
    assert reverse - forward > 5e-3
    kl = dskd.contextual_affinity_map(t, s).flatten()
    assert float(kl[0]) == pytest.approx(forward, rel=1e-5)
    assert float(kl[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(dskd.contextual_affinity_loss([t], [s])) == pytest.approx(forward / 2, rel=1e-5)


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 64])
def test_chunked_equals_unchunked_values_and_grads(chunk: int) -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 6, 4, 5, generator=g)
    s0 = torch.randn(2, 6, 4, 5, generator=g)
    grads, values = [], []
    for c in (40, chunk):  # 40 = all rows of both images at once (chunk counts rows over the batch)
        s = s0.clone().requires_grad_(True)
        loss = dskd.contextual_affinity_loss([t], [s], 0.5, chunk=c)
        loss.backward()
        values.append(loss.detach())
        grads.append(s.grad)
    assert torch.allclose(values[0], values[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


SWITCHES = [
    {},
    {"students": "local"}, {"students": "global"},
    {"students": "local", "loc_loss": "ca"}, {"students": "global", "glo_loss": "pi"},
    {"loc_loss": "pi", "glo_loss": "pi"}, {"loc_loss": "ca", "glo_loss": "ca"},
    {"gccb_channels": 0}, {"gccb_channels": 512}, {"gccb_channels": 768, "gccb_grid": 2},
    {"glo_stage_init": "random", "temperature": 2.0, "affinity_chunk": 5},
    {"decoder_blocks": [1, 1, 1], "sigma": 0.0},
]


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_switch_builds_trains_and_scores(overrides: dict) -> None:
    cfg = from_dict(dskd.Config, {**TINY, **overrides})
    torch.manual_seed(0)
    model = dskd.Model(cfg)
    opts = dskd.optimizers(model, cfg)
    assert set(opts) == set(model.students)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.train()
    logs = dskd.train_step(model, {"image": x}, opts, cfg, torch.Generator())
    assert all(math.isfinite(v) for v in logs.values()) and {f"loss_{s}" for s in model.students} <= set(logs)
    model.eval()
    with torch.inference_mode():
        out = model(x)
        maps = model.student_maps(x)
    assert out.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(out.anomaly_map).all()
    assert set(maps) == set(model.students)


def test_gccb_variants() -> None:
    same = dskd.GCCB(512, 512, 8)  # Table 6, g = C (2048 for WRN50-2): no 1x1 convs
    assert isinstance(same.reduce, nn.Identity) and isinstance(same.expand, nn.Identity)
    block = dskd.GCCB(64, 32, 4)
    x = torch.randn(2, 64, 6, 6)
    assert block.vector(x).shape == (2, 32) and block(x).shape == x.shape
    model = dskd.Model(from_dict(dskd.Config, {**TINY, "gccb_channels": 0}))
    assert isinstance(model.gccb, nn.Identity)


def test_global_student_uses_teacher_next_stage() -> None:
    stage, channels = dskd.next_stage("efficientnet_lite0", (1, 2, 3), "random")
    assert channels == 320 and stage(torch.randn(1, 112, 8, 8)).shape == (1, 320, 4, 4)
    stage, channels = dskd.next_stage("resnet18", (1, 2, 3), "random")
    assert channels == 512 and stage(torch.randn(1, 256, 8, 8)).shape == (1, 512, 4, 4)


def test_bad_switch_names_the_option() -> None:
    from kdad.errors import ConfigError

    with pytest.raises(ConfigError, match="glo_loss"):
        dskd.Model(from_dict(dskd.Config, {**TINY, "glo_loss": "kl"}))
    with pytest.raises(ConfigError, match="layers"):
        dskd.Model(from_dict(dskd.Config, {**TINY, "layers": [1, 2]}))


def test_calibrate_normalises_each_student_and_is_saved() -> None:
    cfg = from_dict(dskd.Config, TINY)
    torch.manual_seed(0)
    model = dskd.Model(cfg).eval()
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    loader = DataLoader([{"image": im} for im in images], batch_size=4)
    get_method("dskd").calibrate(model, loader, torch.device("cpu"))  # type: ignore[misc]
    with torch.inference_mode():
        maps = model.student_maps(images)
    for m in maps.values():
        assert float(m.mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(m.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    state = model.state_dict()
    assert "map_mean" in state and "map_std" in state and float(state["map_std"].min()) > 0
    clone = dskd.Model(cfg)
    clone.load_state_dict(state)
    assert torch.equal(clone.map_mean, model.map_mean)


def test_paper_defaults() -> None:
    cfg = dskd.Config()
    assert (cfg.backbone, cfg.lr, cfg.betas, cfg.gccb_channels, cfg.temperature) == ("wide_resnet50_2", 0.005,
                                                                                      (0.5, 0.999), 1024, 1.0)
    assert (cfg.loc_loss, cfg.glo_loss, cfg.students) == ("pi", "ca", "both")
    assert dataclasses.is_dataclass(cfg)


def test_loco_end_to_end_fit_calibrate_evaluate(tmp_path: Path) -> None:
    from kdad.data.loco import write_toy_loco
    from kdad.evaluate import evaluate_run
    from kdad.train import fit

    root = write_toy_loco(tmp_path / "discs", size=64, n_train=4, n_validation=3, n_test=(3, 3, 2))
    cfg = load_config(None, None, ["method=dskd", f"data.root={root}", "data.format=loco", "data.image_size=64",
                                   "data.val_split=validation", "model.backbone=resnet18", "model.weights=random",
                                   "train.max_iters=2", "train.batch_size=2", "train.device=cpu",
                                   "train.progress=false", "train.epochs=5"])
    run = fit(cfg, tmp_path / "run")
    res = evaluate_run(run, device="cpu", report=False)
    m = res["metrics"]
    for key in ("au_spro_structural@0.05", "au_spro_logical@0.05", "au_spro_mean@0.3", "au_spro_mean@1",
                "image_auroc_logical", "image_auroc_structural", "image_auroc_mean"):
        assert 0.0 <= m[key] <= 1.0, key
    from kdad.checkpoint import load_bundle

    state = load_bundle(run / "model.ckpt")["model"]
    assert not torch.equal(state["map_std"], torch.ones(2))  # calibrated on LOCO validation normals


def test_matches_direct_kl_of_eqs_3_to_6() -> None:
    g = torch.Generator().manual_seed(5)
    t, s = torch.randn(2, 16, 6, 6, generator=g), torch.randn(2, 16, 6, 6, generator=g)
    for temperature in (0.1, 1.0, 4.0):
        tn = torch.nn.functional.normalize(t.flatten(2), dim=1).double()
        sn = torch.nn.functional.normalize(s.flatten(2), dim=1).double()
        log_pt = torch.log_softmax(tn.transpose(1, 2) @ tn / temperature, -1)  # eqs. 3-4
        log_ps = torch.log_softmax(sn.transpose(1, 2) @ tn / temperature, -1)  # eq. 5
        kl = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # eq. 6
        got = dskd.contextual_affinity_map(t, s, temperature, chunk=5).flatten(1).double()
        assert torch.allclose(got, kl, atol=1e-4 * max(1.0, temperature**2), rtol=1e-4)


def test_affinity_map_is_float32_under_autocast_and_keeps_the_map_shape() -> None:
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(2, 8, 3, 5, generator=g), torch.randn(2, 8, 3, 5, generator=g)
    want = dskd.contextual_affinity_map(t, s, 0.5)
    assert want.shape == (2, 1, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dskd.contextual_affinity_map(t, s, 0.5)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def direct_kl_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], temperature: float) -> float:
    """Eq. 7 written out: sum over layers of the mean over (B, i) of T^2 KL(P_T,i || P_S,i), float64."""
    total = 0.0
    for t, s in zip(teacher, student):
        tn = torch.nn.functional.normalize(t.flatten(2).double(), dim=1)
        sn = torch.nn.functional.normalize(s.flatten(2).double(), dim=1)
        log_pt = torch.log_softmax(tn.transpose(1, 2) @ tn / temperature, -1)
        log_ps = torch.log_softmax(sn.transpose(1, 2) @ tn / temperature, -1)
        total += float(temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean())
    return total


@pytest.mark.parametrize(("loc", "glo"), [("pi", "ca"), ("ca", "pi"), ("ca", "ca")])
def test_student_loss_follows_each_students_loss_kind(loc: str, glo: str) -> None:
    # no backbone: student_loss only reads the model's config (loss kinds, temperature, chunk)
    cfg = dskd.Config(loc_loss=loc, glo_loss=glo, temperature=0.4, affinity_chunk=3)
    model = type("StandIn", (), {"cfg": cfg, "loss_kind": dskd.Model.loss_kind})()
    g = torch.Generator().manual_seed(9)
    teacher = [torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    student = [t + 0.8 * torch.randn(t.shape, generator=g) for t in teacher]
    pixel = sum(float((1 - torch.nn.functional.cosine_similarity(t.double(), s.double(), dim=1)).mean())
                for t, s in zip(teacher, student))
    want = {"pi": pixel, "ca": direct_kl_loss(teacher, student, 0.4)}
    assert abs(want["ca"] - direct_kl_loss(student, teacher, 0.4)) > 1e-2  # the KL direction shows
    assert abs(want["ca"] - direct_kl_loss(teacher, student, 1.0)) > 1e-2  # and the temperature
    for name, kind in (("local", loc), ("global", glo)):
        got = dskd.student_loss(model, name, teacher, student)  # type: ignore[arg-type]
        assert float(got) == pytest.approx(want[kind], rel=1e-5)
