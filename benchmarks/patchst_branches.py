"""What each branch of `patchst_cpu` brings (issue 18), SELECTION half only: it chooses nothing for a preset.

Trains `patchst_cpu` (or reuses a run folder), then scores the selection half with the student's map alone, the
memory's alone, the preset's sum, and fusions that weigh each branch by its held-out normals' image maxima:
  scaled       each branch's map over the std of its maxima over the held-out normals, then added
  max_norm     the larger of the two branch scores, each over the mean of its held-out maxima
Every branch map is first divided by its held-out per-position mean, as in the preset; image score = max.
Grids are cached in the run folder (grids.pt), so a rerun only re-scores.

Run: python benchmarks/patchst_branches.py --category screws --seed 0 [--run DIR] [--out results/patchst_branches.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F

from kdad.blocks.maps import divide_by_mean
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.config import load_config
from kdad.data.factory import build_dataset
from kdad.metrics import au_pro, image_auroc
from kdad.train import fit, train_val_datasets


def branch_maps(model: Any, ds: Any, idx: list[int]) -> torch.Tensor:
    """(N, 2, H, W): each branch's error over its per-position mean, upsampled and blurred as the preset's map."""
    out = []
    with torch.no_grad():
        for i in range(0, len(idx), 16):
            x = torch.stack([ds[j]["image"] for j in idx[i:i + 16]])
            d = divide_by_mean(model.error_grid(x), model.map_mean)
            u = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out.append(model.blur(u.flatten(0, 1).unsqueeze(1)).view(u.shape))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", help="a patchst_cpu run folder to reuse (trained here when it has no model.ckpt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(_common.RESULTS / "patchst_branches.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run or f"/tmp/kdad_patchst_branches/{args.category}_{args.seed}")
    if not (run / "model.ckpt").is_file():
        cfg = load_config("patchst_cpu", [], [f"data.root={_common.CATEGORIES[args.category]}",
                                              f"train.seed={args.seed}", "train.progress=false"])
        fit(cfg, run)
    model, cfg = model_from_bundle(load_bundle(run / "model.ckpt"))
    model.eval()
    test = build_dataset(cfg.data, "test")
    sel, _ = _common.halves(test)
    cache = run / "grids.pt"
    if cache.is_file():
        g, v = torch.load(cache)
    else:
        _, val, _ = train_val_datasets(cfg)  # the held-out normals fit calibrated on (same seeded split)
        g, v = branch_maps(model, test, sel), branch_maps(model, val, list(range(len(val))))  # type: ignore[arg-type]
        torch.save((g, v), cache)
    labels = np.array([int(test[j]["label"]) for j in sel])
    masks = np.stack([test[j]["mask"][0].numpy() > 0.5 for j in sel])

    def mx(m: torch.Tensor) -> np.ndarray:
        return m.flatten(1).amax(1).numpy()

    st, me = g[:, :1], g[:, 1:]
    vs, vm = mx(v[:, :1]), mx(v[:, 1:])
    maps = {"student": st, "memory": me, "sum (preset)": st + me,
            "scaled": st / float(vs.std()) + me / float(vm.std())}
    row: dict[str, Any] = {"category": args.category, "seed": args.seed, "half": "selection",
                           "preset": "patchst_cpu", "memory_sampling": cfg.model.get("memory_sampling"),
                           "n_held_out": len(vs)}
    row["image_auroc"] = {k: round(float(image_auroc(mx(m), labels)), 4) for k, m in maps.items()}
    row["image_auroc"]["max_norm"] = round(float(image_auroc(np.maximum(mx(st) / vs.mean(), mx(me) / vm.mean()),
                                                             labels)), 4)
    row["au_pro"] = {k: round(float(au_pro(m[:, 0].numpy(), masks)), 4) for k, m in maps.items()}
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"question": __doc__.split("\n")[0], "rows": []}
    doc["rows"] = [r for r in doc["rows"] if (r["category"], r["seed"]) != (args.category, args.seed)] + [row]
    doc["meta"] = _common.metadata()
    _common.write_json(out, doc)


if __name__ == "__main__":
    main()
