"""Batch inference over files, folders and glob patterns, streamed in bounded memory."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdad.data.transforms import is_image_file
from kdad.deploy.postprocess import PostProcess, gate_scores_of, post_of
from kdad.errors import KdadError
from kdad.fileio import atomic_write_bytes
from kdad.tiling import image_loader, images_per_call


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (recursive) and glob patterns -> sorted unique image paths; errors name the input."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
        elif p.is_file():
            out.append(p)
        else:
            hits = sorted(Path(h) for h in glob.glob(item, recursive=True) if is_image_file(h))
            if not hits:
                raise KdadError(f"no image matches {item!r} (not a file, folder or glob with images)")
            out += hits
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


class _Paths(Dataset):
    def __init__(self, paths: list[Path], size: int, load: Callable[[Path], torch.Tensor]) -> None:
        self.paths, self.size, self.load = paths, size, load  # `load` carries the size rule and the pixel cap

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.paths[i]
        try:
            return {"image": self.load(p), "path": str(p), "error": ""}
        except Exception as e:  # noqa: BLE001  # a bad file must not stop a long batch run: it is reported per row
            return {"image": torch.zeros(3, self.size, self.size), "path": str(p), "error": str(e)}


@dataclass
class Row:
    """One prediction."""

    path: str
    score: float
    decision: int | None  # 1 anomalous, 0 normal; None: invalid, unreadable or no threshold
    error: str = ""
    label: str | None = None  # "normal" | "anomalous" | "invalid" (PostProcess.verdict); None: undecided
    reason: str | None = None  # why an image is invalid
    gate_score: float | None = None  # the invalid-input gate's score (None without a gate)


def stream_predictions(runner: Any, paths: list[Path], size: int, batch_size: int = 16, workers: int = 0,
                       progress: bool = True, max_megapixels: float | None = None,
                       ) -> Iterator[tuple[Row, np.ndarray | None, np.ndarray | None]]:
    """Yield (row, map (H,W), image01 (H,W,3)) per image; memory bounded by one batch (one image when tiled).

    An image above the pixel cap (`max_megapixels`, default the shared one) becomes an error row, undecoded.
    """
    loader = DataLoader(_Paths(paths, size, image_loader(runner, size, max_megapixels)),
                        batch_size=images_per_call(runner, batch_size), num_workers=workers, shuffle=False)
    post = post_of(runner)
    for batch in tqdm(loader, desc="predict", disable=not progress):
        maps, scores = runner(batch["image"])
        gates = gate_scores_of(runner, batch["image"])
        for i, p in enumerate(batch["path"]):
            err = batch["error"][i]
            if err:
                yield Row(p, float("nan"), None, err), None, None
                continue
            yield (row_of(post, p, float(scores[i]), None if gates is None else float(gates[i]),
                          batch["image"][i].permute(1, 2, 0).numpy()),
                   maps[i], batch["image"][i].permute(1, 2, 0).numpy())


def row_of(post: PostProcess, path: str, score: float, gate_score: float | None, image01: np.ndarray) -> Row:
    """One image's row: its verdict (invalid first, then the anomaly rule) with the reason."""
    label, reason = post.verdict(score, gate_score, image01)
    decision = None if label in (None, "invalid") else int(label == "anomalous")
    return Row(path, score, decision, label=label, reason=reason, gate_score=gate_score)


def common_base(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding every path (None for no paths), so output names stay short."""
    if not paths:
        return None
    parents = [str(p.resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents))


def out_name(path: str, suffix: str, base: Path | None = None) -> str:
    """Flattened output name for a path (relative to `base` if given): a/b/c.png -> a__b__c<suffix>.

    Not unique on its own (a/b.png and a__b.png, or b.png and b.jpg, flatten alike): use :func:`out_stems`.
    """
    p = Path(path)
    if base is not None:
        try:
            p = p.resolve().relative_to(base)
        except ValueError:
            pass
    stem = p.with_suffix("").as_posix().strip("/").replace("/", "__")
    return f"{stem}{suffix}"


def out_stems(paths: Sequence[Path], base: Path | None = None) -> dict[str, str]:
    """str(path) -> a flattened output stem unique among `paths`; returns the map and nothing is written.

    The first path (in input order) with a given flattened stem keeps it; later ones get `~2`, `~3`, ...,
    never a stem another path has naturally, so no overlay or mask overwrites another.
    """
    natural = {str(p): out_name(str(p), "", base) for p in paths}
    taken = set(natural.values())
    out: dict[str, str] = {}
    used: set[str] = set()
    for key, stem in natural.items():
        if stem in used:
            k = 2
            while f"{stem}~{k}" in taken or f"{stem}~{k}" in used:
                k += 1
            stem = f"{stem}~{k}"
        used.add(stem)
        out[key] = stem
    return out


def write_table(rows: list[Row], out_dir: Path) -> None:
    """predictions.csv and predictions.json, written atomically.

    Paths keep their bytes: the CSV holds a non-UTF-8 name's original bytes, the (ASCII) JSON escapes them
    as surrogates (`"caf\\udce9.png"`), which `os.fsencode(json.loads(...))` turns back into the name.
    """
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "score", "decision", "error", "label", "reason", "gate_score"])
    for r in rows:
        w.writerow([r.path, f"{r.score:.6g}", "" if r.decision is None else r.decision, r.error, r.label or "",
                    r.reason or "", "" if r.gate_score is None else f"{r.gate_score:.6g}"])
    # file names that are not valid UTF-8 arrive as surrogate escapes: write their original bytes back
    atomic_write_bytes(out_dir / "predictions.csv", buf.getvalue().encode("utf-8", "surrogateescape"))
    data = [{"path": r.path, "score": None if np.isnan(r.score) else r.score, "decision": r.decision,
             "error": r.error or None, "label": r.label, "reason": r.reason, "gate_score": r.gate_score}
            for r in rows]
    atomic_write_bytes(out_dir / "predictions.json", json.dumps(data, indent=1).encode())


