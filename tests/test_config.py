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
