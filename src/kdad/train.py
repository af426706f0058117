"""fit(): the one training loop every method uses; methods supply their own steps and optimizers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from kdad import distributed as dist_utils
from kdad.align import AlignSpec, aligned_training, region_view, resolve_auto
from kdad.augment import augment_batch, check_augment
from kdad.blocks.maps import chooses_on_normals
from kdad.checkpoint import load_bundle, make_bundle
from kdad.config import RunConfig, build_config, dump_yaml, method_config, to_dict
from kdad.data.factory import check_splits, dataset_parts
from kdad.errors import ConfigError, KdadError
from kdad.evaluate import predict, thresholds_from_normals
from kdad.fileio import atomic_torch_save, atomic_write_text, remove_stale_temporaries
from kdad.hardware import cpu_bf16_enabled, cpu_threads
from kdad.methods import get_method
from kdad.methods.base import runs_calibration, uses_textures
from kdad.seed import resolve_device, seed_everything
from kdad.speed import GraphedTrainStep, heap_allocator, prepare_training
from kdad.thresholds import calibration_record
from kdad.tiling import TileSpec, training_tiles


def split_train_val(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out `fraction` of the normal training images (seeded permutation)."""
    n = len(ds)  # type: ignore[arg-type]
    if fraction <= 0:
        return ds, None
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise KdadError(f"train.val_fraction={fraction} leaves no training image out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, sorted(perm[n_val:])), Subset(ds, sorted(perm[:n_val]))


def train_val_datasets(cfg: RunConfig) -> tuple[Dataset, Dataset | None, list[float] | None]:
    """Training set, held-out normals (or None) and, for balanced multi-class runs, per-item sampling weights.

    Each category is split on its own, so the held-out set covers every category. With data.tiling the
    training set holds every grid tile of its images, and the held-out normals stay whole images; with data.align
    both are pose-normalised (kdad.align).
    """
    trains, vals, weights = [], [], []
    fraction = 0.0 if cfg.data.val_split else cfg.train.val_fraction
    parts = dataset_parts(cfg.data, "train")
    # data.align: train and calibrate on pose-normalised images ("auto": fit resolved it already; a caller holding a
    # preset's config has not, and gets the pick fit would make)
    align = AlignSpec.from_data(resolve_auto(cfg.data, [ds for _, ds in parts])[0])
    for _, ds in parts:
        tr, va = split_train_val(ds, fraction, cfg.train.seed)  # split images, not tiles: no tile leaks
        tr = aligned_training(training_tiles(tr, TileSpec.from_data(cfg.data)), align)
        trains.append(tr)
        if va is not None:
            vals.append(aligned_training(va, align))
        weights += [1.0 / len(tr)] * len(tr)  # type: ignore[arg-type]
    if cfg.data.val_split:  # a released split of held-out normals (MVTec AD 2 "validation") replaces the hold-out
        vals = [aligned_training(ds, align) for _, ds in dataset_parts(cfg.data, cfg.data.val_split)]
    balanced = cfg.data.balanced and len(trains) > 1
    train_ds = trains[0] if len(trains) == 1 else ConcatDataset(trains)
    val_ds = None if not vals else (vals[0] if len(vals) == 1 else ConcatDataset(vals))
    return train_ds, val_ds, weights if balanced else None


def _budget_spent(tc: Any, it: int, t_start: float) -> bool:
    """True once max_iters batches or max_seconds of training time are used up."""
    if tc.max_iters and it >= tc.max_iters:
        return True
    return bool(tc.max_seconds) and time.perf_counter() - t_start >= tc.max_seconds


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "image" else v for k, v in batch.items()}
    # one copy straight into the wanted layout: .to() then .contiguous() briefly held two on the device
    fmt = torch.channels_last if channels_last else torch.preserve_format
    out["image"] = batch["image"].to(device, non_blocking=True, memory_format=fmt)
    return out


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, tc: Any) -> torch.dtype | None:
    """The dtype training autocasts to on `device` (None = fp32): train.amp_dtype on CUDA, bf16 on CPU."""
    if tc.amp and device.type == "cuda":
        return AMP_DTYPES[tc.amp_dtype]
    if device.type == "cpu" and cpu_bf16_enabled(tc.cpu_bf16):
        return torch.bfloat16
    return None


