"""fit(): the one training loop every method uses; methods supply their own steps and optimizers."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from kdad import distributed as dist_utils
from kdad.checkpoint import atomic_torch_save, atomic_write_text, load_bundle, make_bundle
from kdad.config import RunConfig, dump_yaml, method_config
from kdad.data.factory import dataset_parts
from kdad.errors import ConfigError, KdadError
from kdad.evaluate import predict, thresholds_from_normals
from kdad.methods import get_method
from kdad.seed import resolve_device, seed_everything
from kdad.speed import GraphedTrainStep, heap_allocator, prepare_training
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
    training set holds every grid tile of its images, and the held-out normals stay whole images.
    """
    trains, vals, weights = [], [], []
    fraction = 0.0 if cfg.data.val_split else cfg.train.val_fraction
    for _, ds in dataset_parts(cfg.data, "train"):
        tr, va = split_train_val(ds, fraction, cfg.train.seed)  # split images, not tiles: no tile leaks
        tr = training_tiles(tr, TileSpec.from_data(cfg.data))
        trains.append(tr)
        if va is not None:
            vals.append(va)
        weights += [1.0 / len(tr)] * len(tr)  # type: ignore[arg-type]
    if cfg.data.val_split:  # a released split of held-out normals (MVTec AD 2 "validation") replaces the hold-out
        vals = [ds for _, ds in dataset_parts(cfg.data, cfg.data.val_split)]
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


def _autocast(device: torch.device, tc: Any) -> contextlib.AbstractContextManager[Any]:
    # bf16 needs no loss scaler, so methods keep plain backward()/step(). A captured graph must not keep
    # autocast's weight casts cached across replays.
    if (tc.amp and device.type == "cuda") or (tc.cpu_bf16 and device.type == "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not tc.cuda_graph)
    return contextlib.nullcontext()


def _check_cuda_graph(tc: Any, spec: Any, device: torch.device, distributed: bool) -> None:
    """train.cuda_graph's preconditions, each refused with the option's name."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device, got {device}")
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


def _state(opts: dict[str, Any], epoch: int, it: int, best: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    return {"epoch": epoch, "iters": it, "best": best, "rng": torch.get_rng_state(), "gen": gen.get_state(),
            "optimizers": {k: getattr(o, "opt", o).state_dict() for k, o in opts.items()}}


def _texture_bank(cfg: RunConfig, spec: Any) -> Any:
    """The texture source of methods that synthesise anomalies (None for the others)."""
    if not spec.needs_textures:
        return None
    if not cfg.data.texture_dir:
        raise ConfigError(f"data.texture_dir is empty: method {cfg.method!r} synthesises anomalies from a folder "
                          "of texture images (DTD layout), e.g. --set data.texture_dir=../shared/data/dtd/images")
    from kdad.synthesis import TextureBank

    return TextureBank(cfg.data.texture_dir, cfg.data.image_size)


def fit(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train `cfg.method` on `cfg.data`; write config.yaml, last.ckpt, model.ckpt, train_log.jsonl in run_dir."""
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
    if tc.cuda_graph:
        _check_cuda_graph(tc, spec, device, distributed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gen = seed_everything(tc.seed)
    main = rank == 0
    tiles = TileSpec.from_data(cfg.data)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))

    train_ds, val_ds, weights = train_val_datasets(cfg)
    if tc.cuda_graph and len(train_ds) < tc.batch_size:  # type: ignore[arg-type]
        raise ConfigError(f"train.cuda_graph=true drops partial batches, and the {len(train_ds)} training images "  # type: ignore[arg-type]
                          f"make none of train.batch_size={tc.batch_size}")
    loader_gen = torch.Generator()  # reseeded every epoch so a resumed run shuffles like an uninterrupted one
    sampler: Any = None
    if distributed:
        sampler = DistributedSampler(train_ds, seed=tc.seed)
    elif weights is not None:
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=loader_gen)
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.data.num_workers, generator=loader_gen, drop_last=tc.cuda_graph,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    model = spec.Model(mcfg).to(device)
    opts: dict[str, Any] = dict(spec.optimizers(model, mcfg))
    levers = prepare_training(model, opts, tc.channels_last, tc.fused_optimizer, tc.compile)
    if distributed:
        dist_utils.broadcast_model(model)
        opts = {k: dist_utils.AllReduceOptimizer(o) for k, o in opts.items()}

    textures = _texture_bank(cfg, spec)
    start_epoch, it, best = 0, 0, {"value": math.inf, "epoch": -1}
    best_state: dict[str, torch.Tensor] | None = None
    if resume and (run_dir / "last.ckpt").is_file():
        ck = load_bundle(run_dir / "last.ckpt")
        model.load_state_dict(ck["model"])
        for k, o in opts.items():
            getattr(o, "opt", o).load_state_dict(ck["train_state"]["optimizers"][k])
        st = ck["train_state"]
        start_epoch, it, best = st["epoch"] + 1, st["iters"], st["best"]
        torch.set_rng_state(st["rng"])
        gen.set_state(st["gen"])
        if (run_dir / "best.ckpt").is_file():
            best_state = load_bundle(run_dir / "best.ckpt")["model"]

    def eager_step(b: dict[str, Any]) -> dict[str, Any]:
        return spec.train_step(model, b, opts, mcfg, gen)

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
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            model.train()
            losses: list[dict[str, Any]] = []  # floats or device scalars, read by _mean_logs
            bar = tqdm(loader, desc=f"{cfg.method} epoch {epoch + 1}/{total_epochs}", leave=False,
                       disable=not (tc.progress and main))
            for batch in bar:
                batch = _to_device(batch, device, tc.channels_last)
                batch["textures"] = textures  # for methods that synthesise anomalies; batch["category"] names each image
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
                    atomic_torch_save(make_bundle(model, cfg, train_state=_state(opts, epoch, it, best, gen)),
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
    if spec.calibrate is not None:  # map statistics live in model buffers, so they travel with every export
        spec.calibrate(model, DataLoader(training_tiles(calib, tiles), batch_size=tc.eval_batch_size, shuffle=False),
                       device)
        model.eval()
    if main:
        thr, display = thresholds_from_normals(model, calib, device, tc, tiles=tiles)
        info = {"train_seconds": train_seconds, "train_images_per_s": n_seen / max(train_seconds, 1e-9),
                "iters": it, "selected_epoch": best["epoch"] if best_state is not None else "last",
                "threshold_source": "held-out normals" if val_ds is not None else "training normals (optimistic)",
                "device": str(device), "world_size": world_size, **levers}
        if tiles is not None:  # train_images_per_s then counts tiles
            info["tiling"] = tiles.to_dict()
        atomic_torch_save(make_bundle(model, cfg, thresholds=thr.to_dict(), display=display,
                                                 train_info=info), run_dir / "model.ckpt")
        atomic_write_text(run_dir / "train_info.json", json.dumps(info, indent=2))
    if distributed:
        torch.distributed.barrier()
    return run_dir
