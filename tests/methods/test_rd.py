"""RD: the loss form (official flattened cosine by default, the paper's per-position mean as an option)."""

from __future__ import annotations

import pytest
import torch

from kdad.blocks.losses import global_cosine_loss, pixel_cosine_loss
from kdad.config import from_dict, load_config
from kdad.errors import ConfigError
from kdad.methods import rd

TINY = {"backbone": "resnet18", "weights": "random"}


def _two_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened cosine 1/10 (loss 0.9) vs per-position mean 0.5 (see tests/blocks/test_ocbe_decoders.py)."""
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    return t, s


def test_default_loss_is_the_official_flattened_cosine() -> None:
    assert rd.Config().loss == "global"
    assert load_config("rd_paper").model["loss"] == "global"
    t, s = _two_positions()
    assert rd.rd_loss([t], [s]).item() == pytest.approx(0.9, abs=1e-6)
    assert rd.rd_loss([t], [s], "per_position").item() == pytest.approx(0.5, abs=1e-6)


def test_loss_option_is_validated_and_reachable_by_set() -> None:
    with pytest.raises(ConfigError, match="per_position"):
        rd.Config(loss="pixel")
    assert load_config("rd_paper", overrides=["model.loss=per_position"]).model["loss"] == "per_position"


@pytest.mark.parametrize(("form", "reference"), [("global", global_cosine_loss), ("per_position", pixel_cosine_loss)])
def test_train_step_minimises_the_configured_loss(form: str, reference: object) -> None:
    cfg = from_dict(rd.Config, {**TINY, "loss": form})
    torch.manual_seed(0)
    model = rd.Model(cfg).train()
    opts = rd.optimizers(model, cfg)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(*model.pairs(x))  # type: ignore[operator]
        other = (pixel_cosine_loss if form == "global" else global_cosine_loss)(*model.pairs(x))
    logs = rd.train_step(model, {"image": x}, opts, cfg, torch.Generator())
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["loss"]) != pytest.approx(float(other), rel=1e-3)


def test_rd_pool_reaches_loss_and_map() -> None:
    """model.pool averages teacher and student features before the loss and the map (1 = official form)."""
    from kdad.blocks.maps import pool_features
    from kdad.methods.rd import rd_loss

    torch.manual_seed(0)
    cfg = rd.Config(backbone="resnet18", weights="random", pool=3)
    model = rd.Model(cfg)
    x = torch.rand(2, 3, 64, 64)
    opt = {"student": torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)}
    logs = rd.train_step(model, {"image": x}, opt, cfg, torch.Generator())
    t, s = model.pairs(x)
    assert float(logs["loss"]) == pytest.approx(float(rd_loss(pool_features(t, 3), pool_features(s, 3), "global")),
                                                 rel=1e-5)
    assert float(logs["loss"]) != pytest.approx(float(rd_loss(t, s, "global")), rel=1e-3)
    assert model.head.pool == 3


@pytest.mark.parametrize("name", ["rd", "rdpp", "stfpm", "snl", "urd"])
def test_map_norm_is_validated_and_calibrates_only_when_set(name: str) -> None:
    from kdad.methods import get_method
    from kdad.methods.base import runs_calibration

    spec = get_method(name)
    with pytest.raises(ConfigError, match=r"map_norm: 'edge' is not one of \['none', 'position'\]"):
        from_dict(spec.Config, {**TINY, "map_norm": "edge"})
    with pytest.raises(ConfigError, match=rf"{name} model.map_norm='edge'"):
        spec.Config(map_norm="edge")
    assert not runs_calibration(spec, spec.Config())  # the papers' maps, unless asked
    cfg = from_dict(spec.Config, {**TINY, "map_norm": "position"})
    assert runs_calibration(spec, cfg)
    torch.manual_seed(0)
    model = spec.Model(cfg).eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    raw = model(x).anomaly_map
    assert spec.calibrate is not None
    spec.calibrate(model, [{"image": x}], torch.device("cpu"))
    torch.testing.assert_close(model(x).anomaly_map, raw / raw.mean(0, keepdim=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("shrink", "floor"), [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_rd_map_norm_shrink_and_floor_set_the_divisor(shrink: float, floor: float) -> None:
    """The divisor is the normals' mean map shrunk towards its global mean by map_norm_shrink, then held above
    map_norm_floor times that global mean; both options are range-checked."""
    from kdad.methods import get_method

    spec = get_method("rd")
    for key in ("map_norm_shrink", "map_norm_floor"):
        with pytest.raises(ConfigError, match=f"rd model.{key}=1.5"):
            spec.Config(**{key: 1.5})
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    cfg = {**TINY, "map_norm": "position", "map_norm_shrink": shrink, "map_norm_floor": floor}
    model = spec.Model(from_dict(spec.Config, cfg)).eval()
    raw = model(x).anomaly_map
    spec.calibrate(model, [{"image": x}], torch.device("cpu"))
    mean = raw.mean(0, keepdim=True)
    if floor:
        assert (mean < mean.mean()).any() and (mean > mean.mean()).any()  # the floor acts on some pixels
    divisor = ((1 - shrink) * mean + shrink * mean.mean()).clamp_min(floor * mean.mean())
    torch.testing.assert_close(model(x).anomaly_map, raw / divisor, rtol=1e-4, atol=1e-6)


def test_rd_cpu_divides_by_the_normals_mean_map_and_the_paper_presets_do_not() -> None:
    assert load_config("rd_cpu").model["map_norm"] == "position"
    for preset in ("rd_paper", "rdpp_cpu", "stfpm_cpu", "snl_cpu", "urd_cpu", "rd_demo", "rd_multiclass_cpu"):
        assert load_config(preset).model.get("map_norm", "none") == "none", preset


def test_rd_map_norm_shrink_auto_divides_by_the_chosen_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """map_norm_shrink: auto picks one of the candidates on synthetic anomalies (tests/blocks/test_map_choice.py
    for which), leaves its record for train_info.json and divides by the chosen candidate's divisor."""
    from kdad.blocks import map_choice
    from kdad.methods import get_method

    spec = get_method("rd")
    with pytest.raises(ConfigError, match="rd model.map_norm_shrink=often must be in"):
        spec.Config(map_norm_shrink="often")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="map_norm_shrink"):
        from_dict(spec.Config, {"map_norm_shrink": "often"})
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = spec.Model(from_dict(spec.Config, {**TINY, "map_norm": "position", "map_norm_shrink": "auto"})).eval()
    raw = model(x).anomaly_map
    mean = raw.mean(0, keepdim=True)
    loader = [{"image": x[:3]}, {"image": x[3:]}]
    spec.calibrate(model, loader, torch.device("cpu"))
    choice = model.map_norm_choice
    assert choice["shrink"] in map_choice.AUTO_SHRINKS and choice["normals"] == 6
    assert [float(s) for s in choice["candidates"]] == list(map_choice.AUTO_SHRINKS)
    # a later calibration (fit's cross-fitted halves, then all normals again) keeps the choice, choosing nothing
    monkeypatch.setattr(map_choice, "choose_shrink", lambda *a, **k: pytest.fail("chose again"))
    spec.calibrate(model, loader[:1], torch.device("cpu"))
    assert model.map_norm_choice == choice
    # whatever the choice, the divisor is that candidate's: pin it to one the random model would not pick
    del model.map_norm_choice
    monkeypatch.setattr(map_choice, "choose_shrink", lambda *a, **k: map_choice.ShrinkChoice(0.5))
    spec.calibrate(model, loader, torch.device("cpu"))
    assert model.map_norm_choice["shrink"] == 0.5
    torch.testing.assert_close(model(x).anomaly_map, raw / (0.5 * mean + 0.5 * mean.mean()), rtol=1e-4, atol=1e-6)
