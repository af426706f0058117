"""bf16 on a CPU that only emulates it is refused softly: a warning that names the option."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from kdad import hardware


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return str(p)


def test_cpu_bf16_flags(tmp_path: Path) -> None:
    assert hardware.cpu_has_fast_bf16(_cpuinfo(tmp_path, "fpu sse avx avx2 fma")) is False
    assert hardware.cpu_has_fast_bf16(_cpuinfo(tmp_path, "avx2 avx512f avx512_bf16")) is True
    assert hardware.cpu_has_fast_bf16(_cpuinfo(tmp_path, "avx2 amx_bf16 amx_tile")) is True
    assert hardware.cpu_has_fast_bf16(str(tmp_path / "missing")) is None


def test_warning_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="train.cpu_bf16=true.*emulated"):
        hardware.warn_if_slow_cpu_bf16("train.cpu_bf16=true")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hardware.warn_if_slow_cpu_bf16("train.cpu_bf16=true")


@pytest.mark.parametrize("fast, expected", [(True, True), (False, False), (None, False)])
def test_auto_takes_bf16_only_with_hardware(monkeypatch: pytest.MonkeyPatch, fast: bool | None,
                                            expected: bool) -> None:
    import torch

    from kdad.config import load_config
    from kdad.train import autocast_dtype

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
    assert hardware.cpu_bf16_enabled("auto") is expected
    assert hardware.cpu_bf16_enabled(True) is True and hardware.cpu_bf16_enabled(False) is False
    for preset in ("rd_cpu", "snl_cpu", "patchst_cpu"):  # the presets that train in bf16 where it is fast
        tc = load_config(preset).train
        assert tc.cpu_bf16 == "auto"
        assert autocast_dtype(torch.device("cpu"), tc) is (torch.bfloat16 if expected else None)
    forced = load_config("rd_cpu", overrides=["train.cpu_bf16=true"]).train
    assert autocast_dtype(torch.device("cpu"), forced) is torch.bfloat16


def test_cpu_bf16_refuses_other_words() -> None:
    from kdad.config import load_config
    from kdad.errors import ConfigError

    with pytest.raises(ConfigError, match="train.cpu_bf16"):
        load_config("rd_cpu", overrides=["train.cpu_bf16=maybe"])
