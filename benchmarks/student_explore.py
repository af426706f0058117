"""Exploration for the quality study: a student that regresses the probe's features (frozen Lite0, layers 2-3,
3x3-pooled, channel-standardised), scored on the SELECTION half every few steps. Never reads the report half.

Run: python benchmarks/student_explore.py --student pdn --steps 3000 --every 500 --hard 0.999 --penalty 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import _common as quality_split
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.blocks.maps import GaussianBlur
from kdad.blocks.patchnet import PatchNet
from kdad.blocks.teachers import build_encoder
from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.metrics import au_pro, image_auroc, pixel_auroc


def stack(ds: Any, key: str = "image") -> Tensor:
    return torch.stack([torch.as_tensor(ds[i][key]) for i in range(len(ds))])


class Target(nn.Module):
    def __init__(self, backbone: str, layers: tuple[int, ...], pool: int) -> None:
        super().__init__()
        self.enc = build_encoder(backbone, layers, weights="imagenet", frozen=True)
        self.pool = pool

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        feats = self.enc(self.enc.normalize(x))
        size = feats[0].shape[-2:]
        out = []
        for f in feats:
            f = f.float()
            if self.pool > 1:
                f = F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False)
            out.append(F.interpolate(f, size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else f)
        return torch.cat(out, 1)


class LiteStudent(nn.Module):
    def __init__(self, backbone: str, layers: tuple[int, ...], pool: int, out_ch: int) -> None:
        super().__init__()
        self.enc = build_encoder(backbone, layers, weights="random", frozen=False)
        self.pool = pool
        self.proj = nn.Conv2d(sum(self.enc.channels), out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.enc(self.enc.normalize(x))
        size = feats[0].shape[-2:]
        out = []
        for f in feats:
            if self.pool > 1:
                f = F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False)
            out.append(F.interpolate(f, size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else f)
        return self.proj(torch.cat(out, 1))


def loss_fn(t: Tensor, s: Tensor, hard: float) -> Tensor:
    d = (t - s.float()) ** 2
    if hard > 0:
        q = torch.quantile(d.flatten()[:: max(1, d.numel() // 2_000_000)], hard)
        d = d[d >= q]
    return d.mean()


@torch.inference_mode()
def evaluate(student: nn.Module, target: Target, mu: Tensor, sd: Tensor, x: Tensor, labels: np.ndarray,
             masks: Tensor, bf16: bool, blur: GaussianBlur, xcal: Tensor | None = None,
             types: np.ndarray | None = None) -> dict[str, Any]:
    if xcal is not None:  # per-position statistics of the map on held-out normals
        cal = _maps(student, target, mu, sd, xcal, bf16, blur)
        cmean, cstd = cal.mean(0), cal.std(0) + 1e-6
    mt = _maps(student, target, mu, sd, x, bf16, blur)
    m = mt.numpy()
    score = m.reshape(len(m), -1).max(1)
    flat = mt.flatten(1)
    inner = mt[:, 24:-24, 24:-24].flatten(1)
    variants = {"top1pct": flat.topk(flat.shape[1] // 100, 1).values.mean(1), "inner_max": inner.amax(1),
                "mean": flat.mean(1)}
    if xcal is not None:
        variants["posnorm_max"] = ((mt - cmean) / cstd).flatten(1).amax(1)
        variants["posdiv_max"] = (mt / (cmean + 1e-6)).flatten(1).amax(1)
        variants["posmean_max"] = (mt - cmean).flatten(1).amax(1)
    out = {"i_auroc": round(float(image_auroc(score, labels)), 4),
           "p_auroc": round(float(pixel_auroc(m, masks.numpy())), 4),
           "au_pro": round(float(au_pro(m, masks.numpy())), 4)}
    if xcal is not None:
        out["posnorm_au_pro"] = round(float(au_pro(((mt - cmean) / cstd).numpy(), masks.numpy())), 4)
    out.update({k: round(float(image_auroc(v.numpy(), labels)), 4) for k, v in variants.items()})
    if types is not None:  # each defect type against the good images, on the best-guess score
        key = "posdiv_max" if "posdiv_max" in variants else "top1pct"
        sc = variants[key].numpy()
        good = types == "good"
        out["per_type_" + key] = {t: round(float(image_auroc(np.r_[sc[good], sc[types == t]],
                                                             np.r_[np.zeros(good.sum()), np.ones((types == t).sum())])), 3)
                                  for t in sorted(set(types)) if t != "good"}
    return out


@torch.inference_mode()
def _maps(student: nn.Module, target: Target, mu: Tensor, sd: Tensor, x: Tensor, bf16: bool,
          blur: GaussianBlur) -> Tensor:
    student.eval()
    maps = []
    for i in range(0, len(x), 16):
        xb = x[i:i + 16].contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t = (target(xb) - mu) / sd
            s = student(xb)
        d = ((t - s.float()) ** 2).mean(1, keepdim=True)
        maps.append(blur(F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)))
    student.train()
    return torch.cat(maps)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--student", default="pdn", choices=["pdn", "lite"])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--layers", default="2,3")
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hard", type=float, default=0.0)
    ap.add_argument("--penalty", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=int, default=0)
    ap.add_argument("--extra", type=int, default=0)
    ap.add_argument("--sched", default="onecycle", choices=["onecycle", "const"])
    ap.add_argument("--norm", default="channel", choices=["channel", "global"])
    ap.add_argument("--bf16", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layers = tuple(int(v) for v in args.layers.split(","))
    data = DataConfig(root=str(quality_split.CATEGORIES[args.category]), image_size=args.size)
    train = build_dataset(data, "train")
    test = build_dataset(data, "test")
    sel, _rep = quality_split.halves(test, seed=quality_split.SPLIT_SEED)
    x = stack(train)
    xcal = None
    if args.holdout > 0:  # the last images (a fixed permutation) are kept out of training for map statistics
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        xcal, x = x[perm[:args.holdout]], x[perm[args.holdout:]]
    xs = torch.stack([test[i]["image"] for i in sel])
    ms = torch.stack([torch.as_tensor(test[i]["mask"]).reshape(args.size, args.size) > 0.5 for i in sel])
    ls = np.array([int(test[i]["label"]) for i in sel])
    ts = np.array([test.samples[i].defect_type for i in sel])
    target = Target(args.backbone, layers, args.pool).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
        tt = torch.cat([target(x[i:i + 32].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), 32)])
    mu = tt.mean((0, 2, 3), keepdim=True)
    sd = tt.std((0, 2, 3), keepdim=True) + 1e-6
    if args.norm == "global":  # one scale for all channels: high-variance channels weigh more, as in the kNN probe
        sd = torch.full_like(sd, float(tt.std()))
    tt = (tt - mu) / sd
    print(f"teacher cache {time.perf_counter() - t0:.1f}s target {tuple(tt.shape)}", flush=True)
    textures = None
    if args.penalty > 0:
        tex_files = sorted(Path(quality_split.TEXTURES).rglob("*.jpg"))[:400]
        from PIL import Image
        textures = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((args.size, args.size)),
                                                            dtype=np.float32) / 255.0).permute(2, 0, 1)
                                for p in tex_files])
    c = tt.shape[1]
    student = PatchNet(c, args.width, args.extra) if args.student == "pdn" else LiteStudent(args.backbone, layers, args.pool, c)
    student = student.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
             if args.sched == "onecycle" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    blur = GaussianBlur(4.0)
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    t_train = 0.0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        xb = x[idx]
        if torch.rand(1, generator=g).item() < 0.0:
            xb = xb.flip(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            s = student(xb.contiguous(memory_format=torch.channels_last))
            loss = loss_fn(tt[idx], s, args.hard)
            if textures is not None:
                j = torch.randint(0, len(textures), (args.batch,), generator=g)
                loss = loss + args.penalty * (student(textures[j].contiguous(memory_format=torch.channels_last)).float() ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.every == 0 or step == args.steps:
            t_train += time.perf_counter() - t0
            row = {"step": step, "train_min": round(t_train / 60, 2), "loss": round(float(loss), 4)}
            row.update(evaluate(student, target, mu, sd, xs, ls, ms, bool(args.bf16), blur, xcal, ts))
            print(json.dumps(row), flush=True)
            curve.append(row)
            t0 = time.perf_counter()
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
