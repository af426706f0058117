"""CFRG: losses on hand-checkable tensors, adapter / UNet shapes, the map composition, schedule and per-run state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdad.blocks.adapters import Adapter, AdapterSet
from kdad.blocks.unet import UNetHead
from kdad.config import from_dict, load_config
from kdad.errors import ConfigError
from kdad.methods import cfrg
from kdad.train import set_lr_factor

TINY = {"backbone": "resnet18", "weights": "random"}


def px(*values: float) -> torch.Tensor:
    """A one-pixel feature map (1, C, 1, 1)."""
    return torch.tensor(values).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def tiny_model() -> cfrg.Model:
    torch.manual_seed(0)
    return cfrg.Model(from_dict(cfrg.Config, TINY))


# ---- L_dis: normal pixels pull S onto T, anomalous pixels push cos(T, S) down, with no margin ----

@pytest.mark.parametrize(("student", "mask", "expected"), [
    ((1.0, 0.0), 0.0, 0.0),   # normal, S = T: d = 0
    ((1.0, 0.0), 1.0, 1.0),   # anomalous, S = T: 1 - d = 1
    ((0.0, 1.0), 0.0, 1.0),   # normal, orthogonal: d = 1
    ((0.0, 1.0), 1.0, 0.0),   # anomalous, orthogonal: 1 - d = 0
    ((-1.0, 0.0), 1.0, -1.0),  # anomalous, opposite: 1 - d = cos = -1 (no clamp, as the code)
    ((1.0, 1.0), 0.0, 1 - 1 / math.sqrt(2)),
])
def test_discrepancy_loss_one_pixel(student: tuple[float, float], mask: float, expected: float) -> None:
    loss = cfrg.discrepancy_loss([px(1.0, 0.0)], [px(*student)], torch.full((1, 1, 1, 1), mask))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_discrepancy_loss_upsamples_and_averages_layers() -> None:
    # layer 1: S orthogonal (d = 1); layer 2: S = T (d = 0). Mask 2x2 with one anomalous pixel of four.
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    t = [px(1.0, 0.0), px(0.0, 2.0)]
    s = [px(0.0, 3.0), px(0.0, 5.0)]
    # layer 1: mean(M * 0 + (1 - M) * 1) = 3/4; layer 2: mean(M * 1 + (1 - M) * 0) = 1/4; mean of layers = 1/2
    assert cfrg.discrepancy_loss(t, s, mask).item() == pytest.approx(0.5, abs=1e-6)


def test_segmentation_loss_is_bce_with_logits() -> None:
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])  # sigmoid: 1/2 and 3/4
    mask = torch.tensor([[[[1.0, 1.0]]]])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert cfrg.segmentation_loss(logits, mask).item() == pytest.approx(expected, abs=1e-6)


def test_recovery_loss_sums_layers_of_global_cosine() -> None:
    t = [px(1.0, 0.0), px(1.0, 1.0)]
    r = [px(0.0, 1.0), px(1.0, 1.0)]  # 1 - cos = 1, then 0
    assert cfrg.recovery_loss(t, r).item() == pytest.approx(1.0, abs=1e-6)
    t2 = [torch.cat([px(1.0, 0.0), px(1.0, 0.0)])]  # batch of 2: mean over samples
    r2 = [torch.cat([px(1.0, 0.0), px(0.0, 1.0)])]
    assert cfrg.recovery_loss(t2, r2).item() == pytest.approx(0.5, abs=1e-6)


def test_recovery_loss_is_flattened_not_per_position() -> None:
    """Two positions with unequal norms: flattened cosine 1/10 (loss 0.9), per-position mean 0.5."""
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)
    r = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    assert cfrg.recovery_loss([t], [r]).item() == pytest.approx(0.9, abs=1e-6)


def test_segmentation_inputs_weight_teacher_by_both_discrepancies() -> None:
    t, s, r = px(2.0, 0.0), px(0.0, 1.0), px(1.0, 1.0)  # 1 - cos(T, S) = 1, 1 - cos(T, R) = 1 - 1/sqrt(2)
    s.requires_grad_(True)
    (x,) = cfrg.segmentation_inputs([t], [s], [r])
    assert torch.allclose(x, t * (1 - 1 / math.sqrt(2)), atol=1e-6)
    x.sum().backward()  # not detached: L_seg also trains the student
    assert s.grad is not None and s.grad.abs().sum() > 0
    (zero,) = cfrg.segmentation_inputs([t], [t], [r])  # student equals teacher: no input
    assert zero.abs().max().item() < 1e-6


# ---- blocks ----

def test_adapter_structure_and_shapes() -> None:
    adapter = Adapter(24, 256)
    kinds = [type(m).__name__ for m in adapter.op]
    assert kinds == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Conv2d", "BatchNorm2d", "ReLU"]
    convs = [m for m in adapter.op if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [24, 1, 1, 1]
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1), (3, 3), (1, 1)]
    assert all(c.bias is None for c in convs)
    out = AdapterSet([24, 40, 112], [256, 512, 1024])(
        [torch.randn(2, 24, 16, 16), torch.randn(2, 40, 8, 8), torch.randn(2, 112, 4, 4)])
    assert [tuple(o.shape) for o in out] == [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4)]
    assert all((o >= 0).all() for o in out)


@pytest.mark.parametrize(("channels", "widths"), [((256, 512, 1024), [512, 256, 128, 64]),  # WRN50-2: official
                                                  ((24, 40, 112), [40, 24, 12, 6])])  # EfficientNet-Lite0
def test_unet_widths_and_shapes(channels: tuple[int, int, int], widths: list[int]) -> None:
    head = UNetHead(channels, first_stride=4)
    blocks = [*head.up_skip, *head.up_plain]
    assert [b.up.out_channels for b in blocks] == widths
    assert [(b.up.kernel_size, b.up.stride, b.up.padding) for b in blocks] == [((4, 4), (2, 2), (1, 1))] * 4
    assert head.final.in_channels == widths[-1] and head.final.out_channels == 1 and head.final.bias is not None
    c1, c2, c3 = channels
    logits = head([torch.randn(2, c1, 16, 16), torch.randn(2, c2, 8, 8), torch.randn(2, c3, 4, 4)])
    assert logits.shape == (2, 1, 64, 64)


# ---- model ----

def test_student_is_efficientnet_b0_from_scratch(tiny_model: cfrg.Model) -> None:
    assert tiny_model.student.feature_info.channels() == [24, 40, 112]
    assert tiny_model.student.feature_info.reduction() == [4, 8, 16]
    assert not any(p.requires_grad for p in tiny_model.teacher.parameters())
    student_params = {id(p) for m in (tiny_model.student, tiny_model.adapters, tiny_model.bottleneck,
                                      tiny_model.decoder, tiny_model.segmenter) for p in m.parameters()}
    opt_params = {id(p) for g in cfrg.optimizers(tiny_model, tiny_model.cfg)["cfrg"].param_groups for p in g["params"]}
    assert opt_params == student_params


def test_map_is_recovery_sum_plus_sigmoid_seg(tiny_model: cfrg.Model) -> None:
    tiny_model.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = tiny_model.branches(x)
        expected = torch.zeros(2, 1, 64, 64)
        for t, r in zip(out.teacher, out.recovered):
            d = 1 - torch.nn.functional.cosine_similarity(t, r, dim=1).unsqueeze(1)
            expected += torch.nn.functional.interpolate(d, size=(64, 64), mode="bilinear", align_corners=True)
        expected = tiny_model.blur(expected + torch.sigmoid(out.seg_logits))
        got = tiny_model(x)
    assert torch.allclose(got.anomaly_map, expected, atol=1e-5)
    assert torch.equal(got.score, got.anomaly_map.flatten(1).amax(1))


def test_student_strides_must_match_teacher() -> None:
    with pytest.raises(ConfigError, match="strides"):
        cfrg.Model(from_dict(cfrg.Config, {**TINY, "student_indices": [2, 3, 4]}))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="lr_unit"):
        cfrg.Config(lr_unit="iteration")
    with pytest.raises(ConfigError, match="model.synthesis"):
        cfrg.Config(synthesis={"nope": 1})
    syn = cfrg.Config().synthesis_config()
    assert (syn.kind, syn.beta_range, syn.foreground, syn.clean_prob) == ("perlin_texture", (0.2, 1.0), "none", 0.0)


# ---- schedule ----

def test_lr_schedule_by_epoch_from_paths(tiny_model: cfrg.Model) -> None:
    cfg = cfrg.Config(**TINY, lr_milestones=(2, 3))
    model = cfrg.Model(cfg)
    lrs = []
    for _epoch in range(4):
        for batch in (["a", "b"], ["c"]):  # 3 images per pass, shuffled order does not matter
            model.count_pass(batch)
            lrs.append(cfrg.scheduled_lr(model, cfg))
            model.steps_done += 1
    assert int(model.epochs_done) == 3
    assert lrs == pytest.approx([5e-4] * 4 + [1e-4] * 2 + [2e-5] * 2)
    model._pass_paths = set()  # as after a resume from last.ckpt: the next batch starts a new pass
    model.count_pass(["b"])
    assert int(model.epochs_done) == 4


def test_lr_schedule_by_step() -> None:
    cfg = cfrg.Config(**TINY, lr_unit="step", lr_milestones=(1, 2), lr_gamma=0.5)
    model = cfrg.Model(cfg)
    opts = cfrg.optimizers(model, cfg)
    model.train()
    batch = {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    lrs = [cfrg.train_step(model, batch, opts, cfg, torch.Generator().manual_seed(i))["lr"] for i in range(3)]
    assert lrs == pytest.approx([5e-4, 2.5e-4, 1.25e-4])
    assert opts["cfrg"].param_groups[0]["lr"] == pytest.approx(1.25e-4)
    assert cfrg.Model(cfg).steps_done.item() == 0  # a new model (the next category) starts a fresh schedule
    set_lr_factor(opts, 0.25)  # the engine's train.lr_decay_from factor composes with the method's milestones
    assert cfrg.train_step(model, batch, opts, cfg, torch.Generator().manual_seed(3))["lr"] == pytest.approx(3.125e-5)
    assert opts["cfrg"].param_groups[0]["lr"] == pytest.approx(3.125e-5)


def test_presets_load() -> None:
    paper = load_config("cfrg_paper")
    assert paper.method == "cfrg" and paper.train.batch_size == 32 and paper.train.epochs == 50
    assert paper.model["lr"] == pytest.approx(5e-4) and list(paper.model["lr_milestones"]) == [40, 45]
    cpu = load_config("cfrg_cpu")
    assert cpu.model["backbone"] == "efficientnet_lite0" and cpu.data.texture_dir == ""


def test_per_category_fit_runs_every_category(tmp_path: Path) -> None:
    """`kdad fit --categories A,B --per-category` trains both (the official script dies after the first),
    each with its own schedule, which decays after its own first pass over the data."""
    from kdad.cli import main
    from tests.fakes import make_threecad, solid_image

    root = make_threecad(tmp_path / "3CAD")
    for i in range(4):
        solid_image(tmp_path / "tex" / "banded" / f"banded_{i:04d}.jpg", (40, 40), 40 * i)
    out = tmp_path / "runs"
    args = ["fit", "--preset", "cfrg_cpu", "--categories", "ACC,CS", "--per-category", "--out", str(out),
            "--test"]
    for kv in ("data.format=3cad", f"data.root={root}", f"data.texture_dir={tmp_path / 'tex'}", "data.image_size=64",
               "model.backbone=resnet18", "model.weights=random", "model.lr_unit=epoch", "model.lr_milestones=[1]",
               "train.epochs=2", "train.max_iters=0", "train.batch_size=2", "train.val_fraction=0.0",
               "train.progress=false", "train.device=cpu"):
        args += ["--set", kv]
    assert main(args) == 0
    for category in ("ACC", "CS"):
        log = [json.loads(x) for x in (out / category / "train_log.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in log] == pytest.approx([5e-4, 1e-4]), category
        assert (out / category / "metrics.json").is_file()


def test_losses_resize_non_square_inputs_bilinearly_without_align_corners() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 4, 2, 3, generator=g), torch.randn(2, 4, 2, 3, generator=g)
    masks = (torch.rand(2, 1, 4, 8, generator=g) > 0.5).float()
    d = torch.nn.functional.interpolate(1 - torch.cosine_similarity(t, s, dim=1).unsqueeze(1), size=(4, 8),
                                        mode="bilinear", align_corners=False)
    want = (masks * (1 - d) + (1 - masks) * d).mean()
    assert float(cfrg.discrepancy_loss([t], [s], masks)) == pytest.approx(float(want), rel=1e-5)
    logits = torch.randn(2, 1, 2, 3, generator=g)
    up = torch.nn.functional.interpolate(logits, size=(4, 8), mode="bilinear", align_corners=False)
    assert float(cfrg.segmentation_loss(logits, masks)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(up, masks)), rel=1e-5)
