"""Pose normalisation (kdad.align, data.align): the pose, the warp and its inverse, the config keys, and every
path (fit, evaluate, predict, ONNX) seeing the same aligned images."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdad.align import (
    ENVELOPE_SHARE,
    AlignedModel,
    AlignedRunner,
    AlignSpec,
    PartRegionModel,
    align_images,
    decode_mask,
    encode_mask,
    foreground,
    inverse,
    part_envelope,
    pose_spread,
    poses,
    restrict_to_part,
    unwarp_maps,
    warp,
)
from kdad.blocks.maps import AnomalyOutput
from kdad.config import load_config
from kdad.errors import ConfigError


def part(angle_deg: float, shift: tuple[float, float] = (0.0, 0.0), side: int = 128, seed: int = 0) -> torch.Tensor:
    """(3, side, side) in [0, 1]: a dark shaft with a wider head at one end (a screw seen from the side) on a light
    backdrop with grain, turned by `angle_deg` about its centre, which is moved by `shift` pixels (x, y)."""
    a = math.radians(angle_deg)
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    cx, cy = (side - 1) / 2 + shift[0], (side - 1) / 2 + shift[1]
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)  # along the part
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    shaft = (np.abs(v) < 4) & (u > -34) & (u < 26)
    head = (np.abs(v) < 10) & (u >= 26) & (u < 34)
    rng = np.random.default_rng(seed)
    g = np.where(shaft | head, 0.35, 0.8) + rng.normal(0, 0.01, (side, side))
    return torch.from_numpy(np.clip(g, 0, 1)).float().expand(3, side, side).clone()


def test_foreground_is_the_part() -> None:
    x = part(30)[None]
    fg = foreground(x)[0]
    dark = x[0, 0] < 0.6
    assert (fg == dark).float().mean() > 0.98


@pytest.mark.parametrize("angle", [0, 45, 100, 170, 220, 300])
def test_every_pose_comes_out_the_same(angle: float) -> None:
    spec = AlignSpec(1.0)
    moved = part(angle, (9.0, -7.0), seed=1)
    ref, _ = align_images(part(0)[None], spec)
    got, _ = align_images(moved[None], spec)

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        da, db = a[..., 0, :, :] < 0.6, b[..., 0, :, :] < 0.6
        return ((da & db).sum() / (da | db).sum()).item()

    assert iou(moved, part(0)) < 0.5  # as taken: another place and angle
    assert iou(got, ref) > 0.85  # aligned: the same part in the same place, its head on the same side


def test_uneven_light_and_dust_do_not_move_the_pose() -> None:
    """Light falling off by 0.25 towards the corners and dust on the backdrop: a constant backdrop level made the
    Otsu cut split lit from unlit backdrop (benchmarks/align_lighting.py), and specks pulled the moments."""
    yy, xx = np.mgrid[:128, :128]
    falloff = torch.from_numpy(0.25 * 2 * ((xx / 127 - 0.5) ** 2 + (yy / 127 - 0.5) ** 2)).float()
    dust = torch.zeros(128, 128)
    for y, x in ((10, 15), (110, 30), (20, 100), (100, 110), (64, 8)):
        dust[y - 2:y + 2, x - 2:x + 2] = 0.5  # dark dirt, 4 px
    spec = AlignSpec(1.0)
    for angle in (20.0, 135.0, 250.0):
        even = part(angle, (6.0, -4.0), seed=2)[None]
        lit = (even - falloff - dust).clamp(0, 1)
        fg = foreground(lit)[0]
        assert (fg == (even[0, 0] < 0.6)).float().mean() > 0.99 and not fg[dust > 0].any()  # the part alone
        assert torch.allclose(poses(lit, spec), poses(even, spec), atol=0.02)


def test_zoom_enlarges_the_part_about_its_centre() -> None:
    x = part(60, (5.0, 3.0))[None]
    one, _ = align_images(x, AlignSpec(1.0))
    two, _ = align_images(x, AlignSpec(2.0))
    area = lambda im: (im[0, 0] < 0.6).float().sum().item()  # noqa: E731
    assert area(two) == pytest.approx(4 * area(one), rel=0.15)


def test_unwarp_undoes_the_warp_where_the_view_saw_the_image() -> None:
    x = part(75, (6.0, -4.0))[None]
    smooth = F.avg_pool2d(torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0)), 9, 1, 4)
    for zoom in (1.0, 1.5):
        _, theta = align_images(x, AlignSpec(zoom))
        back = unwarp_maps(warp(smooth, theta), theta)
        grid = F.affine_grid(inverse(theta), [1, 1, 128, 128], align_corners=False)
        seen = (grid.abs() <= 1).all(-1)[:, None]
        assert seen.float().mean() > (0.7 if zoom == 1.0 else 0.3)
        assert (back - smooth).abs()[seen].max() < 0.05
        assert torch.equal(back[~seen], torch.full_like(back[~seen], warp(smooth, theta).min().item()))


def test_a_blank_image_keeps_its_frame() -> None:
    x = torch.full((1, 3, 64, 64), 0.5)
    out, theta = align_images(x, AlignSpec(1.0))
    assert torch.allclose(theta, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), atol=1e-6)
    assert torch.allclose(out, x)


@pytest.mark.parametrize(("overrides", "match"), [
    (["data.align=pca"], "data.align: 'pca' is not one of"),
    (["data.align=axis", "data.align_zoom=0"], "data.align_zoom"),
    (["data.align=axis", "data.tiling=true"], "data.align and data.tiling"),
    (["data.align=axis", "data.format=loco"], "data.align.*loco"),
    (["data.align=axis", "data.align_region=middle"], "data.align_region"),
])
def test_bad_alignment_settings_name_their_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, None, overrides)


class Stripes(nn.Module):
    """A stand-in detector that sees orientation: the map is the vertical grey-level gradient, so a part lying
    horizontally (aligned) and one at an angle give different maps."""

    def forward(self, images01: torch.Tensor) -> AnomalyOutput:
        g = images01.mean(1, keepdim=True)
        amap = (g[:, :, 1:] - g[:, :, :-1]).abs()
        amap = F.pad(amap, (0, 0, 0, 1))
        return AnomalyOutput(amap, amap.flatten(1).amax(1))


def test_aligned_model_and_runner_agree_and_map_back_onto_the_image() -> None:
    x = torch.stack([part(35, (4.0, 2.0)), part(200, (-6.0, 5.0), seed=3)])
    spec = AlignSpec(1.2)
    out = AlignedModel(Stripes(), spec)(x)
    inner = Stripes()(align_images(x, spec)[0])
    assert torch.allclose(out.score, inner.score) and not torch.allclose(out.score, Stripes()(x).score)
    assert out.anomaly_map.shape == x[:, :1].shape

    from tests.fakes import FakeRunner

    runner = AlignedRunner(FakeRunner(Stripes(), 128), spec)
    maps, scores = runner(x)
    assert np.allclose(maps, out.anomaly_map[:, 0].numpy(), atol=1e-6) and np.allclose(scores, out.score.numpy())
    assert runner.info()["align"]["zoom"] == 1.2 and runner.image_threshold == 0.5
    # the map is in the image's frame: its high values lie on the part's outline, not on the aligned one's
    edge = maps[0] > 0.2
    dark = x[0, 0].numpy() < 0.6
    near = F.max_pool2d(torch.from_numpy(dark).float()[None, None], 5, 1, 2)[0, 0].numpy() > 0
    assert edge.any() and near[edge].mean() > 0.95


class Dusty(nn.Module):
    """Stripes plus a high blob in the aligned frame's top-left corner, on the backdrop: dust that outscores
    everything on the part unless the map is kept on the part (data.align_region=part)."""

    def forward(self, images01: torch.Tensor) -> AnomalyOutput:
        amap = Stripes()(images01).anomaly_map.clone()
        amap[:, :, 2:8, 2:8] = 5.0
        return AnomalyOutput(amap, amap.flatten(1).amax(1))


def test_the_envelope_covers_the_parts_and_restricting_keeps_only_it() -> None:
    x = torch.stack([part(a, (3.0 * i, -2.0 * i), seed=i) for i, a in enumerate((10, 80, 150, 220, 290))])
    spec = AlignSpec(1.0)
    env = part_envelope(x, spec)
    parts = foreground(align_images(x, spec)[0])
    assert parts[0][env].float().mean() > 0.9 and parts.any(0)[env].all()  # what lies in it is part
    assert parts.float().mean(0)[~env].max() < ENVELOPE_SHARE  # what it leaves out is not, in enough images
    assert torch.equal(decode_mask(encode_mask(env)), env) and len(encode_mask(env)) < 400
    assert part_envelope(torch.full_like(x, 0.8), spec).all()  # no part found: the whole frame
    amap = torch.zeros(1, 1, 128, 128)
    amap[..., 2:8, 2:8] = 5.0  # dust in the corner
    amap[..., 64, 60] = 0.5  # a defect on the shaft
    kept = restrict_to_part(amap, env)
    assert float(kept.max()) == 0.5 and float(kept.min()) == 0.0
    small = restrict_to_part(F.avg_pool2d(amap, 2), env)  # a map of another size: the envelope is resized
    assert float(small.max()) < 1
    with pytest.raises(ConfigError, match="data.align_envelope"):
        decode_mask("64x64:not base64!")


def test_the_part_region_scores_model_and_runner_alike_and_ignores_the_dust() -> None:
    x = torch.stack([part(35, (4.0, 2.0)), part(200, (-6.0, 5.0), seed=3)])
    frame = AlignSpec(1.2)
    on_part = AlignSpec(1.2, "part", encode_mask(part_envelope(x, frame)))
    assert torch.allclose(AlignedModel(Dusty(), frame)(x).score, torch.full((2,), 5.0))
    out = AlignedModel(Dusty(), on_part)(x)
    aligned = align_images(x, on_part)[0]
    want = PartRegionModel(Stripes(), decode_mask(on_part.envelope))(aligned).score
    assert torch.allclose(out.score, want) and bool((out.score < 1).all())
    assert float(out.anomaly_map.max()) < 1  # no dust painted on the map either

    from tests.fakes import FakeRunner

    runner = AlignedRunner(FakeRunner(Dusty(), 128), on_part)
    maps, scores = runner(x)
    assert np.allclose(maps, out.anomaly_map[:, 0].numpy(), atol=1e-6) and np.allclose(scores, out.score.numpy())
    assert runner.info()["align"]["region"] == "part"
    assert AlignSpec.from_dict(runner.info()["align"]) == on_part
    assert AlignSpec.from_dict({"zoom": 1.2}) == frame  # metadata written before data.align_region


def test_crossfit_scores_with_the_part_region() -> None:
    from torch.utils.data import Dataset

    from kdad.train import crossfit_scores

    x = torch.stack([part(a, seed=i) for i, a in enumerate((20, 110, 200, 290))])

    class Normals(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": x[i], "label": 0, "mask": torch.zeros(1, 128, 128), "path": f"{i}.png",
                    "defect_type": "good"}

    env = part_envelope(x, AlignSpec(1.0))
    def no_stats(*_: object) -> None:
        return None

    whole, _ = crossfit_scores(no_stats, Dusty(), Normals(), torch.device("cpu"), 2, 0)
    kept, maps = crossfit_scores(no_stats, Dusty(), Normals(), torch.device("cpu"), 2, 0,
                                 PartRegionModel(Dusty(), env))
    assert np.allclose(whole, 5.0) and (kept < 1).all() and maps.max() < 1


def test_fit_measures_the_envelope_and_calibrates_on_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdad.train
    from kdad.config import load_config
    from tests.fakes import tiny_run

    seen: dict[str, object] = {}
    real_thresholds, real_crossfit = kdad.train.thresholds_from_normals, kdad.train.crossfit_scores

    def thresholds(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        seen["thresholds"] = model
        return real_thresholds(model, *args, **kwargs)  # type: ignore[arg-type]

    def crossfit(*args: object) -> object:
        seen["crossfit"] = args[-1]  # `scored`, what scores each half
        return real_crossfit(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kdad.train, "thresholds_from_normals", thresholds)
    monkeypatch.setattr(kdad.train, "crossfit_scores", crossfit)
    with pytest.raises(ConfigError, match="resolved by kdad fit"):
        AlignSpec.from_data(load_config(None, None, ["data.align=axis", "data.align_region=part"]).data)
    # rd_cpu divides by the held-out normals' mean map, so with 4 of them fit cross-fits their scores too
    run = tiny_run(tmp_path, "rd_cpu", 8, 1, ["data.align=axis", "data.align_fill=0", "data.align_region=part",
                                                "train.max_iters=1", "train.epochs=1", "train.val_fraction=0.5"])
    assert isinstance(seen["thresholds"], PartRegionModel) and isinstance(seen["crossfit"], PartRegionModel)
    from kdad.deploy.runner import make_runner

    env = decode_mask(load_config(None, [str(run / "config.yaml")], []).data.align_envelope)
    assert env.shape == (64, 64) and 0 < env.float().mean() < 0.5
    torch_runner = make_runner(run, None, device="cpu")
    assert torch_runner.info()["align"]["region"] == "part"
    if importlib.util.find_spec("onnxruntime") is None:
        return
    from kdad.data.transforms import load_image
    from kdad.export import export_onnx

    export_onnx(run)
    onnx_runner = make_runner(run, "onnx")
    assert AlignSpec.from_dict(onnx_runner.info()["align"]).envelope_mask().equal(env)  # type: ignore[union-attr]
    images = torch.stack([load_image(p, 64) for p in sorted((tmp_path / "d").rglob("test/*/*.png"))])
    (m1, s1), (m2, s2) = onnx_runner(images), torch_runner(images)
    assert np.allclose(s1, s2, atol=1e-4) and np.allclose(m1, m2, atol=1e-4)


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fakes import tiny_run

    return tiny_run(tmp_path_factory.mktemp("align"), "rd_cpu", 8, 2,
                    ["data.align=axis", "data.align_zoom=1.25", "data.align_fill=0", "data.align_region=frame",
                     "train.max_iters=2",
                     "train.epochs=1", "train.gate=true"])


def test_fit_evaluate_and_predict_see_aligned_images(aligned_run: Path, tmp_path: Path) -> None:
    from kdad.checkpoint import load_bundle, model_from_bundle
    from kdad.data.transforms import load_image
    from kdad.deploy.runner import make_runner
    from kdad.evaluate import evaluate_run

    bundle = load_bundle(aligned_run / "model.ckpt")
    assert bundle.get("gate") is None  # the gate would see unaligned service images: none is stored
    result = evaluate_run(aligned_run, report=False)
    assert result["align"]["zoom"] == 1.25 and "pose-aligned" in result["protocol"]
    rows = (aligned_run / "scores.csv").read_text().splitlines()[1:]
    paths = [r.split(",")[1] for r in rows]
    scored = {r.split(",")[1]: float(r.split(",")[4]) for r in rows}
    runner = make_runner(aligned_run, None, device="cpu")
    assert isinstance(runner, AlignedRunner)
    images = torch.stack([load_image(p, 64) for p in paths])
    _, scores = runner(images)
    assert np.allclose(scores, [scored[p] for p in paths], atol=1e-4)
    model, _ = model_from_bundle(bundle)
    with torch.inference_mode():
        inner = model(align_images(images, AlignSpec(1.25))[0]).score.numpy()
        raw = model(images).score.numpy()
    assert np.allclose(scores, inner, atol=1e-4) and not np.allclose(scores, raw, atol=1e-4)


def test_onnx_export_records_the_alignment_and_its_runner_aligns(aligned_run: Path) -> None:
    pytest.importorskip("onnxruntime")
    from kdad.data.transforms import load_image
    from kdad.deploy.runner import make_runner
    from kdad.export import export_onnx

    export_onnx(aligned_run)
    meta = json.loads((aligned_run / "model.json").read_text())
    assert meta["align"]["zoom"] == 1.25
    onnx_runner = make_runner(aligned_run, "onnx")
    torch_runner = make_runner(aligned_run, None, device="cpu")
    assert isinstance(onnx_runner, AlignedRunner)
    paths = sorted((aligned_run.parent / "d").rglob("test/*/*.png"))[:3]
    images = torch.stack([load_image(p, 64) for p in paths])
    (m1, s1), (m2, s2) = onnx_runner(images), torch_runner(images)
    assert np.allclose(s1, s2, atol=1e-4) and np.allclose(m1, m2, atol=1e-4)


def test_the_service_aligns_what_it_receives(aligned_run: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from kdad.data.transforms import load_image
    from kdad.deploy.runner import TorchRunner, make_runner
    from kdad.serve import create_app

    path = sorted((aligned_run.parent / "d").rglob("test/*/*.png"))[0]
    body = TestClient(create_app(TorchRunner(aligned_run, device="cpu"))).post(
        "/predict", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
    _, scores = make_runner(aligned_run, None, device="cpu")(load_image(path, 64)[None])
    assert abs(body["score"] - float(scores[0])) <= 1e-5


def test_the_training_loader_hands_out_aligned_images(tmp_path: Path) -> None:
    """fit's DataLoader fetches batches through a dataset's __getitems__ when it has one (a Subset does): the
    aligned view must not let that reach the raw images."""
    from torch.utils.data import DataLoader

    from kdad.data.demo import make_demo_dataset
    from kdad.train import train_val_datasets

    demo = make_demo_dataset(tmp_path / "d", n_train=8, n_test_good=1, n_test_bad=1, size=64, kind="object")
    cfg = load_config("rd_cpu", [], [f"data.root={demo}", "data.image_size=64", "data.align=axis"])
    train, held_out, _ = train_val_datasets(cfg)
    from kdad.align import resolve_auto
    from kdad.data.factory import dataset_parts

    zoom = resolve_auto(cfg.data, [ds for _, ds in dataset_parts(cfg.data, "train")])[0].align_zoom
    assert zoom != 1.0  # rd_cpu's data.align_fill set it from the parts
    for ds in (train, held_out):
        got = next(iter(DataLoader(ds, batch_size=4)))["image"]
        raw = next(iter(DataLoader(ds.ds, batch_size=4)))["image"]  # type: ignore[union-attr]
        assert not torch.allclose(got, raw)
        assert torch.allclose(got, align_images(raw, AlignSpec(zoom))[0], atol=1e-6)


def _disc(seed: int, side: int = 128) -> torch.Tensor:
    """A round part with grain: its axis, if any, points anywhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    d = np.hypot(xx - side / 2, yy - side / 2) < 30 + rng.normal(0, 0.7, (side, side))
    return torch.from_numpy(np.where(d, 0.3, 0.8)).float().expand(3, side, side).clone()


