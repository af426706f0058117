"""The engine: fit, checkpoints (atomic, weights_only), resume, held-out selection, thresholds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdad.checkpoint import atomic_torch_save, load_bundle, model_from_bundle
from kdad.cli import main
from kdad.config import PRESET_ALIASES, list_presets, load_config, to_dict
from kdad.data.demo import make_demo_dataset
from kdad.errors import ConfigError, KdadError
from kdad.evaluate import evaluate_run, predict
from kdad.methods import get_method
from kdad.train import (
    _check_cuda_graph,
    _mean_logs,
    _to_device,
    autocast_dtype,
    check_precision,
    fit,
    lr_factor,
    train_val_datasets,
)

TINY = ["model.backbone=resnet18", "model.weights=random", "data.image_size=64", "train.batch_size=4",
        "train.progress=false", "train.eval_batch_size=8"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "d", n_train=12, n_test_good=4, n_test_bad=4,
                             size=64, kind="object")


def test_fit_writes_bundle_and_loads_weights_only(demo_root: Path, tmp_path: Path) -> None:
    cfg = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.epochs=2", *TINY])
    run = fit(cfg, tmp_path / "run")
    for name in ("config.yaml", "last.ckpt", "model.ckpt", "train_log.jsonl", "train_info.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries
    raw = torch.load(run / "model.ckpt", weights_only=True)
    assert raw["method"] == "rd" and raw["thresholds"]["image"] > 0
    model, cfg2 = model_from_bundle(load_bundle(run))
    assert cfg2.train.epochs == 2
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    result = evaluate_run(run, report=False)
    assert set(result["metrics"]) >= {"image_auroc", "pixel_auroc", "au_pro"}
    assert (run / "scores.csv").is_file()
    # the default pixel threshold is the region rule: its min area is stored and applied to the good test images
    assert raw["thresholds"]["min_area"] == 16 and "region" in raw["thresholds"]["source"]
    flagged = result["good_images_flagged"]
    assert flagged["n_good"] == 4 and flagged["min_area"] == 16 and 0.0 <= flagged["rate"] <= 1.0


def test_resume_continues_from_last_checkpoint(demo_root: Path, tmp_path: Path) -> None:
    cfg = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.epochs=1", *TINY])
    run = fit(cfg, tmp_path / "run")
    cfg2 = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.epochs=3", *TINY])
    fit(cfg2, run, resume=True)
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]


def test_resume_matches_uninterrupted_run(demo_root: Path, tmp_path: Path) -> None:
    over = [f"data.root={demo_root}", *TINY, "train.val_fraction=0"]
    full = fit(load_config("rd_cpu", [], over + ["train.epochs=2"]), tmp_path / "full")
    part = fit(load_config("rd_cpu", [], over + ["train.epochs=1"]), tmp_path / "part")
    fit(load_config("rd_cpu", [], over + ["train.epochs=2"]), part, resume=True)
    a = load_bundle(full)["model"]
    b = load_bundle(part)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_augmented_training_changes_the_weights_and_resumes_bit_identically(demo_root: Path, tmp_path: Path) -> None:
    over = [f"data.root={demo_root}", *TINY, "train.val_fraction=0"]
    aug = ["train.augment=[hflip,rot90,rotate]", "train.augment_angle=30"]
    plain = load_bundle(fit(load_config("rd_cpu", [], over + ["train.epochs=1"]), tmp_path / "plain"))["model"]
    full = fit(load_config("rd_cpu", [], over + aug + ["train.epochs=2"]), tmp_path / "full")
    part = fit(load_config("rd_cpu", [], over + aug + ["train.epochs=1"]), tmp_path / "part")
    one = load_bundle(part)["model"]
    assert any(not torch.equal(plain[k], one[k]) for k in plain if plain[k].is_floating_point())
    fit(load_config("rd_cpu", [], over + aug + ["train.epochs=2"]), part, resume=True)
    a, b = load_bundle(full)["model"], load_bundle(part)["model"]
    for k in a:  # the augmentation draws come from the checkpointed generator
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    with pytest.raises(ConfigError, match="train.augment"):
        fit(load_config("rd_cpu", [], over + ["train.augment=[shear]"]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_lr_factor_is_flat_then_a_half_cosine_that_ends_above_zero() -> None:
    assert [lr_factor(e, 10, 1.0) for e in range(10)] == [1.0] * 10
    f = [lr_factor(e, 10, 0.8) for e in range(10)]
    assert f[:8] == [1.0] * 8 and 1.0 > f[8] > f[9] > 0.0
    assert f[8] == pytest.approx(0.75) and f[9] == pytest.approx(0.25)  # cos(pi/3), cos(2 pi/3) on 3 steps
    g = [lr_factor(e, 5, 0.0) for e in range(5)]
    assert all(a > b for a, b in zip(g, g[1:])) and g[0] < 1.0


def test_lr_decay_changes_training_and_resumes_a_crashed_run_bit_identically(
        demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rate is a function of the epoch, so a run killed inside the decay and resumed ends on the weights
    and optimizer rates of one that was not."""
    import kdad.train as train_mod

    over = [f"data.root={demo_root}", *TINY, "train.val_fraction=0", "train.epochs=3"]
    # epoch 0 at the full rate, epochs 1-2 at 0.75 and 0.25 of it: the crash below comes after a checkpoint
    # whose rate is already decayed, so a resume that took that rate as the configured one would fail
    decay = over + ["train.lr_decay_from=0.34"]
    flat = load_bundle(fit(load_config("rd_cpu", [], over + ["train.lr_decay_from=1"]), tmp_path / "flat")
                       / "last.ckpt")
    full = load_bundle(fit(load_config("rd_cpu", [], decay), tmp_path / "full") / "last.ckpt")
    assert any(not torch.equal(flat["model"][k], full["model"][k]) for k in flat["model"])
    lr0 = load_config("rd_cpu", [], over).model["lr"]
    groups = full["train_state"]["optimizers"]["student"]["param_groups"]
    assert all(g["lr"] == pytest.approx(lr0 * 0.25) and g["base_lr"] == lr0 for g in groups)
    assert flat["train_state"]["optimizers"]["student"]["param_groups"][0]["lr"] == lr0

    real = train_mod.lr_factor

    def crash_at_epoch_2(epoch: int, total: int, decay_from: float) -> float:
        if epoch == 2:
            raise RuntimeError("killed")
        return real(epoch, total, decay_from)

    monkeypatch.setattr(train_mod, "lr_factor", crash_at_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        fit(load_config("rd_cpu", [], decay), tmp_path / "part")
    monkeypatch.setattr(train_mod, "lr_factor", real)
    part = load_bundle(fit(load_config("rd_cpu", [], decay), tmp_path / "part", resume=True) / "last.ckpt")
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k
    assert part["train_state"]["optimizers"]["student"]["param_groups"] == groups
    with pytest.raises(ConfigError, match="train.lr_decay_from"):
        load_config("rd_cpu", [], over + ["train.lr_decay_from=1.5"])


def test_resume_refuses_a_changed_contract_before_writing(demo_root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    over = [f"data.root={demo_root}", "train.epochs=1", *TINY]
    run = fit(load_config("rd_cpu", [], over), tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "last.ckpt", "train_log.jsonl")}
    with pytest.raises(ConfigError, match=r"method: 'rd' -> 'stfpm'"):
        fit(load_config("stfpm_cpu", [], over), run, resume=True)
    with pytest.raises(ConfigError, match=r"data.image_size: 64 -> 32; model.lr: 0.005 -> 0.5"):
        fit(load_config("rd_cpu", [], over + ["model.lr=0.5", "data.image_size=32"]), run, resume=True)
    args = ["fit", "--preset", "stfpm_cpu", "--out", str(run), "--resume", *(x for o in over for x in ("--set", o))]
    assert main(args) == 2  # one clear line, no state_dict traceback
    assert "cannot resume" in capsys.readouterr().err
    assert before == {name: (run / name).read_bytes() for name in before}  # nothing rewritten
    fit(load_config("rd_cpu", [], [*over[:-len(TINY)], *TINY, "train.epochs=2", "train.device=cpu"]), run,
        resume=True)  # the budget and the device may change


def test_resume_clears_a_crashed_runs_leftovers(demo_root: Path, tmp_path: Path) -> None:
    over = [f"data.root={demo_root}", *TINY]
    run = fit(load_config("rd_cpu", [], over + ["train.epochs=2", "train.ckpt_every=1"]), tmp_path / "run")
    # a crash in epoch 2 after its log line, inside the checkpoint write, then a line cut short:
    (run / ".last.ckpt.k2j4x9.tmp").write_bytes(b"")
    with open(run / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "iters": 9, "loss": 0.1}) + "\n" + '{"epoch": 3, "it')
    fit(load_config("rd_cpu", [], over + ["train.epochs=3"]), run, resume=True)
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert not list(run.glob(".*.tmp"))


