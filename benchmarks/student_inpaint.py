"""Exploration (issue 18, session 20), SELECTION half only: an inpainting patch student.

benchmarks/student_residual.py shows that `patchst_cpu`'s student under-responds to defects: its image scores on
defective images are about 1.6x the normals', the memory branch's 2.8x. If the student scores low because it
sees the defect and reproduces it, a student that must predict a position's target without seeing its image
block cannot. Training: each batch hides one phase of a lattice of `--block`-px blocks (a quarter of them, at
a random 8-px offset; hidden pixels are 0 after normalisation) and the hard-feature loss counts only the hidden
positions, against the teacher's features of the clean image. Test: four passes, one per phase, each position
taken from the pass that hides it ("masked"); the same student on the clean image ("clean"); their sum
("both"). Each map is divided by the held-out normals' per-position mean and blurred as the preset's.
Teacher, pooling, standardisation, loss, optimiser and epochs are `patchst_cpu`'s (student: `--extra` dilated
layers to see past a hidden block). It chooses nothing for a preset.

Run: python benchmarks/student_inpaint.py --category magnetic_tile --seed 0 --block 16 --extra 2 [--out ...]
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
from torch import Tensor
from torch.utils.data import DataLoader

from kdad.blocks.maps import divide_by_mean
from kdad.config import load_config
from kdad.data.factory import build_dataset
from kdad.methods.patchst import Config, Model, hard_mse, prepare
from kdad.metrics import au_pro, image_auroc
from kdad.train import train_val_datasets

PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def hidden_cells(h: int, w: int, cells: int, phase: tuple[int, int], offset: tuple[int, int]) -> Tensor:
    """(h, w) bool over the stride-8 grid: the cells of the lattice's blocks (``cells`` x ``cells``) of one phase."""
    i = (torch.arange(h) + offset[0]) // cells
    j = (torch.arange(w) + offset[1]) // cells
    return (i % 2 == phase[0])[:, None] & (j % 2 == phase[1])[None, :]


def hide(xn: Tensor, cells: Tensor) -> Tensor:
    """Zero the pixels of the hidden cells of a normalised batch."""
    pixels = cells.repeat_interleave(8, 0).repeat_interleave(8, 1)
    return xn * (~pixels).to(xn.dtype)


def loader(ds: Any, seed: int, shuffle: bool) -> DataLoader:
    return DataLoader(ds, batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def train(model: Model, ds: Any, cells: int, epochs: int, seed: int) -> float:
    """Train the student on hidden positions only; returns training minutes."""
    opt = torch.optim.Adam(model.student.parameters(), lr=model.cfg.lr, weight_decay=model.cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    model.student.train()
    for epoch in range(epochs):
        for batch in loader(ds, seed + epoch, True):
            x = batch["image"]
            t = model.target(x)
            phase = tuple(torch.randint(0, 2, (2,), generator=gen).tolist())
            offset = tuple(torch.randint(0, cells, (2,), generator=gen).tolist())
            m = hidden_cells(t.shape[-2], t.shape[-1], cells, phase, offset)  # type: ignore[arg-type]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s = model.student(hide(model.encoder.normalize(x), m))
            loss = hard_mse(t.permute(0, 2, 3, 1)[:, m], s.float().permute(0, 2, 3, 1)[:, m], model.cfg.hard_quantile)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch} loss {loss.item():.4f}", flush=True)
    model.student.eval()
    return (time.perf_counter() - t0) / 60


@torch.no_grad()
def error_grids(model: Model, ds: Any, idx: list[int], cells: int) -> tuple[Tensor, Tensor]:
    """(masked, clean) (N, 1, h, w) mean squared errors."""
    masked, clean = [], []
    for i in range(0, len(idx), 8):
        x = torch.stack([ds[j]["image"] for j in idx[i:i + 8]])
        t = model.target(x)
        xn = model.encoder.normalize(x)
        pred = torch.zeros_like(t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for phase in PHASES:
                m = hidden_cells(t.shape[-2], t.shape[-1], cells, phase, (0, 0))
                pred[:, :, m] = model.student(hide(xn, m)).float()[:, :, m]
            full = model.student(xn).float()
        masked.append(((t - pred) ** 2).mean(1, keepdim=True))
        clean.append(((t - full) ** 2).mean(1, keepdim=True))
    return torch.cat(masked), torch.cat(clean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="magnetic_tile", choices=sorted(_common.CATEGORIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=16, help="hidden block size in px, a multiple of 8")
    ap.add_argument("--extra", type=int, default=2, help="dilated student layers (each widens its view by 32 px)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_common.RESULTS / "student_inpaint.json"))
    args = ap.parse_args()
    if args.block % 8 or args.block < 8:
        ap.error(f"--block must be a positive multiple of 8 (the feature grid's stride), got {args.block}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config("patchst_cpu", [], [f"data.root={_common.CATEGORIES[args.category]}",
                                          f"train.seed={args.seed}", "model.memory=0", f"model.extra={args.extra}"])
    model = Model(Config(**{k: tuple(v) if k == "layers" else v for k, v in cfg.model.items()}))
    fit_set, val, _ = train_val_datasets(cfg)
    prepare(model, loader(fit_set, args.seed, False), torch.device("cpu"))
    cells = args.block // 8
    minutes = train(model, fit_set, cells, args.epochs, args.seed)
    test = build_dataset(cfg.data, "test")
    sel, _ = _common.halves(test)
    types = np.array([test.samples[j].defect_type for j in sel])
    labels = (types != "good").astype(int)
    masks = np.stack([test[j]["mask"][0].numpy() > 0.5 for j in sel])
    held, got = error_grids(model, val, list(range(len(val))), cells), error_grids(model, test, sel, cells)
    row: dict[str, Any] = {"category": args.category, "seed": args.seed, "block": args.block, "extra": args.extra,
                           "epochs": args.epochs, "half": "selection", "train_minutes": round(minutes, 2)}
    pairs = {"masked": (got[0], held[0]), "clean": (got[1], held[1]),
             "both": (torch.cat(got, 1), torch.cat(held, 1))}
    for name, (g, v) in pairs.items():
        d = divide_by_mean(g, v.mean(0, keepdim=True).clamp_min(1e-6)).sum(1, keepdim=True)
        amap = model.blur(F.interpolate(d, size=g.shape[-1] * 8, mode="bilinear", align_corners=False))[:, 0]
        sc = amap.flatten(1).amax(1).numpy()
        row[name] = {"image_auroc": round(float(image_auroc(sc, labels)), 4),
                     "au_pro": round(float(au_pro(amap.numpy(), masks)), 4)}
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"question": __doc__.split("\n")[0], "rows": []}
    key = (args.category, args.seed, args.block, args.extra, args.epochs)
    doc["rows"] = [r for r in doc["rows"] if (r["category"], r["seed"], r["block"], r["extra"], r["epochs"]) != key]
    doc["rows"].append(row)
    doc["meta"] = _common.metadata()
    _common.write_json(out, doc)


if __name__ == "__main__":
    main()