def test_pose_spread_tells_parts_at_any_angle_from_aligned_parts_round_parts_and_textures() -> None:
    rng = np.random.default_rng(0)
    turned = torch.stack([part(float(a), tuple(rng.uniform(-10, 10, 2)), seed=i)
                          for i, a in enumerate(rng.uniform(0, 360, 12))])
    same = torch.stack([part(30 + float(rng.normal(0, 1)), seed=i) for i in range(12)])
    texture = torch.from_numpy(rng.uniform(0, 1, (12, 1, 128, 128))).float().expand(12, 3, 128, 128)
    spread = pose_spread(turned)
    assert spread.suggests_align() and spread.elongation > 3 and spread.axis_spread_deg > 30
    yy, xx = np.mgrid[:128, :128]
    vignette = torch.from_numpy(1 - 0.15 * (np.hypot(xx - 64, yy - 64) / 90) ** 2).float()
    assert pose_spread(turned * vignette).suggests_align()  # a lens's fall-off toward the corners is no part
    assert spread.border_share == 0 and spread.centre_spread_px > 5
    assert not pose_spread(same).suggests_align() and pose_spread(same).axis_spread_deg < 3  # lie the same way
    assert not pose_spread(torch.stack([_disc(i) for i in range(6)])).suggests_align()  # round: no axis
    assert not pose_spread(texture).suggests_align()  # foreground on the border: no single part
    assert pose_spread(turned[:0]).images == 0 and not pose_spread(turned[:0]).suggests_align()


