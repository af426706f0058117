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
