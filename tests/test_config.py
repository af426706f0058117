import pytest

from kdad.config import list_presets, load_config, parse_override
from kdad.errors import ConfigError


def test_precedence_defaults_preset_file_override(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train: {epochs: 7, batch_size: 4}\nmodel: {lr: 0.001}\n")
    cfg = load_config("rd_cpu", [str(f)], ["train.epochs=3"])
    assert cfg.method == "rd"
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 4
    assert cfg.model["lr"] == 0.001 and cfg.model["backbone"] == "efficientnet_lite0"
    assert list(cfg.model["betas"]) == [0.5, 0.999]


def test_unknown_key_names_path_and_valid_keys(tmp_path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"config\.train.*epoch.*valid keys"):
        load_config(None, [str(f)])
    with pytest.raises(ConfigError, match="model.*nonsense"):
        load_config("rd_cpu", [], ["model.nonsense=1"])


def test_wrong_type_and_unknown_method_and_preset() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, [], ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="valid methods"):
        load_config(None, [], ["method=nope"])
    with pytest.raises(ConfigError, match="valid presets"):
        load_config("nope")


def test_presets_all_validate() -> None:
    for name in list_presets():
        load_config(name)


def test_parse_override() -> None:
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_renamed_preset_loads_under_its_old_name_with_a_warning() -> None:
    from kdad.config import PRESET_ALIASES, to_dict

    assert PRESET_ALIASES["snl_paper"] == "snl_abstract"
    assert "snl_abstract" in list_presets() and "snl_paper" not in list_presets()
    with pytest.warns(FutureWarning, match="'snl_paper' is deprecated.*'snl_abstract'"):
        old = load_config("snl_paper")
    assert to_dict(old) == to_dict(load_config("snl_abstract"))


def test_new_preset_names_and_bases_load_without_a_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("snl_abstract")
        cpu = load_config("snl_cpu")  # its `base:` may still name the old preset: resolved silently
    assert cpu.method == "snl"


def test_set_overrides_reach_the_resolved_config_and_the_model() -> None:
    """Positive path of --set: nested keys of every section, YAML-typed values, last one wins."""
    from kdad.config import method_config
    from kdad.methods import get_method

    over = ["model.backbone=resnet18", "model.weights=random", "model.sigma=2.5", "model.betas=[0.9, 0.99]",
            "model.lr=0.01", "model.lr=0.002", "data.image_size=64", "train.threshold_quantile=0.9",
            "train.amp=false", "method=rd"]
    cfg = load_config("rd_cpu", [], over)
    assert cfg.method == "rd" and cfg.data.image_size == 64
    assert cfg.train.threshold_quantile == 0.9 and cfg.train.amp is False
    assert cfg.model["sigma"] == 2.5 and cfg.model["lr"] == 0.002 and list(cfg.model["betas"]) == [0.9, 0.99]
    spec = get_method("rd")
    mcfg = method_config(cfg)
    model = spec.Model(mcfg)
    assert model.head.blur.sigma == 2.5 and model.encoder.channels == [128, 256, 512]  # rd_cpu: layers 2-4
    group = spec.optimizers(model, mcfg)["student"].param_groups[0]
    assert group["lr"] == 0.002 and tuple(group["betas"]) == (0.9, 0.99)


@pytest.mark.parametrize(("override", "key", "choices"), [
    ("train.select=best", "train.select", "'last', 'val_map_mean'"),
    ("train.amp_dtype=fp8", "train.amp_dtype", "'bf16', 'fp16'"),
    ("train.pixel_threshold_rule=max", "train.pixel_threshold_rule", "'region', 'quantile'"),
    ("data.format=mvtech", "data.format", "'mvtec', 'loco', 'folder'"),
    ("model.fuse=max", "model.fuse", "'sum', 'mul'"),
])
def test_fixed_choice_keys_name_the_key_and_the_choices(override: str, key: str, choices: str) -> None:
    """A typo in a fixed-choice key is a ConfigError at load time, never a silent default or a raw ValueError."""
    with pytest.raises(ConfigError) as e:
        load_config("rd_cpu", None, [override])
    assert key in str(e.value) and choices in str(e.value)


def test_one_format_registry() -> None:
    """data.format, the loaders' error, `kdad data check` and docs/datasets.md all read kdad.formats."""
    import typing
    from pathlib import Path

    from kdad.config import DataConfig
    from kdad.data import check
    from kdad.formats import CHECKED_FORMATS, FORMATS, DataFormat

    assert typing.get_args(DataFormat) == tuple(FORMATS)
    assert typing.get_type_hints(DataConfig)["format"] == DataFormat
    assert check.FORMATS == CHECKED_FORMATS
    docs = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    missing = [name for name in FORMATS if f"`{name}`" not in docs]
    assert missing == [], f"docs/datasets.md does not describe {missing}"


def test_a_stored_config_with_a_removed_key_still_loads() -> None:
    from kdad.config import build_config, to_dict

    stored = to_dict(load_config("rd_cpu"))
    stored["train"]["select_on_test"] = False  # written by kdad before the key was removed
    assert to_dict(build_config(stored)) == to_dict(load_config("rd_cpu"))
    stored["train"]["select_on_test"] = True
    with pytest.raises(ConfigError, match="select_on_test"):
        build_config(stored)
