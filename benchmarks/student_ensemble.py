"""Exploration for issue 18: K patch students trained side by side, scored on the SELECTION half of a category.

Compares, from the same checkpoints: one student, the mean of K students' position-normalised error maps, the
kNN distance on the same (standardised) target features, and the sum of the KD and kNN maps. Every map is
divided by its per-position mean on held-out training normals (PatchST's map_norm: position). Never reads the
report half.

Run: python benchmarks/student_ensemble.py --k 3 --steps 1500 --every 500 --out /tmp/ens.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F
from student_explore import Target, stack
from torch import Tensor

from kdad.blocks.maps import GaussianBlur
from kdad.blocks.patchnet import PatchNet
from kdad.config import DataConfig
from kdad.data.factory import build_dataset
from kdad.methods.patchst import hard_mse
from kdad.metrics import au_pro, image_auroc


def cat_batches(fn: Any, x: Tensor, bs: int = 16) -> Tensor:
    return torch.cat([fn(x[i:i + bs].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), bs)])


@torch.inference_mode()
def error_grid(student: PatchNet, x: Tensor, t: Tensor, bf16: bool) -> Tensor:
    """(N, h, w) mean squared error per position against the cached standardised target."""
    student.eval()
    out = []
    for i in range(0, len(x), 16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s = student(x[i:i + 16].contiguous(memory_format=torch.channels_last))
        out.append(((t[i:i + 16] - s.float()) ** 2).mean(1))
    student.train()
    return torch.cat(out)


@torch.inference_mode()
def knn_grid(bank: Tensor, t: Tensor) -> Tensor:
    out = []
    for i in range(len(t)):
        q = t[i].permute(1, 2, 0).reshape(-1, t.shape[1])
        out.append(torch.cdist(q, bank).min(1).values.view(t.shape[2], t.shape[3]))
    return torch.stack(out)


def to_map(g: Tensor, size: int, blur: GaussianBlur) -> Tensor:
    return blur(F.interpolate(g[:, None], size=(size, size), mode="bilinear", align_corners=False))[:, 0]


def scores(name: str, g_test: Tensor, g_cal: Tensor, size: int, blur: GaussianBlur, labels: np.ndarray,
           masks: np.ndarray, types: np.ndarray, pro: bool) -> dict[str, Any]:
    m = to_map(g_test / g_cal.mean(0).clamp_min(1e-6), size, blur)
    flat = m.flatten(1)
    s = flat.amax(1).numpy()
    good = types == "good"
    out = {f"{name}_i": round(float(image_auroc(s, labels)), 4),
           f"{name}_top1": round(float(image_auroc(flat.topk(flat.shape[1] // 100, 1).values.mean(1).numpy(), labels)), 4),
           f"{name}_types": {t: round(float(image_auroc(np.r_[s[good], s[types == t]],
                                                        np.r_[np.zeros(good.sum()), np.ones((types == t).sum())])), 3)
                             for t in sorted(set(types)) if t != "good"}}
    if pro:
        out[f"{name}_aupro"] = round(float(au_pro(m.numpy(), masks)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--extra", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hard", type=float, default=0.99)
    ap.add_argument("--holdout", type=int, default=40)
    ap.add_argument("--memory", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--save-grids", default="", help="torch.save the error grids of the last checkpoint here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = 256
    data = DataConfig(root=str(_common.CATEGORIES[args.category]), image_size=size)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    sel, _rep = _common.halves(test, seed=_common.SPLIT_SEED)
    x = stack(train)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    xcal, x = x[perm[:args.holdout]], x[perm[args.holdout:]]
    xs = torch.stack([test[i]["image"] for i in sel])
    masks = np.stack([np.asarray(test[i]["mask"]).reshape(size, size) > 0.5 for i in sel])
    labels = np.array([int(test[i]["label"]) for i in sel])
    types = np.array([test.samples[i].defect_type for i in sel])
    target = Target("efficientnet_lite0", (2, 3), 3).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
        tt, tc, ts = (cat_batches(target, v) for v in (x, xcal, xs))
    mu, sd = tt.mean((0, 2, 3), keepdim=True), tt.std((0, 2, 3), keepdim=True) + 1e-6
    tt, tc, ts = ((v - mu) / sd for v in (tt, tc, ts))
    blur = GaussianBlur(4.0)
    g = torch.Generator().manual_seed(args.seed)
    flat = tt.permute(0, 2, 3, 1).reshape(-1, tt.shape[1])
    bank = flat[torch.randperm(len(flat), generator=g)[:args.memory]]
    t0 = time.perf_counter()
    knn_cal, knn_test = knn_grid(bank, tc), knn_grid(bank, ts)
    base = {"knn_seconds": round(time.perf_counter() - t0, 1)}
    base.update(scores("knn", knn_test, knn_cal, size, blur, labels, masks, types, True))
    print(json.dumps(base), flush=True)
    students = [PatchNet(tt.shape[1], args.width, args.extra).to(memory_format=torch.channels_last) for _ in range(args.k)]
    opts = [torch.optim.Adam(s.parameters(), lr=args.lr, weight_decay=1e-5) for s in students]
    curve: list[dict[str, Any]] = []
    t_train = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        for s, o in zip(students, opts, strict=True):
            idx = torch.randint(0, len(x), (args.batch,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
                loss = hard_mse(tt[idx], s(x[idx].contiguous(memory_format=torch.channels_last)), args.hard)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
        t_train += time.perf_counter() - t0
        if step % args.every and step != args.steps:
            continue
        row: dict[str, Any] = {"step": step, "train_min_all_students": round(t_train / 60, 2)}
        gc = [error_grid(s, xcal, tc, bool(args.bf16)) for s in students]
        gt = [error_grid(s, xs, ts, bool(args.bf16)) for s in students]
        row.update(scores("one", gt[0], gc[0], size, blur, labels, masks, types, True))
        ens_t = torch.stack([a / b.mean(0).clamp_min(1e-6) for a, b in zip(gt, gc, strict=True)]).mean(0)
        ens_c = torch.stack([b / b.mean(0).clamp_min(1e-6) for b in gc]).mean(0)
        row.update(scores("ens", ens_t, ens_c, size, blur, labels, masks, types, True))
        kn_t, kn_c = knn_test / knn_cal.mean(0).clamp_min(1e-6), knn_cal / knn_cal.mean(0).clamp_min(1e-6)
        row.update(scores("fuse", ens_t + kn_t, ens_c + kn_c, size, blur, labels, masks, types, True))
        print(json.dumps(row), flush=True)
        curve.append(row)
    if args.save_grids:  # for offline fusion variants: test/cal error grids, target features and labels
        torch.save({"gt": gt, "gc": gc, "tt": tt, "tc": tc, "ts": ts, "mu": mu, "sd": sd, "labels": labels, "masks": masks,
                    "types": types}, args.save_grids)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "benchmarks/student_ensemble.py", "args": vars(args),
                                              "knn": base, "curve": curve, "meta": _common.metadata()}, indent=1))


if __name__ == "__main__":
    main()
