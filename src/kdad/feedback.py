"""`kdad feedback`: fine-tune a run on good images an operator marked as false alarms, recalibrate, compare.

The images in ``--good DIR`` are split (seeded) into a half the fine-tune trains on and a half it never sees,
which measures the "after" false-alarm rate honestly (`HOLDOUT`; with fewer than `MIN_IMAGES` images all of them
are trained on and the summary says the after-rate is measured on seen images). The fine-tune is `kdad.train.fit`
itself, started from the run's weights, on the run's training normals plus the trained half repeated to make up
``share`` of each epoch, for a few epochs with the run's method and optimizer recipe. fit then recalibrates as
it does after training: the method's ``calibrate`` hook, the conformal image threshold and the pixel threshold
on the run's held-out calibration normals (the same seeded split), and the invalid-input gate. The new run is
written to a temporary folder beside ``--out`` and renamed at the end: nothing of the old run is touched, and a
failure leaves nothing behind. ``feedback.json`` in the new run holds the before/after comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from kdad.errors import ConfigError, DatasetError, KdadError

HOLDOUT = 0.5  # share of the feedback images kept out of the fine-tune to measure the after-rate
MIN_IMAGES = 4  # fewer feedback images: no held-out half (each half would hold one image)
DEFAULT_EPOCHS = 3
DEFAULT_SHARE = 0.2  # the feedback images' share of each fine-tuning epoch (by repetition)


def _inputs(run: str | Path, good: str | Path, out: str | Path | None) -> tuple[Path, Path, Path]:
    """(model.ckpt, --good folder, new run folder), each checked; KdadError names the culprit."""
    path = Path(run)
    ckpt = path / "model.ckpt" if path.is_dir() else path
    if not path.exists():
        raise KdadError(f"RUN {path} not found: give a run folder (with model.ckpt)")
    if not ckpt.is_file() or ckpt.suffix != ".ckpt":
        raise KdadError(f"RUN {path} is not a run folder: it has no model.ckpt")
    run_dir = ckpt.parent
    good_dir = Path(good)
    if not good_dir.is_dir():
        raise KdadError(f"--good {good_dir}: folder not found")
    new = Path(out) if out else run_dir.with_name(f"{run_dir.name}-feedback-{time.strftime('%Y%m%d-%H%M%S')}")
    if new.exists():
        raise KdadError(f"--out {new} exists: give a new folder (kdad feedback never overwrites a run)")
    if new.resolve().is_relative_to(run_dir.resolve()):
        raise KdadError(f"--out {new} is inside RUN {run_dir}: the new run goes beside the old one, not into it")
    return ckpt, good_dir, new


def _feedback_images(good_dir: Path, image_size: Any) -> Any:
    """The good images as a FolderDataset, every file decoded once so an unreadable one is named now."""
    from kdad.data.folder import FolderDataset

    try:
        ds = FolderDataset(good_dir=good_dir, image_size=image_size, split="train")
    except DatasetError as e:
        raise DatasetError(f"--good {good_dir}: {e}") from None
    bad = []
    for i, s in enumerate(ds.samples):
        try:
            ds[i]
        except Exception as e:  # noqa: BLE001 (any decoder error: the file is what the user must see)
            bad.append(f"{s.image_path}: {e}")
    if bad:
        raise DatasetError(f"--good {good_dir}: {len(bad)} unreadable image(s):\n  " + "\n  ".join(bad[:10]))
    return ds


def split_feedback(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(indices to fine-tune on, indices held out) of n feedback images: a seeded permutation, the held-out part
    round(n * holdout) but at least 1 from each side; none held out when n < MIN_IMAGES or holdout is 0."""
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"--holdout must be in [0, 1), got {holdout!r}")
    if n < MIN_IMAGES or holdout == 0.0:
        return list(range(n)), []
    n_held = min(n - 1, max(1, round(n * holdout)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_held:]), sorted(perm[:n_held])