def check_precision(tc: Any, spec: Any) -> None:
    """train.amp_dtype is known; fp16 only for methods whose steps take the engine's GradScaler."""
    if tc.amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"train.amp_dtype={tc.amp_dtype!r} is not valid; choose one of {sorted(AMP_DTYPES)}")
    if tc.amp and tc.amp_dtype == "fp16":
        if not spec.grad_scaler:
            from kdad.methods import METHODS

            valid = sorted(n for n, s in METHODS.items() if s.grad_scaler)
            raise ConfigError(f"train.amp_dtype=fp16 needs a loss scaler that method {spec.name!r} does not take; "
                              f"use bf16 or train.amp=false (fp16 methods: {valid})")
        if tc.cuda_graph:
            raise ConfigError("train.amp_dtype=fp16 cannot be captured by train.cuda_graph (the loss scaler "
                              "checks the gradients on the host): use bf16")


def _grad_scaler(device: torch.device, tc: Any) -> Any:
    """fp16 autocast on CUDA scales the loss (as torch.cuda.amp in the official CFRG code); None otherwise."""
    if autocast_dtype(device, tc) is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def _autocast(device: torch.device, tc: Any) -> contextlib.AbstractContextManager[Any]:
    # bf16 needs no loss scaler, so methods keep plain backward()/step(); fp16 steps get batch["grad_scaler"].
    # A captured graph must not keep autocast's weight casts cached across replays.
    dtype = autocast_dtype(device, tc)
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype, cache_enabled=not tc.cuda_graph)
    return contextlib.nullcontext()


def lr_factor(epoch: int, total_epochs: int, decay_from: float) -> float:
    """The learning-rate factor of a (0-based) epoch under train.lr_decay_from: 1 for the first decay_from of the
    epochs, then a half cosine that reaches 0 one epoch after the last, so the last epoch still learns a little.

    A function of the epoch alone, so a resumed run gets the rates of an uninterrupted one with no scheduler state.
    """
    start = round(decay_from * total_epochs)
    if epoch < start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start + 1) / (total_epochs - start + 1)))


def set_lr_factor(opts: dict[str, torch.optim.Optimizer], factor: float) -> None:
    """Every param group's lr = its constructed lr x factor. The constructed lr is kept in the group
    (`base_lr`), so it travels in the optimizer state of a checkpoint; `lr_factor` is left there for methods
    that set their own rate each step (CFRG), which multiply it in."""
    for opt in opts.values():
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"], group["lr_factor"] = group["base_lr"] * factor, factor


