"""Exploration for the quality study: train one method config on a category and evaluate on the SELECTION half
of its test images every few epochs (a learning curve in one run). Never reads the report half.

Run: python benchmarks/quality_explore.py --method rd --set backbone=efficientnet_lite0 --epochs 60 --every 10
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import _common as quality_split  # the split logic and data paths live in _common
import torch
import yaml

from kdad.blocks.losses import normalized_l2_loss
from kdad.blocks.maps import pool_features
from kdad.config import DataConfig, RunConfig, TrainConfig, method_config
from kdad.data.factory import build_dataset
from kdad.evaluate import compute_metrics, predict
from kdad.methods import get_method
from kdad.methods.base import optimizer_step
from kdad.methods.rd import rd_loss
from kdad.seed import seed_everything
from kdad.speed import heap_allocator, prepare_training
from kdad.train import _texture_bank


def _stack(ds: Any) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


@torch.inference_mode()
def score_variants(model: Any, ds: Any) -> dict[str, float]:
    """Image AUROC of alternative map recipes on the same teacher/student features (diagnostics only)."""
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from kdad.blocks.maps import GaussianBlur, cosine_distance

    blur = GaussianBlur(4.0)
    out: dict[str, list[float]] = {}
    labels = []
    for i in range(0, len(ds), 16):
        items = [ds[j] for j in range(i, min(i + 16, len(ds)))]
        x = torch.stack([it["image"] for it in items])
        labels += [it["label"] for it in items]
        t, s = model.pairs(x)
        size = x.shape[-2:]
        layer = [F.interpolate(cosine_distance(a.float(), b.float()), size=size, mode="bilinear")
                 for a, b in zip(t, s)]
        pooled = [F.interpolate(cosine_distance(F.avg_pool2d(a.float(), 3, 1, 1), F.avg_pool2d(b.float(), 3, 1, 1)),
                                size=size, mode="bilinear") for a, b in zip(t, s)]
        cands = {f"l{k}": blur(m) for k, m in enumerate(layer)}
        cands["sum"] = blur(sum(layer))
        cands["sum_last2"] = blur(sum(layer[-2:]))
        cands["pool_sum"] = blur(sum(pooled))
        cands["pool_last2"] = blur(sum(pooled[-2:]))
        for k, m in cands.items():
            flat = m.flatten(1)
            out.setdefault(k + "_max", []).extend(flat.amax(1).tolist())
            out.setdefault(k + "_top1pct", []).extend(flat.topk(max(1, flat.shape[1] // 100), 1).values.mean(1).tolist())
    return {k: round(float(roc_auc_score(labels, v)), 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="rd")
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--set", action="append", default=[], help="model key=yaml value")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", type=int, default=0)
    ap.add_argument("--preset", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg: dict[str, Any] = {}
    if args.preset:
        from kdad.config import read_preset
        model_cfg.update(read_preset(args.preset).get("model", {}))
    for kv in args.set:
        k, v = kv.split("=", 1)
        model_cfg[k] = yaml.safe_load(v)
    root = quality_split.CATEGORIES[args.category]
    data = DataConfig(root=str(root), image_size=args.size, texture_dir=str(quality_split.TEXTURES))
    cfg = RunConfig(method=args.method, data=data, train=TrainConfig(seed=args.seed), model=model_cfg)
    spec = get_method(args.method)
    mcfg = method_config(cfg)
    gen = seed_everything(args.seed)
    train = build_dataset(data, "train")
    test = build_dataset(data, "test")
    sel, _rep = quality_split.halves(test, seed=quality_split.SPLIT_SEED)
    sel_ds = torch.utils.data.Subset(test, sel)
    x = _stack(train)
    n = len(x)
    model = spec.Model(mcfg)
    opts = dict(spec.optimizers(model, mcfg))
    prepare_training(model, opts, True, True, False)
    cached: list[torch.Tensor] | None = None
    if args.method in ("rd", "stfpm"):  # frozen teacher, no augmentation: its features can be computed once (exploration only)
        t0 = time.perf_counter()
        feats = [model.pairs(x[i:i + 32].contiguous(memory_format=torch.channels_last))[0] if args.method == "stfpm"
                 else model.teacher_features(x[i:i + 32].contiguous(memory_format=torch.channels_last))
                 for i in range(0, n, 32)]
        cached = [torch.cat([f[k] for f in feats]) for k in range(len(feats[0]))]
        print(f"teacher cache {time.perf_counter() - t0:.1f}s", flush=True)
    textures = _texture_bank(cfg, spec)  # built once (None without synthesis), as fit() does
    curve = []
    t_train = 0.0
    steps_per_epoch = math.ceil(n / args.batch)
    with heap_allocator(True):
        for ep in range(args.epochs):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + ep))
            for s in range(steps_per_epoch):
                idx = perm[s * args.batch:(s + 1) * args.batch]
                b = {"image": x[idx].contiguous(memory_format=torch.channels_last), "label": torch.zeros(len(idx)),
                     "category": [args.category] * len(idx)}
                if textures is not None:
                    b["textures"] = textures
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
                    if cached is not None:  # the method's own loss on cached teacher features
                        t = [c[idx] for c in cached]
                        if args.method == "stfpm":
                            s = model.student(model.encoder.normalize(b["image"]))
                            loss = normalized_l2_loss(pool_features(t, mcfg.pool), pool_features(s, mcfg.pool))
                        else:
                            s = model.decoder(model.bottleneck(t))
                            loss = rd_loss(pool_features(t, mcfg.pool), pool_features(s, mcfg.pool), mcfg.loss)
                        logs = optimizer_step(opts["student"], loss)
                    else:
                        logs = spec.train_step(model, b, opts, mcfg, gen)
            t_train += time.perf_counter() - t0
            print(f"epoch {ep + 1} {t_train:.0f}s", flush=True)
            if (ep + 1) % args.every == 0 or ep + 1 == args.epochs:
                model.eval()
                if spec.calibrate is not None:
                    spec.calibrate(model, torch.utils.data.DataLoader(train, batch_size=16), torch.device("cpu"))
                pred = predict(model, sel_ds, torch.device("cpu"), 16)
                m = compute_metrics(pred)
                row = {"epoch": ep + 1, "train_min": t_train / 60, "i_auroc": m["image_auroc"],
                       "p_auroc": m["pixel_auroc"], "au_pro": m["au_pro"],
                       "loss": float(logs.get("loss", float("nan")))}
                if hasattr(model, "pairs"):
                    row["variants"] = score_variants(model, sel_ds)
                print(json.dumps(row), flush=True)
                curve.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": quality_split.metadata(), "args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