def repeats_for(n_train: int, n_fit: int, share: float) -> int:
    """How often each fine-tuning feedback image appears per epoch so that they make up about `share` of it."""
    if not 0.0 < share < 1.0:
        raise ConfigError(f"--share must be in (0, 1), got {share!r}")
    return max(1, round(share * n_train / ((1.0 - share) * max(1, n_fit))))


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rate(model: torch.nn.Module, thresholds: dict[str, Any], ds: Dataset | None, device: torch.device,
          batch_size: int, tiles: Any) -> dict[str, Any] | None:
    """Images of `ds` flagged at the image threshold: flagged, n, rate, and the scores (None for no images)."""
    from kdad.deploy.dataset import predict
    from kdad.deploy.postprocess import PostProcess

    if ds is None or len(ds) == 0:  # type: ignore[arg-type]
        return None
    scores = predict(model, ds, device, batch_size, keep_maps=False, tiles=tiles).scores
    k = int(PostProcess.from_thresholds(thresholds).flagged(scores).sum())
    ratio = np.asarray(scores, np.float64) / float(thresholds["image"])
    return {"flagged": k, "n": int(len(scores)), "rate": k / len(scores), "scores": [float(s) for s in scores],
            "median_score_over_threshold": float(np.median(ratio))}


def _test_metrics(model: torch.nn.Module, thresholds: dict[str, Any], cfg: Any, device: torch.device,
                  exclude: set[str]) -> dict[str, Any] | None:
    """Image AUROC, AU-PRO (kdad.evaluate.compute_metrics) and the false alarms on the test normals, over the
    test split less the images whose bytes are among the feedback images (`exclude`: SHA-256s); None without a
    test split. One category (multi-class runs are refused earlier)."""
    from kdad.data.factory import dataset_parts
    from kdad.deploy.dataset import predict
    from kdad.evaluate import compute_metrics, false_alarms
    from kdad.tiling import TileSpec

    try:
        (_, ds), = dataset_parts(cfg.data, "test")
    except (KdadError, OSError):
        return None
    pred = predict(model, ds, device, cfg.train.eval_batch_size, keep_maps=True, tiles=TileSpec.from_data(cfg.data))
    keep = np.array([_sha256(p) not in exclude for p in pred.paths])
    pred = dataclasses.replace(
        pred, scores=pred.scores[keep], labels=pred.labels[keep], map_means=pred.map_means[keep],
        paths=[p for p, k in zip(pred.paths, keep) if k],
        defect_types=[t for t, k in zip(pred.defect_types, keep) if k],
        maps=None if pred.maps is None else pred.maps[keep], masks=None if pred.masks is None else pred.masks[keep],
        has_mask=None if pred.has_mask is None else pred.has_mask[keep])
    metrics = compute_metrics(pred)
    return {"image_auroc": metrics.get("image_auroc"), "au_pro": metrics.get("au_pro"),
            "false_alarms": false_alarms(pred, thresholds), "n_images": int(keep.sum()),
            "excluded_feedback_images": int((~keep).sum())}


def _measure(model: torch.nn.Module, bundle: dict[str, Any], cfg: Any, parts: dict[str, Dataset | None],
             device: torch.device, exclude: set[str]) -> dict[str, Any]:
    """One model at its own thresholds: false alarms on each part (feedback halves, calibration normals) and
    the test metrics."""
    from kdad.align import AlignSpec, aligned_forward
    from kdad.tiling import TileSpec

    thr = dict(bundle.get("thresholds") or {})
    if thr.get("image") is None:
        raise KdadError("the run's model.ckpt stores no image threshold: nothing to compare false alarms with")
    model = aligned_forward(model.to(device).eval(), AlignSpec.from_data(cfg.data))  # parts hold raw images
    tiles = TileSpec.from_data(cfg.data)
    out: dict[str, Any] = {"image_threshold": float(thr["image"]), "pixel_threshold": thr.get("pixel")}
    for name, ds in parts.items():
        out[name] = _rate(model, thr, ds, device, cfg.train.eval_batch_size, tiles)
    out["test"] = _test_metrics(model, thr, cfg, device, exclude)
    return out