def test_atomic_torch_save_fsyncs_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_torch_save({"w": torch.ones(3)}, tmp_path / "x.ckpt")
    assert events == ["fsync", "replace"]
    assert torch.equal(torch.load(tmp_path / "x.ckpt", weights_only=True)["w"], torch.ones(3))


def test_held_out_selection_keeps_best_epoch(demo_root: Path, tmp_path: Path) -> None:
    over = [f"data.root={demo_root}", "train.epochs=3", "train.val_fraction=0.25", "train.select=val_map_mean",
            "method=stfpm", "model.lr=0.01"]
    cfg = load_config("stfpm_cpu", [], over + TINY)
    run = fit(cfg, tmp_path / "run")
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    best_epoch = min(log, key=lambda r: r["val_map_mean"])["epoch"]
    info = json.loads((run / "train_info.json").read_text())
    assert info["selected_epoch"] == best_epoch
    assert (run / "best.ckpt").is_file()


def test_val_fraction_too_large_is_an_error(demo_root: Path, tmp_path: Path) -> None:
    cfg = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.val_fraction=1.0", *TINY])
    with pytest.raises(KdadError, match="val_fraction"):
        fit(cfg, tmp_path / "run")


def test_fit_trains_on_the_configured_threads_and_restores_torchs_count(demo_root: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.epochs=1", "train.threads=1", *TINY])
        run = fit(cfg, tmp_path / "run")
        assert torch.get_num_threads() == 2  # the caller's count is back
    finally:
        torch.set_num_threads(before)
    assert json.loads((run / "train_info.json").read_text())["cpu_threads"] == 1  # the run's count is recorded
    with pytest.raises(ConfigError, match="train.threads=-1"):
        load_config("rd_cpu", [], [f"data.root={demo_root}", "train.threads=-1", *TINY])


def test_cpu_threads_zero_keeps_torchs_count_and_a_failing_block_restores_it() -> None:
    from kdad.hardware import cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_threads(0):
            assert torch.get_num_threads() == 2  # 0 (the default) leaves the caller's count alone
        with pytest.raises(RuntimeError, match="boom"), cpu_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2  # restored although the block failed
    finally:
        torch.set_num_threads(before)


def test_corrupt_checkpoint_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(KdadError, match="model.ckpt"):
        load_bundle(bad)


def test_cpu_bf16_training_runs_and_keeps_fp32_weights(demo_root: Path, tmp_path: Path) -> None:
    cfg = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.epochs=1", "train.cpu_bf16=true", *TINY])
    run = fit(cfg, tmp_path / "run")
    state = load_bundle(run)["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)
    info = json.loads((run / "train_info.json").read_text())  # the speed levers fit() used are recorded
    assert info["channels_last"] is True and info["fused_optimizers"] == 1 and "heap_allocator" in info
    assert info["autocast"] == "bfloat16"  # the precision it trained in, whatever train.cpu_bf16 said


def test_cuda_graph_option_is_refused_where_it_cannot_work(demo_root: Path, tmp_path: Path) -> None:
    # rd_cpu decays its rate, which a captured step cannot follow: pinned flat so the device checks are what is asked
    cfg = load_config("rd_cpu", [], [f"data.root={demo_root}", "train.cuda_graph=true", "train.device=cpu",
                                     "train.lr_decay_from=1", *TINY])
    with pytest.raises(ConfigError, match="train.cuda_graph"):
        fit(cfg, tmp_path / "run")
    tc, cuda = cfg.train, torch.device("cuda")  # the checks need no GPU to be asked
    with pytest.raises(ConfigError, match="dskd"):
        _check_cuda_graph(tc, get_method("dskd"), cuda, False)
    with pytest.raises(ConfigError, match="single-GPU"):
        _check_cuda_graph(tc, get_method("rd"), cuda, True)
    _check_cuda_graph(tc, get_method("stfpm"), cuda, False)
    with pytest.raises(ConfigError, match="lr_decay_from"):
        _check_cuda_graph(load_config("rd_cpu", [], [f"data.root={demo_root}", "train.lr_decay_from=0.8"]).train,
                          get_method("rd"), cuda, False)


def test_step_logs_are_read_once_per_epoch() -> None:
    logs = [{"loss": torch.tensor(1.0), "lr": 0.1}, {"loss": torch.tensor(3.0), "lr": 0.3}]
    assert _mean_logs(logs) == pytest.approx({"loss": 2.0, "lr": 0.2})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_fit_captures_once_and_trains(demo_root: Path, tmp_path: Path) -> None:
    over = [f"data.root={demo_root}", "train.epochs=2", "train.device=cuda", "train.lr_decay_from=1", *TINY]
    graphed = fit(load_config("rd_cpu", [], [*over, "train.cuda_graph=true"]), tmp_path / "graph")
    info = json.loads((graphed / "train_info.json").read_text())
    assert info["cuda_graph"] == {"captures": 1, "eager_steps": 3}  # 12 images / batch 4 = 3 steps per epoch
    eager = fit(load_config("rd_cpu", [], over), tmp_path / "eager")
    logs = [[json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]
            for run in (eager, graphed)]
    assert logs[1] == pytest.approx(logs[0], rel=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_moves_to_the_device_in_the_training_layout(channels_last: bool) -> None:
    batch = {"image": torch.rand(2, 3, 8, 8), "mask": torch.zeros(2, 1, 8, 8), "path": ["a", "b"]}
    out = _to_device(batch, torch.device("cpu"), channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out["image"].is_contiguous(memory_format=fmt) and torch.equal(out["image"], batch["image"])
    assert out["mask"] is batch["mask"] and out["path"] == ["a", "b"]


# the precision each paper preset trains in on a GPU: the official code's (REFERENCE §3); fp32 where there is none
PAPER_PRECISION = {"rd_paper": "fp32", "rd_multiclass_mvtec": "fp32", "rdpp_paper": "fp32", "urd_paper": "fp32",
                   "urd_official": "fp32", "stfpm_paper": "fp32", "cfrg_paper": "fp16", "dskd_paper": "fp32",
                   "bkd_paper": "fp32", "snl_abstract": "fp32"}
_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def test_paper_presets_train_in_the_official_precision() -> None:
    paper = {n for n in list_presets() if n.endswith(("_paper", "_official"))} | set(PRESET_ALIASES.values())
    assert paper <= set(PAPER_PRECISION), "pin the precision of every paper preset here"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # the resolution needs no GPU to be asked
    for name, want in PAPER_PRECISION.items():
        cfg = load_config(name)
        assert _NAMES[autocast_dtype(cuda, cfg.train)] == want, name
        assert autocast_dtype(cpu, cfg.train) is None, name
        check_precision(cfg.train, get_method(cfg.method))
    # bf16 stays an option, and is the engine's default outside the paper presets
    assert autocast_dtype(cuda, load_config("rd_paper", [], ["train.amp=true"]).train) is torch.bfloat16
    assert autocast_dtype(cuda, load_config("cfrg_paper", [], ["train.amp_dtype=bf16"]).train) is torch.bfloat16
    assert autocast_dtype(cuda, load_config("rd_cpu").train) is torch.bfloat16


def test_fp16_is_refused_where_the_step_takes_no_loss_scaler() -> None:
    tc = load_config("cfrg_paper").train
    with pytest.raises(ConfigError, match=r"train.amp_dtype=fp16.*'urd'.*cfrg"):
        check_precision(tc, get_method("urd"))
    with pytest.raises(ConfigError, match="amp_dtype"):
        check_precision(load_config("rd_cpu", [], ["train.amp_dtype=fp8"]).train, get_method("rd"))
    with pytest.raises(ConfigError, match="cuda_graph"):
        check_precision(load_config("rd_cpu", [], ["train.amp_dtype=fp16", "train.cuda_graph=true"]).train,
                        get_method("rd"))
    check_precision(load_config("urd_paper", [], ["train.amp_dtype=fp16"]).train, get_method("urd"))  # amp off


class RecordingScaler:
    """A GradScaler stand-in: records the calls and scales by 1 (so the step equals the unscaled one)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.calls.append("scale")
        return loss * 1.0

    def step(self, opt: torch.optim.Optimizer) -> None:
        self.calls.append("step")
        opt.step()

    def update(self) -> None:
        self.calls.append("update")


@pytest.mark.parametrize("name", ["rd", "stfpm", "cfrg"])
def test_fp16_steps_go_through_the_grad_scaler(name: str) -> None:
    spec = get_method(name)
    assert spec.grad_scaler
    from kdad.config import from_dict

    cfg = from_dict(spec.Config, {"backbone": "resnet18", "weights": "random"})
    torch.manual_seed(0)
    model = spec.Model(cfg).train()
    opts = spec.optimizers(model, cfg)
    scaler = RecordingScaler()
    batch = {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "grad_scaler": scaler}
    spec.train_step(model, batch, opts, cfg, torch.Generator().manual_seed(0))
    assert scaler.calls == ["scale", "step", "update"]


def test_thresholds_use_the_configured_quantiles_of_held_out_normals(demo_root: Path, tmp_path: Path) -> None:
    """A non-default train.threshold_quantile is what model.ckpt's image threshold is the quantile of."""
    over = [f"data.root={demo_root}", "train.epochs=1", *TINY, "train.val_fraction=0.5", "model.sigma=0",
            "train.threshold_quantile=0.5", "train.pixel_threshold_quantile=0.75", "train.amp=false",
            "train.pixel_threshold_rule=quantile", "train.image_threshold_rule=quantile",
            "model.map_norm=none"]  # in-sample scores: no cross-fitted calibration (tested on its own)
    cfg = load_config("rd_cpu", [], over)
    run = fit(cfg, tmp_path / "run")
    bundle = load_bundle(run)
    model, cfg2 = model_from_bundle(bundle)
    _, val_ds, _ = train_val_datasets(cfg2)
    assert val_ds is not None and len(val_ds) == 6
    pred = predict(model, val_ds, torch.device("cpu"), 8, keep_maps=True)
    image, pixel = np.quantile(pred.scores, 0.5), np.quantile(pred.maps, 0.75)
    assert bundle["thresholds"]["image"] == pytest.approx(image, rel=1e-6)
    assert bundle["thresholds"]["pixel"] == pytest.approx(pixel, rel=1e-6)
    assert image != pytest.approx(np.quantile(pred.scores, 0.99), rel=1e-3)  # the default would differ
    assert pixel != pytest.approx(np.quantile(pred.maps, 0.999), rel=1e-3)


def test_default_image_threshold_is_conformal_on_held_out_normals(demo_root: Path, tmp_path: Path) -> None:
    """model.ckpt states alpha, n and the guarantee; its image threshold is the ceil((n+1)(1-alpha))-th smallest
    held-out normal score; the calibration scores travel in the bundle; a too-small alpha warns."""
    over = [f"data.root={demo_root}", "train.epochs=1", *TINY, "train.val_fraction=0.5", "train.alpha=0.3",
            "train.amp=false", "model.map_norm=none"]  # in-sample scores: no cross-fit (tested on its own)
    run = fit(load_config("rd_cpu", [], over), tmp_path / "run")
    bundle = load_bundle(run)
    model, cfg2 = model_from_bundle(bundle)
    _, val_ds, _ = train_val_datasets(cfg2)
    scores = np.sort(predict(model, val_ds, torch.device("cpu"), 8, keep_maps=False).scores.astype(np.float64))
    thr = bundle["thresholds"]
    assert len(scores) == 6 and thr["alpha"] == 0.3 and thr["n_calibration"] == 6
    assert thr["image"] == pytest.approx(np.nextafter(scores[4], np.inf), rel=1e-6)  # k = ceil(7 * 0.7) = 5
    assert "P(false alarm) <= 0.3 " in thr["guarantee"]
    assert bundle["calibration"]["n"] == 6 and bundle["calibration"]["scores"] == pytest.approx(scores, rel=1e-6)
    assert "calibration_warnings" not in bundle["train_info"]
    with pytest.warns(UserWarning, match="at least 99"):
        run = fit(load_config("rd_cpu", [], over + ["train.alpha=0.01"]), tmp_path / "small")
    assert "at least 99" in load_bundle(run)["train_info"]["calibration_warnings"][0]


@pytest.mark.parametrize("method", ["urd", "cfrg"])
def test_resume_is_bit_identical_for_a_method_that_synthesises_anomalies(method: str, demo_root: Path,
                                                                         tmp_path: Path) -> None:
    """URD and CFRG draw Perlin masks, textures and opacities from the engine's generator every step, and
    CFRG's student drops paths with the torch RNG: a resumed run equals an uninterrupted one only if
    last.ckpt restores both states (URD alone cannot see the torch RNG: it draws nothing from it)."""
    from PIL import Image

    tex = tmp_path / "textures" / "kind"
    tex.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tex / f"{i}.png")
    over = [f"data.root={demo_root}", *TINY, f"method={method}", "data.image_size=32", "train.val_fraction=0",
            f"data.texture_dir={tex.parent}", "model.synthesis={foreground: none}", "train.amp=false"]
    full = fit(load_config(None, [], over + ["train.epochs=2"]), tmp_path / "full")
    part = fit(load_config(None, [], over + ["train.epochs=1"]), tmp_path / "part")
    fit(load_config(None, [], over + ["train.epochs=2"]), part, resume=True)
    a, b = load_bundle(full)["model"], load_bundle(part)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_runs_the_prepare_hook_before_training_and_calibrates(demo_root: Path, tmp_path: Path) -> None:
    # PatchST standardises its target with statistics from MethodSpec.prepare; without the hook they stay 0 / 1
    cfg = load_config("patchst_cpu", [], [f"data.root={demo_root}", "train.epochs=1", "train.cpu_bf16=false", *TINY])
    run = fit(cfg, tmp_path / "run")
    model, _ = model_from_bundle(load_bundle(run))
    assert float(model.feat_mean.abs().sum()) > 0
    assert not torch.allclose(model.feat_std, torch.ones_like(model.feat_std))
    # calibrated on the held-out normals at 64 px (stride 8), one plane per branch (student, memory)
    assert model.map_mean.shape == (1, 2, 8, 8)
    assert model.bank.shape[0] > 0 and model.bank.shape[1] == model.feat_mean.shape[1]


def test_a_memory_only_patchst_fits_with_no_training_epoch(demo_root: Path, tmp_path: Path) -> None:
    # model.fusion=memory with train.epochs=0: a nearest-neighbour detector through the same engine
    # the patchst_memory_cpu preset is exactly patchst_cpu with those two overrides
    assert to_dict(load_config("patchst_memory_cpu")) == to_dict(
        load_config("patchst_cpu", [], ["train.epochs=0", "model.fusion=memory"]))
    over = [f"data.root={demo_root}", "train.cpu_bf16=false", *TINY]
    run = fit(load_config("patchst_memory_cpu", [], over), tmp_path / "run")
    bundle = load_bundle(run)
    assert bundle["train_info"]["iters"] == 0 and bundle["thresholds"]["image"] > 0
    model, _ = model_from_bundle(bundle)
    assert model.map_mean.shape == (1, 1, 8, 8) and model.bank.shape[0] > 0
    result = evaluate_run(run, report=False)
    assert result["metrics"]["image_auroc"] > 0.5  # the demo's defects are visible to a random-weight teacher too


def test_crossfit_scores_never_score_an_image_with_statistics_that_saw_it() -> None:
    # a model whose score is 1 exactly for the images its last calibration saw: cross-fitted scores are all 0,
    # while scoring after a calibration on every image (what fit did before) gives all 1
    from kdad.blocks.maps import AnomalyOutput
    from kdad.train import crossfit_scores

    class Seen(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[int] = set()

        def forward(self, images: torch.Tensor) -> AnomalyOutput:
            ids = images[:, 0, 0, 0].round().long().tolist()
            score = torch.tensor([float(i in self.seen) for i in ids])
            return AnomalyOutput(score[:, None, None, None].expand(-1, 1, 4, 4).clone(), score)

    def calibrate(model: Seen, loader: Any, device: torch.device) -> None:
        model.seen = {int(i) for b in loader for i in b["image"][:, 0, 0, 0].round().long()}

    items = [{"image": torch.full((3, 4, 4), float(i)), "label": 0, "path": f"{i}.png", "defect_type": "good",
              "mask": torch.zeros(1, 4, 4)} for i in range(7)]
    model = Seen()
    scores, _ = crossfit_scores(calibrate, model, items, torch.device("cpu"), batch_size=3, seed=0)
    assert scores.shape == (7,) and (scores == 0).all()
    calibrate(model, [{"image": torch.stack([it["image"] for it in items])}], torch.device("cpu"))
    assert model(torch.stack([it["image"] for it in items])).score.eq(1).all()


def test_fit_takes_the_image_threshold_from_crossfitted_scores(demo_root: Path, tmp_path: Path) -> None:
    from kdad.thresholds import conformal_threshold

    over = [f"data.root={demo_root}", "train.epochs=1", "train.cpu_bf16=false", "model.memory=64",
            "train.val_fraction=0.5", *TINY]
    bundle = load_bundle(fit(load_config("patchst_cpu", [], over), tmp_path / "a"))
    thr, cal = bundle["thresholds"], bundle["calibration"]
    assert "cross-fitted" in thr["source"]
    assert thr["image"] == conformal_threshold(cal["scores"], thr["alpha"]).threshold
    off = load_bundle(fit(load_config("patchst_cpu", [], over + ["train.crossfit_calibration=false"]), tmp_path / "b"))
    assert "cross-fitted" not in off["thresholds"]["source"]
    # the same training (same seed): only the calibration scores differ, and none of them is lower cross-fitted
    # on average than scored against statistics that included it
    assert np.mean(cal["scores"]) >= np.mean(off["calibration"]["scores"])
    assert not np.allclose(cal["scores"], off["calibration"]["scores"])  # the threshold's scores are cross-fitted


def test_fit_takes_the_pixel_threshold_from_crossfitted_maps(demo_root: Path, tmp_path: Path) -> None:
    """The pixel threshold comes from the held-out normals' maps scored the cross-fitted way too: a statistic
    fitted on those normals (here the student's Mahalanobis residual) would otherwise make their maps look
    more normal than a new good image's, and flag more good parts than the stated rate."""
    from kdad.methods import get_method
    from kdad.thresholds import pixel_threshold_for_region_rate
    from kdad.train import crossfit_scores, train_val_datasets

    over = [f"data.root={demo_root}", "train.epochs=1", "train.cpu_bf16=false", "model.memory=0",
            "model.residual=mahalanobis", "model.residual_ridge=1.0", "train.val_fraction=0.5", *TINY]
    cfg = load_config("patchst_cpu", [], over)
    run = fit(cfg, tmp_path / "a")
    bundle = load_bundle(run)
    thr = bundle["thresholds"]
    assert "their maps too" in thr["source"]
    model, _ = model_from_bundle(bundle)
    _, val, _ = train_val_datasets(cfg)
    assert val is not None
    scores, maps = crossfit_scores(get_method("patchst").calibrate, model, val, torch.device("cpu"),
                                   cfg.train.eval_batch_size, cfg.train.seed)
    # the same split and statistics as fit's (its stored calibration scores are sorted)
    assert np.allclose(np.sort(scores), bundle["calibration"]["scores"], rtol=1e-4)
    want = pixel_threshold_for_region_rate(maps, cfg.train.pixel_region_rate, cfg.train.pixel_min_area)
    assert thr["pixel"] == pytest.approx(want, rel=1e-4)


def test_rd_map_norm_is_calibrated_cross_fitted_and_saved(demo_root: Path, tmp_path: Path) -> None:
    """model.map_norm=position (rd_cpu's default): the head's mean map comes from the held-out normals and travels
    in model.ckpt; the image threshold is cross-fitted. With none, fit runs no calibration, nothing is cross-fitted."""
    over = [f"data.root={demo_root}", "train.epochs=1", "train.val_fraction=0.5", *TINY]
    bundle = load_bundle(fit(load_config("rd_cpu", [], over), tmp_path / "a"))
    assert "cross-fitted" in bundle["thresholds"]["source"]
    mean = bundle["model"]["head.norm.mean"]
    assert mean.shape == (1, 1, 64, 64) and bool((mean > 0).all())
    model, _ = model_from_bundle(bundle)
    torch.testing.assert_close(model.head.norm.mean, mean)
    plain = load_bundle(fit(load_config("rd_cpu", [], over + ["model.map_norm=none"]), tmp_path / "b"))
    assert "cross-fitted" not in plain["thresholds"]["source"]
    assert not any(k.endswith("norm.mean") for k in plain["model"])
    # map_norm acts after training only (benchmarks/renorm_cell.py re-reads kept runs on that ground): same weights
    assert plain["model"].keys() == bundle["model"].keys() - {"head.norm.mean"}
    assert all(torch.equal(plain["model"][k], bundle["model"][k]) for k in plain["model"])
    # map_norm_shrink: auto records its choice (kdad.blocks.map_choice) with the run's other facts
    auto = fit(load_config("rd_cpu", [], over + ["model.map_norm_shrink=auto"]), tmp_path / "c")
    info = json.loads((auto / "train_info.json").read_text())["map_norm_choice"]
    assert info["shrink"] in (0.0, 0.25, 0.5, 1.0) and info == load_bundle(auto)["train_info"]["map_norm_choice"]
    # chosen on every held-out normal (fit's cross-fitted halves keep it), not on the first half
    assert len(info["candidates"]) == 4 and info["normals"] == len(load_bundle(auto)["calibration"]["scores"]) >= 4


def test_patchst_denoising_asks_for_a_texture_folder_and_trains_with_one(demo_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    over = ["method=patchst", f"data.root={demo_root}", "train.epochs=1", "train.cpu_bf16=false", *TINY,
            "model.denoise=0.5"]
    with pytest.raises(ConfigError, match="data.texture_dir is empty"):
        fit(load_config(None, [], over), tmp_path / "none")
    assert not (tmp_path / "none" / "model.ckpt").exists()
    tex = tmp_path / "textures" / "kind"
    tex.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tex / f"{i}.png")
    run = fit(load_config(None, [], over + [f"data.texture_dir={tex.parent}"]), tmp_path / "run")
    assert load_bundle(run)["method"] == "patchst"