def _check_cuda_graph(tc: Any, spec: Any, device: torch.device, distributed: bool) -> None:
    """train.cuda_graph's preconditions, each refused with the option's name."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device, got {device}")
    if tc.lr_decay_from < 1.0:  # a captured step keeps the learning rate it was captured with
        raise ConfigError(f"train.cuda_graph=true cannot decay the learning rate (train.lr_decay_from="
                          f"{tc.lr_decay_from}, perhaps from the preset): pick one; --set "
                          "train.lr_decay_from=1 keeps the rate constant")
    if not spec.graph_safe:
        raise ConfigError(f"train.cuda_graph=true: method {spec.name!r} cannot be captured (its step syncs with the "
                          "host, changes shape or schedules its learning rate); graph-safe methods: rd, stfpm")
    if tc.compile:
        raise ConfigError("train.cuda_graph and train.compile cannot both be on: pick one")
    if distributed:
        raise ConfigError("train.cuda_graph=true is single-GPU only (the gradient all-reduce is not captured)")


def _mean_logs(logs: list[dict[str, Any]]) -> dict[str, float]:
    """Epoch means of the step logs. Device scalars are read here, once per epoch: reading them every step
    would make the host wait for the GPU to finish each step before it queues the next."""
    out = {}
    for k in logs[0]:
        vals = [d[k] for d in logs]
        if all(torch.is_tensor(v) for v in vals):
            out[k] = float(torch.stack(vals).double().mean())
        else:
            out[k] = float(np.mean([float(v) for v in vals]))
    return out


_POSTFIX_EVERY = 20  # progress-bar loss refresh (each refresh reads the device once)


def _state(opts: dict[str, Any], epoch: int, it: int, best: dict[str, Any], gen: torch.Generator,
           scaler: Any = None) -> dict[str, Any]:
    st = {"epoch": epoch, "iters": it, "best": best, "rng": torch.get_rng_state(), "gen": gen.get_state(),
          "optimizers": {k: o.state_dict() for k, o in opts.items()}}
    if scaler is not None:
        st["grad_scaler"] = scaler.state_dict()
    return st


def _texture_bank(cfg: RunConfig, spec: Any, mcfg: Any) -> Any:
    """The texture source of methods that synthesise anomalies (None for the others)."""
    if not uses_textures(spec, mcfg):
        return None
    if not cfg.data.texture_dir:
        raise ConfigError(f"data.texture_dir is empty: method {cfg.method!r} synthesises anomalies from a folder "
                          "of texture images (DTD layout), e.g. --set data.texture_dir=../shared/data/dtd/images")
    from kdad.synthesis import TextureBank

    return TextureBank(cfg.data.texture_dir, cfg.data.image_size)


RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.max_iters", "train.max_seconds", "train.device", "train.amp", "train.cpu_bf16",
    "train.channels_last", "train.fused_optimizer", "train.compile", "train.heap_allocator", "train.cuda_graph",
    "train.val_every", "train.ckpt_every", "train.threshold_quantile", "train.pixel_threshold_quantile",
    "train.image_threshold_rule", "train.alpha", "train.gate", "train.gate_alpha", "train.gate_margin",
    "train.eval_batch_size", "train.progress", "train.threads", "data.num_workers",
})
"""Config keys `--resume` lets change: the budget, the device and speed levers, bookkeeping. Everything else
(method, model architecture and optimizer settings, data, seed, split, batch size, selection) must match."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"data.image_size": 256, ...}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(stored: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    """Raise ConfigError listing every key that differs between the checkpoint's config and `cfg` and that
    `--resume` may not change (see RESUMABLE_KEYS).

    Optimizer settings (model.lr, ...) are refused, not applied: the saved optimizer state carries them, and a
    resumed run continues the saved run exactly.
    """
    old = to_dict(build_config(stored, where=f"{where} config"))
    if old["method"] != cfg.method:
        changed = [f"method: {old['method']!r} -> {cfg.method!r}"]
    else:
        a, b = _flat(old), _flat(to_dict(cfg))
        changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                   if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS]
    if changed:
        raise ConfigError(
            f"cannot resume {where}: the config differs from the one it was trained with ({'; '.join(changed)}). "
            "--resume continues the saved run unchanged: the method, model (architecture and optimizer settings "
            "such as lr, which the saved optimizer state keeps), data, seed, split, batch size and selection "
            "must match; it may change only the budget, device, speed levers and bookkeeping (kdad.train."
            "RESUMABLE_KEYS, docs/design.md). Resume with the run's own "
            f"config (-c {where.parent / 'config.yaml'}) or train into a new --out"
        )


def trim_log(path: Path, last_epoch: int) -> None:
    """Keep the train_log.jsonl records of epochs <= last_epoch (the checkpoint's), so the epochs a resumed
    run trains again are not logged twice; a line cut short by a crash is dropped too."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["epoch"]) <= last_epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if kept != lines:
        atomic_write_text(path, "".join(x + "\n" for x in kept))


def _load_resume(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """last.ckpt of `run_dir` checked against `cfg` (None when there is none); nothing is written."""
    path = run_dir / "last.ckpt"
    if not path.is_file():
        return None
    ck = load_bundle(path)
    if "train_state" not in ck:
        raise KdadError(f"{path} has no training state to resume from")
    check_resume_config(ck["config"], cfg, path)
    return ck


def gate_for(model: torch.nn.Module, cfg: RunConfig, fit_ds: Dataset, calib_ds: Dataset | None,
             device: torch.device) -> Any:
    """The invalid-input gate (kdad.gate.Gate) on the training normals `fit_ds`, thresholded on `calib_ds`
    (the training normals when None); None when train.gate is off, the model has no teacher, or the run is tiled
    (the gate looks at whole images at the model's size, a tile is not one) or aligned (data.align)."""
    from kdad.gate import fit_gate
    from kdad.methods.base import teacher_of

    tc = cfg.train
    if not tc.gate or teacher_of(model) is None or TileSpec.from_data(cfg.data) is not None \
            or AlignSpec.from_data(cfg.data) is not None:  # an aligned image is not what the service receives
        return None
    source = "held-out normals" if calib_ds is not None else "training normals (optimistic)"
    gate = fit_gate(model, fit_ds, calib_ds if calib_ds is not None else fit_ds, device, tc.gate_alpha,
                    tc.gate_margin, tc.eval_batch_size)
    return dataclasses.replace(gate, source=f"{gate.source}; threshold from {source}")


def crossfit_scores(calibrate: Any, model: torch.nn.Module, normals: Dataset, device: torch.device,
                    batch_size: int, seed: int, scored: torch.nn.Module | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) of the held-out normals, each half scored after ``calibrate`` saw only the other half
    (a seeded split). Methods that set map statistics on the held-out normals would otherwise score each of them
    against statistics that include it, a little low, and the conformal threshold with it. The caller
    calibrates on all of them afterwards: a new image is scored with statistics from all N. Returns (scores,
    maps (N, H, W)), the maps cross-fitted the same way (for the pixel threshold). `scored`: what scores the
    images, a view of `model` (kdad.align.region_view); `model` itself when None."""
    n = len(normals)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    halves = (perm[: n // 2], perm[n // 2:])
    scores = np.empty(n, dtype=np.float64)
    maps: np.ndarray | None = None
    scorer = model if scored is None else scored
    for stats, part in (halves, halves[::-1]):
        calibrate(model, DataLoader(Subset(normals, stats), batch_size=batch_size, shuffle=False), device)
        model.eval()
        pred = predict(scorer, Subset(normals, part), device, batch_size, keep_maps=True)
        assert pred.maps is not None
        maps = np.empty((n, *pred.maps.shape[1:]), dtype=pred.maps.dtype) if maps is None else maps
        scores[part], maps[part] = pred.scores, pred.maps
    assert maps is not None
    return scores, maps


def fit(cfg: RunConfig, run_dir: str | Path, resume: bool = False, *,
        start: dict[str, torch.Tensor] | None = None, extra_normals: Dataset | None = None) -> Path:
    """Train `cfg.method` on `cfg.data`; write config.yaml, last.ckpt, model.ckpt, train_log.jsonl in run_dir.

    start: a model state to fine-tune from (`kdad feedback`) instead of a fresh model; the statistics of the
    method's `prepare` hook are then the ones in that state, and the optimizers start fresh.
    extra_normals: more normal images added to the training set only (not to the held-out calibration normals;
    items as the training set's, e.g. tagged with the category).
    Runs on train.threads CPU threads (0: torch's count) and restores torch's count afterwards.
    """
    with cpu_threads(cfg.train.threads):
        return _fit(cfg, run_dir, resume, start=start, extra_normals=extra_normals)


def _fit(cfg: RunConfig, run_dir: Path | str, resume: bool, *, start: dict[str, torch.Tensor] | None,
         extra_normals: Dataset | None) -> Path:
    run_dir = Path(run_dir)
    spec = get_method(cfg.method)
    mcfg = method_config(cfg)
    tc = cfg.train
    device = resolve_device(tc.device)
    rank, local_rank, world_size = dist_utils.world()
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    distributed = dist_utils.init(device)
    check_precision(tc, spec)
    check_augment(tc.augment, tc.augment_angle)
    if tc.cuda_graph:
        _check_cuda_graph(tc, spec, device, distributed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if tc.cpu_bf16 is True and device.type == "cpu":  # "auto" never emulates, so it needs no warning
        from kdad.hardware import warn_if_slow_cpu_bf16

        warn_if_slow_cpu_bf16("train.cpu_bf16=true")
    gen = seed_everything(tc.seed)
    main = rank == 0
    # Everything that can refuse the run does so before anything is written, so a failed start leaves no run
    # folder or config.yaml behind: the resume contract (a changed config is refused), then the data (every
    # image and mask header of the splits used).
    if resume and start is not None:
        raise ConfigError("fit: resume and a starting state (fine-tuning) exclude each other")
    check_splits(cfg.data, ["train", *([cfg.data.val_split] if cfg.data.val_split else [])])
    # data.align=auto becomes axis or none here, from the training images; config.yaml and the checkpoint keep the pick
    data, pose = resolve_auto(cfg.data, [ds for _, ds in dataset_parts(cfg.data, "train")])  # listing: ~5 ms
    cfg = dataclasses.replace(cfg, data=data)
    ck = _load_resume(run_dir, cfg) if resume else None
    tiles = TileSpec.from_data(cfg.data)
    train_ds, val_ds, weights = train_val_datasets(cfg)
    if extra_normals is not None:
        if weights is not None:
            raise ConfigError("fit: extra normal images cannot join a balanced multi-class training set")
        train_ds = ConcatDataset([train_ds, aligned_training(training_tiles(extra_normals, tiles),
                                                             AlignSpec.from_data(cfg.data))])
    if tc.cuda_graph and len(train_ds) < tc.batch_size:  # type: ignore[arg-type]
        raise ConfigError(f"train.cuda_graph=true drops partial batches, and the {len(train_ds)} training images "  # type: ignore[arg-type]
                          f"make none of train.batch_size={tc.batch_size}")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # left by a killed run's atomic writes
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        trim_log(run_dir / "train_log.jsonl", ck["train_state"]["epoch"] if ck else -1)
    loader_gen = torch.Generator()  # reseeded every epoch so a resumed run shuffles like an uninterrupted one
    sampler: Any = None
    if distributed and weights is not None:  # multi-class balancing over the global batch, dealt out to ranks
        sampler = dist_utils.ShardedWeightedSampler(weights, rank, world_size, seed=tc.seed)
    elif distributed:
        sampler = DistributedSampler(train_ds, seed=tc.seed)
    elif weights is not None:
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=loader_gen)
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.data.num_workers, generator=loader_gen, drop_last=tc.cuda_graph,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    if start is not None and hasattr(mcfg, "weights"):  # the state holds the teacher (as model_from_bundle)
        model = spec.Model(dataclasses.replace(mcfg, weights="random"))
    else:
        model = spec.Model(mcfg)
    if start is not None:
        model.load_state_dict(start, strict=True)
    model = model.to(device)
    if tc.sync_batchnorm:
        if not distributed:
            raise ConfigError("train.sync_batchnorm=true needs several processes (launch with torchrun)")
        dist_utils.sync_batchnorm(model, device)
    opts: dict[str, Any] = dict(spec.optimizers(model, mcfg))
    levers = prepare_training(model, opts, tc.channels_last, tc.fused_optimizer, tc.compile)
    # DDP: rank 0's weights broadcast now; methods' backward (batch["backward"]) all-reduces gradient buckets
    ddp_backward = dist_utils.ddp_backward(dist_utils.wrap(model, device)) if distributed else None

    if spec.prepare is not None and ck is None and start is None:
        # every rank sees the whole training set here, so every rank computes the same statistics
        spec.prepare(model, DataLoader(train_ds, batch_size=tc.eval_batch_size, shuffle=False), device)
    textures = _texture_bank(cfg, spec, mcfg)
    scaler = _grad_scaler(device, tc)
    start_epoch, it, best = 0, 0, {"value": math.inf, "epoch": -1}
    best_state: dict[str, torch.Tensor] | None = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        for k, o in opts.items():
            o.load_state_dict(ck["train_state"]["optimizers"][k])
        st = ck["train_state"]
        start_epoch, it, best = st["epoch"] + 1, st["iters"], st["best"]
        torch.set_rng_state(st["rng"])
        gen.set_state(st["gen"])
        if scaler is not None and "grad_scaler" in st:
            scaler.load_state_dict(st["grad_scaler"])
        if (run_dir / "best.ckpt").is_file():
            best_ck = load_bundle(run_dir / "best.ckpt")
            if best_ck.get("best") == best:  # not a best.ckpt of an epoch after last.ckpt (lost in a crash)
                best_state = best_ck["model"]

    def eager_step(b: dict[str, Any]) -> dict[str, Any]:
        return dict(spec.train_step(model, b, opts, mcfg, gen))

    # after the resume load: it resets the optimizers' hyper-parameters, capturable among them
    step: Any = GraphedTrainStep(eager_step, opts, device) if tc.cuda_graph else eager_step

    log_path = run_dir / "train_log.jsonl"
    t_start, n_seen = time.perf_counter(), 0
    total_epochs = tc.epochs
    if tc.max_iters > 0:
        total_epochs = min(tc.epochs, math.ceil(tc.max_iters / max(1, len(loader))))
    with heap_allocator(device.type == "cpu" and tc.heap_allocator) as levers["heap_allocator"]:
        for epoch in range(start_epoch, total_epochs):
            loader_gen.manual_seed(tc.seed + epoch)
            if tc.lr_decay_from < 1.0:
                set_lr_factor(opts, lr_factor(epoch, total_epochs, tc.lr_decay_from))
            if isinstance(sampler, (DistributedSampler, dist_utils.ShardedWeightedSampler)):
                sampler.set_epoch(epoch)
            model.train()
            losses: list[dict[str, Any]] = []  # floats or device scalars, read by _mean_logs
            bar = tqdm(loader, desc=f"{cfg.method} epoch {epoch + 1}/{total_epochs}", leave=False,
                       disable=not (tc.progress and main))
            for batch in bar:
                batch = _to_device(batch, device, tc.channels_last)
                batch["image"] = augment_batch(batch["image"], tc.augment, gen, tc.augment_angle)
                # for methods that synthesise anomalies; batch["category"] names each image
                batch["textures"] = textures
                if ddp_backward is not None:
                    batch["backward"] = ddp_backward  # arms DDP's all-reduce for each backward of the step
                if scaler is not None:
                    batch["grad_scaler"] = scaler  # fp16: the step scales its loss (MethodSpec.grad_scaler)
                with _autocast(device, tc):
                    logs = step(batch)
                losses.append(logs)
                n_seen += int(batch["image"].shape[0])
                it += 1
                if not bar.disable and it % _POSTFIX_EVERY == 1:
                    bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items()})
                if _budget_spent(tc, it, t_start):
                    break
            record: dict[str, Any] = {"epoch": epoch, "iters": it, **_mean_logs(losses)}
            if val_ds is not None and tc.select == "val_map_mean" and (epoch + 1) % tc.val_every == 0:
                res = predict(model, val_ds, device, tc.eval_batch_size, keep_maps=False, tiles=tiles)
                record["val_map_mean"] = float(res.map_means.mean())
                if record["val_map_mean"] < best["value"]:
                    best = {"value": record["val_map_mean"], "epoch": epoch}
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                    if main:
                        atomic_torch_save(make_bundle(model, cfg, best=best), run_dir / "best.ckpt")
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if (epoch + 1) % tc.ckpt_every == 0 or epoch + 1 == total_epochs:
                    atomic_torch_save(make_bundle(model, cfg, train_state=_state(opts, epoch, it, best, gen, scaler)),
                                      run_dir / "last.ckpt")
            if _budget_spent(tc, it, t_start):
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # steps are queued ahead of the host; count them in the time
    train_seconds = time.perf_counter() - t_start
    if isinstance(step, GraphedTrainStep):
        levers["cuda_graph"] = {"captures": step.captures, "eager_steps": step.eager_calls}
        for o in opts.values():  # the gradients live in the graph's memory pool: free both before evaluation
            o.zero_grad(set_to_none=True)
        step = None

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    calib = val_ds if val_ds is not None else train_ds
    crossfit = None
    calibrate = spec.calibrate if runs_calibration(spec, mcfg) else None
    scored = region_view(model, AlignSpec.from_data(cfg.data))  # thresholds for the score the deployed model gives
    if calibrate is not None:  # map statistics live in model buffers, so they travel with every export
        calib_loader = DataLoader(training_tiles(calib, tiles), batch_size=tc.eval_batch_size, shuffle=False)
        if val_ds is not None and tc.crossfit_calibration and tiles is None and len(val_ds) >= 4:  # type: ignore[arg-type]
            if chooses_on_normals(model):  # the choice from every held-out normal; the halves below keep it
                calibrate(model, calib_loader, device)
            crossfit = crossfit_scores(calibrate, model, val_ds, device, tc.eval_batch_size, tc.seed, scored)
        calibrate(model, calib_loader, device)
        model.eval()
    if main:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # with cross-fitted scores the image threshold comes from scores whose statistics did not see the image
            thr, display, calib_scores = thresholds_from_normals(scored, calib, device, tc, tiles=tiles,
                                                                 crossfit=crossfit)
        notes = [str(w.message) for w in caught]
        if val_ds is None and thr.alpha is not None:  # scores of images it was trained on: no guarantee
            notes.append("the image threshold comes from the training normals (train.val_fraction=0): the "
                         "conformal false-alarm guarantee needs held-out normals")
            thr = dataclasses.replace(thr, alpha=None, n_calibration=None, source=thr.source + " (training normals)")
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=2)
        info = {"train_seconds": train_seconds, "train_images_per_s": n_seen / max(train_seconds, 1e-9),
                "iters": it, "selected_epoch": best["epoch"] if best_state is not None else "last",
                "threshold_source": "held-out normals" if val_ds is not None else "training normals (optimistic)",
                "device": str(device), "cpu_threads": torch.get_num_threads(), "world_size": world_size,
                "autocast": str(autocast_dtype(device, tc) or "none").replace("torch.", ""), **levers}
        if notes:
            info["calibration_warnings"] = notes
        if tiles is not None:  # train_images_per_s then counts tiles
            info["tiling"] = tiles.to_dict()
        if getattr(model, "map_norm_choice", None) is not None:  # model.map_norm_shrink: auto, and what it chose
            info["map_norm_choice"] = model.map_norm_choice
        if pose is not None:  # what data.align=auto (or align_fill) measured, and what it chose
            info["align_auto"] = {"chose": cfg.data.align, "zoom": cfg.data.align_zoom, **dataclasses.asdict(pose)}
        gate = gate_for(model, cfg, train_ds, val_ds, device)
        extra = {} if gate is None else {"gate": gate.to_bundle()}
        atomic_torch_save(make_bundle(model, cfg, thresholds=thr.to_metadata(), display=display, train_info=info,
                                      calibration=calibration_record(calib_scores, info["threshold_source"]),
                                      **extra),
                          run_dir / "model.ckpt")
        atomic_write_text(run_dir / "train_info.json", json.dumps(info, indent=2))
    if distributed:
        torch.distributed.barrier()
    return run_dir