def _finetune(bundle: dict[str, Any], cfg: Any, extra: Dataset, tmp: Path) -> None:
    """kdad.train.fit into `tmp`, from the bundle's weights, on the training normals plus `extra`."""
    import warnings

    from kdad.train import fit

    with warnings.catch_warnings():  # fit's calibration warnings are kept in train_info and fed back below
        warnings.simplefilter("ignore", UserWarning)
        fit(cfg, tmp, start=bundle["model"], extra_normals=extra)


def feedback_run(run: str | Path, good: str | Path, out: str | Path | None = None, epochs: int = DEFAULT_EPOCHS,
                 device: str | None = None, holdout: float = HOLDOUT, share: float = DEFAULT_SHARE) -> dict[str, Any]:
    """Fine-tune `run` on its training normals plus the good images in `good`, recalibrate, write a new run.

    epochs: fine-tuning epochs; device: overrides the run's train.device; holdout: share of the good images kept
    out of the fine-tune to measure the after-rate; share: the good images' share of each epoch. Returns the
    summary written to <new run>/feedback.json (before/after false alarms, test metrics, paths).
    """
    from kdad.checkpoint import load_bundle, model_from_bundle
    from kdad.data.factory import _Tagged, category_name
    from kdad.seed import resolve_device
    from kdad.tiling import tiled_dataset
    from kdad.train import train_val_datasets

    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    from kdad.align import unaligned

    ckpt, good_dir, new = _inputs(run, good, out)
    bundle = load_bundle(ckpt)
    old_model, cfg = model_from_bundle(bundle)
    if cfg.data.categories:
        raise ConfigError(f"RUN {ckpt.parent} is a multi-class run (data.categories): kdad feedback fine-tunes "
                          "one-category runs (train with --per-category for one run per product)")
    tc = dataclasses.replace(cfg.train, epochs=epochs, max_iters=0, max_seconds=0.0,
                             device=device or cfg.train.device)
    cfg = dataclasses.replace(cfg, train=tc)
    images = _feedback_images(good_dir, cfg.data.image_size)
    fit_idx, held_idx = split_feedback(len(images), holdout, tc.seed)
    tagged = _Tagged(tiled_dataset(images, cfg.data), category_name(cfg.data))
    train_ds, calib_ds, _ = train_val_datasets(cfg)
    reps = repeats_for(len(train_ds), len(fit_idx), share)  # type: ignore[arg-type]
    fit_part = Subset(tagged, fit_idx)
    parts = {"feedback_trained": fit_part, "feedback_held_out": Subset(tagged, held_idx) if held_idx else None,
             "calibration_normals": unaligned(calib_ds if calib_ds is not None else train_ds)}
    exclude = {_sha256(s.image_path) for s in images.samples}
    dev = resolve_device(tc.device)
    before = _measure(old_model, bundle, cfg, parts, dev, exclude)
    tmp = new.with_name(f".{new.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        _finetune(bundle, cfg, ConcatDataset([fit_part] * reps), tmp)
        new_bundle = load_bundle(tmp / "model.ckpt")
        new_model, _ = model_from_bundle(new_bundle)
        after = _measure(new_model, new_bundle, cfg, parts, dev, exclude)
        summary = _summary(ckpt, good_dir, new, images, fit_idx, held_idx, reps, cfg, before, after,
                           calib_ds is not None, time.perf_counter() - t0, new_bundle)
        _write(tmp, summary, new_bundle)
        tmp.rename(new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summary(ckpt: Path, good_dir: Path, new: Path, images: Any, fit_idx: list[int], held_idx: list[int],
             reps: int, cfg: Any, before: dict[str, Any], after: dict[str, Any], held_out_calibration: bool,
             seconds: float, new_bundle: dict[str, Any]) -> dict[str, Any]:
    """The feedback.json dict."""
    paths = [str(s.image_path) for s in images.samples]
    notes = []
    if not held_idx:
        notes.append(f"only {len(paths)} good images (fewer than {MIN_IMAGES}) or --holdout 0: all were trained "
                     "on, so the after-rate on them is measured on images the fine-tune saw (optimistic); give "
                     f"at least {MIN_IMAGES} to hold half of them out")
    if not held_out_calibration:
        notes.append("the run has no held-out calibration normals (train.val_fraction=0): the calibration rates "
                     "are on training normals, and the thresholds carry no guarantee")
    notes.append("false alarms on the calibration normals are fixed by the threshold rule (the conformal threshold "
                 "flags n - k of them): a sanity check, not evidence; the held-out good images and the test "
                 "normals are the honest measures")
    notes += list((new_bundle.get("train_info") or {}).get("calibration_warnings", []))
    return {"run": str(ckpt.parent), "parent_checkpoint": str(ckpt), "parent_sha256": _sha256(ckpt),
            "new_run": str(new), "good": str(good_dir), "method": cfg.method, "epochs": cfg.train.epochs,
            "feedback_images_trained": [paths[i] for i in fit_idx],
            "feedback_images_held_out": [paths[i] for i in held_idx], "repeats_per_epoch": reps,
            "finetune_and_measure_seconds": seconds, "before": before, "after": after, "notes": notes}


def _write(tmp: Path, summary: dict[str, Any], new_bundle: dict[str, Any]) -> None:
    """feedback.json, and the provenance in the new model.ckpt (`feedback`: the parent and the images)."""
    from kdad.fileio import atomic_torch_save, atomic_write_text

    provenance = {k: summary[k] for k in ("run", "parent_sha256", "good", "feedback_images_trained",
                                          "feedback_images_held_out", "epochs", "repeats_per_epoch")}
    atomic_torch_save({**new_bundle, "feedback": provenance}, tmp / "model.ckpt")
    atomic_write_text(tmp / "feedback.json", json.dumps(summary, indent=2) + "\n")


def _rate_cell(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['flagged']}/{r['n']} = {r['rate']:.1%}"


def _ratio_cell(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['median_score_over_threshold']:.3f}"


def _num(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.4f}"


def describe(summary: dict[str, Any]) -> str:
    """The table `kdad feedback` prints: false alarms before and after, each model at its own threshold."""
    b, a = summary["before"], summary["after"]
    rows = [("image threshold", f"{b['image_threshold']:.5g}", f"{a['image_threshold']:.5g}"),
            ("false alarms, good images trained on", _rate_cell(b["feedback_trained"]),
             _rate_cell(a["feedback_trained"])),
            ("false alarms, good images held out", _rate_cell(b["feedback_held_out"]),
             _rate_cell(a["feedback_held_out"])),
            ("false alarms, calibration normals", _rate_cell(b["calibration_normals"]),
             _rate_cell(a["calibration_normals"]))]
    rows += [(f"median score / threshold, {what}", _ratio_cell(b[key]), _ratio_cell(a[key]))
             for key, what in (("feedback_trained", "trained on"), ("feedback_held_out", "held out"))]
    if b["test"] is not None and a["test"] is not None:
        fa_b, fa_a = b["test"]["false_alarms"], a["test"]["false_alarms"]
        rows += [("test image AUROC", _num(b["test"]["image_auroc"]), _num(a["test"]["image_auroc"])),
                 ("test AU-PRO", _num(b["test"]["au_pro"]), _num(a["test"]["au_pro"]))]
        if fa_b and fa_a:
            rows.append(("false alarms, test normals", f"{fa_b['flagged']}/{fa_b['n_good']} = {fa_b['rate']:.1%}",
                         f"{fa_a['flagged']}/{fa_a['n_good']} = {fa_a['rate']:.1%}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'before':>18}  {'after':>18}"]
    lines += [f"{r[0]:{width}}  {r[1]:>18}  {r[2]:>18}" for r in rows]
    if b["test"] is not None and b["test"]["excluded_feedback_images"]:
        lines.append(f"(test metrics leave out the {b['test']['excluded_feedback_images']} test images that are "
                     "among the good images fed back)")
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"wrote {summary['new_run']} (model.ckpt, feedback.json); {summary['run']} is unchanged")
    return "\n".join(lines)
