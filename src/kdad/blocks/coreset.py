"""Greedy k-centre coreset of feature rows (PatchCore's memory subsampling, Roth et al., CVPR 2022, §3.2).

A random sample of a nearest-neighbour memory keeps the common patches and drops the rare ones: on an object
that lies at any angle, a rare pose of its tip is then far from every memory row and scores like a defect.
The greedy k-centre rule instead adds, one after another, the row farthest from all rows chosen so far, so
every training patch ends near a chosen one.

kdad's form, written for one CPU core (``docs/methods/patchst.md``, "Memory sampling"):
- distances in a random Gaussian projection to ``dim`` dimensions (PatchCore projects too, to 128);
- batched: each round takes the ``4 * batch`` rows farthest from the chosen set, runs the exact greedy rule
  among them for ``batch`` picks (their distances to each other taken into account), and then updates every
  row's distance to the chosen set with one matrix product. ``batch = 1`` is the textbook greedy algorithm.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _sq_dist(a: Tensor, b: Tensor, bb: Tensor) -> Tensor:
    """(n, d), (m, d), (m,) |b|^2 -> (n, m) squared distances, clamped at 0 (the matmul form)."""
    return ((a * a).sum(1, keepdim=True) - 2.0 * a @ b.t() + bb).clamp_min(0.0)


@torch.no_grad()
def greedy_coreset(rows: Tensor, size: int, *, dim: int = 64, batch: int = 1024, seed: int = 0,
                   bf16: bool = False) -> Tensor:
    """Indices (sorted, int64) of ``size`` rows of ``rows`` (n, c) chosen by batched greedy k-centre.

    All rows when ``size >= n``. The first row is drawn at random (``seed``); the projection is seeded too.
    ``bf16``: the products of the per-round update in bf16 (3x faster with AMX; distances still summed in fp32,
    off by about 1 % of a row's squared norm, which moves a pick among near-equally far rows, not coverage).
    """
    n = rows.shape[0]
    if size >= n:
        return torch.arange(n)
    if size <= 0:
        raise ValueError(f"coreset size must be positive, got {size}")
    g = torch.Generator().manual_seed(seed)
    x = rows.float()
    if x.shape[1] > dim:  # Johnson-Lindenstrauss: distances kept up to a small factor
        x = x @ (torch.randn(x.shape[1], dim, generator=g) / dim**0.5).to(x.device)
    xx = (x * x).sum(1)
    xl = x.to(torch.bfloat16) if bf16 else x
    first = int(torch.randint(n, (1,), generator=g))
    mind = _sq_dist(x, x[first:first + 1], xx[first:first + 1])[:, 0]
    mind[first] = -1.0  # chosen rows are marked -1: every update below keeps them there (distances are >= 0)
    picked = [first]
    while len(picked) < size:
        take = min(batch, size - len(picked))
        pool = torch.topk(mind, min(4 * take, n - len(picked))).indices  # the rows farthest from the chosen set
        # exact greedy inside the pool on its precomputed distance matrix (numpy: a pick costs microseconds)
        pd = mind[pool].cpu().numpy().copy()
        pair = _sq_dist(x[pool], x[pool], xx[pool]).cpu().numpy()
        local: list[int] = []
        for _ in range(take):
            j = int(pd.argmax())
            local.append(j)
            np.minimum(pd, pair[j], out=pd)
            pd[j] = -1.0  # never again
        new = pool[torch.tensor(local, device=pool.device)].tolist()
        idx = torch.tensor(new, device=x.device)
        cl, cxx = xl[idx], xx[idx]
        for i in range(0, n, 65536):  # in chunks: the (n, batch) matrix of a large memory would be hundreds of MB
            # min over the new rows of |c|^2 - 2 x.c, then + |x|^2: two passes over the (chunk, batch) product
            d = torch.addmm(cxx.to(cl.dtype), xl[i:i + 65536], cl.t(), alpha=-2.0).amin(1).float()
            mind[i:i + 65536] = torch.minimum(mind[i:i + 65536], (d + xx[i:i + 65536]).clamp_min(0.0))
        mind[idx] = -1.0
        picked += new
    return torch.tensor(sorted(picked), dtype=torch.int64)
