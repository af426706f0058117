"""Inference over a dataset: every item's map and score gathered into `Predictions` (test, thresholds, selection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdad.tiling import TileSpec, image_score, metric_hw, metric_view, model_forward, stitched_map


@dataclass
class Predictions:
    """Model outputs over a dataset: maps (N,H,W) float32, scores (N,), labels (N,), masks (N,H,W) bool."""

    scores: np.ndarray
    labels: np.ndarray
    paths: list[str]
    defect_types: list[str]
    map_means: np.ndarray
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    has_mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def predict(model: nn.Module | Any, ds: Dataset, device: torch.device, batch_size: int = 16, keep_maps: bool = True,
            progress: bool = False, num_workers: int = 0, tiles: TileSpec | None = None) -> Predictions:
    """Forward every item of `ds`; keep full maps only when asked (they dominate memory).

    model: a method's Model, or a runner (kdad.deploy.runner.Runner, e.g. an ONNX graph: `kdad test --backend
    onnx`), called on images in [0, 1] as they come from the dataset.
    tiles: items are whole images at their tiled size; each is cut into tiles and its map stitched
    (kept maps and masks are brought to one size for metrics, see kdad.tiling.metric_view)."""
    if tiles is not None:
        return _predict_tiled(model, ds, device, tiles, batch_size, keep_maps, progress, num_workers)
    if not isinstance(model, nn.Module):
        return _predict_runner(model, ds, batch_size, keep_maps, progress, num_workers)
    was_training = model.training
    model.eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, labels, means, paths, types, maps, masks, has_mask = [], [], [], [], [], [], [], []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not progress):
        out = model(batch["image"].to(device))
        amap = out.anomaly_map.float()
        scores.append(out.score.float().cpu().numpy())
        means.append(amap.mean(dim=(1, 2, 3)).cpu().numpy())
        labels.append(np.asarray(batch["label"]))
        paths += list(batch["path"])
        types += list(batch["defect_type"])
        if keep_maps:
            maps.append(amap[:, 0].cpu().numpy().astype(np.float32))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
            has_mask.append(np.asarray(batch.get("has_mask", torch.ones(len(batch["path"]), dtype=torch.bool))))
    model.train(was_training)
    return Predictions(
        scores=np.concatenate(scores), labels=np.concatenate(labels).astype(np.int64), paths=paths,
        defect_types=types, map_means=np.concatenate(means),
        maps=np.concatenate(maps) if keep_maps else None, masks=np.concatenate(masks) if keep_maps else None,
        has_mask=np.concatenate(has_mask).astype(bool) if keep_maps else None,
    )


def _predict_runner(runner: Any, ds: Dataset, batch_size: int, keep_maps: bool, progress: bool,
                    num_workers: int) -> Predictions:
    """predict() through a runner: numpy maps (B, H, W) and scores (B,) per batch."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, labels, means, paths, types, maps, masks, has_mask = [], [], [], [], [], [], [], []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not progress):
        amap, score = runner(batch["image"])
        amap = np.asarray(amap, np.float32)
        scores.append(np.asarray(score, np.float32))
        means.append(amap.reshape(len(amap), -1).mean(axis=1))
        labels.append(np.asarray(batch["label"]))
        paths += list(batch["path"])
        types += list(batch["defect_type"])
        if keep_maps:
            maps.append(amap)
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
            has_mask.append(np.asarray(batch.get("has_mask", torch.ones(len(batch["path"]), dtype=torch.bool))))
    return Predictions(
        scores=np.concatenate(scores), labels=np.concatenate(labels).astype(np.int64), paths=paths,
        defect_types=types, map_means=np.concatenate(means),
        maps=np.concatenate(maps) if keep_maps else None, masks=np.concatenate(masks) if keep_maps else None,
        has_mask=np.concatenate(has_mask).astype(bool) if keep_maps else None,
    )


def _predict_tiled(model: nn.Module | Any, ds: Dataset, device: torch.device, spec: TileSpec, batch_size: int,
                   keep_maps: bool, progress: bool, num_workers: int) -> Predictions:
    """predict() over whole images cut into tiles: one image per step (sizes may differ), its tiles in
    chunks of batch_size; score = image_score of the full-size stitched map, metric maps at one shared size."""
    is_model = isinstance(model, nn.Module)
    was_training = is_model and model.training
    forward = model_forward(model.eval(), device) if is_model else model
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers)  # items unbatched
    scores, labels, means, paths, types, maps, masks, has_mask = [], [], [], [], [], [], [], []
    size: tuple[int, int] | None = None
    for item in tqdm(loader, desc="predict (tiled)", leave=False, disable=not progress):
        amap = stitched_map(forward, item["image"], spec, batch_size)
        scores.append(image_score(amap, spec))
        means.append(float(amap.mean()))
        labels.append(int(item["label"]))
        paths.append(item["path"])
        types.append(item["defect_type"])
        if keep_maps:
            size = size or metric_hw((int(amap.shape[0]), int(amap.shape[1])), spec)
            view, gt = metric_view(amap, item["mask"][0].numpy() > 0.5, size)
            maps.append(view)
            masks.append(gt)
            has_mask.append(bool(item.get("has_mask", True)))
    if is_model:
        model.train(was_training)
    return Predictions(
        scores=np.asarray(scores, np.float32), labels=np.asarray(labels, np.int64), paths=paths, defect_types=types,
        map_means=np.asarray(means, np.float32), maps=np.stack(maps) if keep_maps else None,
        masks=np.stack(masks) if keep_maps else None, has_mask=np.asarray(has_mask, bool) if keep_maps else None,
        extra={"tiling": {**spec.to_dict(), "metric_map_size": list(size) if size else None}},
    )