def write_parts(category: Path, angles: list[float]) -> Path:
    """An MVTec-layout category of good parts at `angles` (train) and two test images; returns `category`."""
    from PIL import Image

    for split, n in (("train", len(angles)), ("test", 2)):
        for i in range(n):
            arr = (part(angles[i], seed=i)[0].numpy() * 255).astype(np.uint8)
            path = category / split / "good" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return category


ANY_ANGLE = [i * 37.0 for i in range(10)]


def test_data_check_hints_at_align_only_for_parts_at_varying_angles(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from kdad.cli import main

    write_parts(tmp_path / "any" / "screw", ANY_ANGLE)
    (tmp_path / "any" / "screw" / "train" / "good" / "bad.png").write_bytes(b"not an image")  # skipped by the hint
    assert main(["data", "check", str(tmp_path / "any")]) == 1
    out = capsys.readouterr().out
    assert "HINT    pose: category 'screw'" in out and "data.align=axis" in out and "bad.png" in out
    main(["data", "check", str(write_parts(tmp_path / "same" / "screw", [15.0] * 10).parent)])
    assert "HINT" not in capsys.readouterr().out


def test_auto_is_resolved_by_fit_from_the_training_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from kdad.align import resolve_auto
    from kdad.checkpoint import load_bundle
    from kdad.config import read_yaml
    from kdad.data.factory import dataset_parts
    from tests.fakes import TINY_RUN

    def cfg(root: Path, *more: str) -> object:
        return load_config("rd_cpu", [], [f"data.root={root}", *TINY_RUN, "data.align=auto", "train.max_iters=1",
                                          "train.epochs=1", *more])

    turned, same = write_parts(tmp_path / "turned", ANY_ANGLE), write_parts(tmp_path / "same", [15.0] * 10)
    c = cfg(turned)
    with pytest.raises(ConfigError, match="data.align=auto"):  # never read as a mode of a trained model
        AlignSpec.from_data(c.data)  # type: ignore[attr-defined]
    from kdad.cli import main

    run = tmp_path / "run"  # through the CLI, which says what fit picked
    assert main(["fit", "--preset", "rd_cpu", "--data", str(turned), "--out", str(run),
                 *(a for o in [*TINY_RUN, "data.align=auto", "train.max_iters=1", "train.epochs=1"]
                   for a in ("--set", o))]) == 0
    out = capsys.readouterr().out  # rd_cpu scores on the part (data.align_region: part)
    assert "data.align=auto chose axis" in out and "scored on the part's envelope" in out
    assert read_yaml(run / "config.yaml")["data"]["align"] == "axis"
    assert read_yaml(run / "config.yaml")["data"]["align_envelope"].startswith("64x64:")
    info = load_bundle(run / "model.ckpt")["train_info"]["align_auto"]
    assert info["chose"] == "axis" and info["images"] == 10 and info["elongation"] > 2  # the whole train split
    for root, more, want in ((same, [], "none"), (turned, ["data.tiling=true"], "none")):
        data = cfg(root, *more).data  # type: ignore[attr-defined]
        got, _ = resolve_auto(data, [ds for _, ds in dataset_parts(data, "train")])
        assert got.align == want and got.align_zoom == data.align_zoom
    fixed = dataclasses.replace(c.data, align="axis", align_fill=0.0)  # type: ignore[attr-defined]
    assert resolve_auto(fixed, []) == (fixed, None)  # nothing to resolve
    from kdad.align import AlignedImages
    from kdad.train import train_val_datasets

    train, held_out, _ = train_val_datasets(c)  # type: ignore[arg-type]  # a preset's config, never through fit
    assert isinstance(train, AlignedImages) and isinstance(held_out, AlignedImages)


def test_align_fill_sets_the_zoom_from_the_longest_part(tmp_path: Path) -> None:
    import dataclasses

    from kdad.align import resolve_auto
    from kdad.data.factory import dataset_parts
    from tests.fakes import TINY_RUN

    turned, same = write_parts(tmp_path / "turned", ANY_ANGLE), write_parts(tmp_path / "same", [15.0] * 10)
    spread = pose_spread(torch.stack([part(a) for a in ANY_ANGLE]))
    assert spread.length_share == pytest.approx(68 / 128, abs=0.03)  # the part: 68 px of a 128-px side
    halves = [F.pad(F.interpolate(part(a)[None], scale_factor=0.5, mode="area")[0], (32, 32, 32, 32), value=0.8)
              for a in ANY_ANGLE[:7]]  # the same part half as large, on the same backdrop
    mixed = pose_spread(torch.stack([*halves, *(part(a) for a in ANY_ANGLE[7:])]))
    assert mixed.length_share == pytest.approx(68 / 128, abs=0.03)  # the longest part sets it, not the typical one

    def resolved(root: Path, *more: str) -> object:
        data = load_config("rd_cpu", [], [f"data.root={root}", *TINY_RUN, *more]).data
        return resolve_auto(data, [ds for _, ds in dataset_parts(data, "train")])[0]

    for mode in ("auto", "axis"):
        got = resolved(turned, f"data.align={mode}", "data.align_fill=0.8")
        assert got.align == "axis" and got.align_fill == 0  # type: ignore[attr-defined]
        assert got.align_zoom == pytest.approx(0.8 * 128 / 68, abs=0.06)  # type: ignore[attr-defined]
        assert AlignSpec.from_data(got).zoom == got.align_zoom  # type: ignore[arg-type, union-attr, attr-defined]
    got = resolved(same, "data.align=auto", "data.align_fill=0.8")
    assert (got.align, got.align_zoom, got.align_fill) == ("none", 1.0, 0)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="data.align_fill=0"):  # a zoom asked for is never overwritten
        load_config("rd_cpu", [], ["data.align=axis", "data.align_zoom=1.3"])
    assert load_config("rd_cpu", [], ["data.align_zoom=1.3", "data.align_fill=0"]).data.align_zoom == 1.3
    unresolved = load_config("rd_cpu", [], ["data.align=axis", "data.align_fill=0.8"]).data
    with pytest.raises(ConfigError, match="align_fill"):  # a trained model's config has a zoom, not a fill
        AlignSpec.from_data(unresolved)
    with pytest.raises(ConfigError, match="data.align_fill=1.5"):
        load_config("rd_cpu", [], ["data.align_fill=1.5"])
    assert spread.zoom_for(0.8) == round(0.8 / spread.length_share, 2)
    assert dataclasses.replace(spread, length_share=0.0).zoom_for(0.8) == 1.0


def test_the_aligned_presets_score_on_the_part_as_chosen() -> None:
    """Which presets take the image score on the part's envelope (docs/quality.md, sessions 30-33): every aligned
    `*_cpu` preset; the paper presets keep the whole frame."""
    from kdad.config import list_presets, load_config

    part = {"rd_cpu", "cfrg_cpu", "dskd_cpu", "stfpm_cpu", "rdpp_cpu", "snl_cpu", "patchst_memory_cpu", "patchst_cpu",
            "urd_cpu", "bkd_cpu", "rd_multiclass_cpu"}
    assert {p for p in list_presets() if p.endswith("_cpu")} == part
    for preset in part:
        data = load_config(preset).data
        assert data.align == "auto" and data.align_region == "part", preset
    for preset in ("rd_paper", "bkd_paper"):
        assert load_config(preset).data.align_region == "frame", preset
