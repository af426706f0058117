"""Checkpoint bundles: weights + resolved config + thresholds + kdad version, written atomically.

Bundles hold only tensors and plain Python values, so they load with `torch.load(weights_only=True)`.
The full model state (frozen teacher included) is stored, so a bundle is self-contained: serving or
exporting it never needs the teacher's ImageNet file again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from kdad import __version__
from kdad.config import RunConfig, build_config, method_config, to_dict
from kdad.errors import KdadError

FORMAT = 1
TMP_SUFFIX = ".tmp"  # atomic writes' temporaries: .<name>.<random>.tmp beside the target


def _umask_mode() -> int:
    """0o666 minus the process umask: mkstemp creates 0o600 files, which other users could not read."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file object on a temporary beside `path`; on success it is fsynced, then renamed over `path`.

    The fsync before os.replace makes the rename publish complete data even after a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, _umask_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` via a fsynced temporary file in the same folder and os.replace."""
    with _atomic_file(Path(path)) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a fsynced temporary file + os.replace, so a crash never leaves a half-written file."""
    with _atomic_file(Path(path)) as f:
        torch.save(obj, f)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the `.<name>.*.tmp` files an atomic write leaves when its process is killed; returns them.

    Only for a folder no other process is writing to (a run folder at the start of `fit`).
    """
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def make_bundle(model: nn.Module, cfg: RunConfig, **extra: Any) -> dict[str, Any]:
    """The dict written to disk: format, version, method, config, model state and extras."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "kdad_version": __version__, "method": cfg.method, "config": to_dict(cfg),
            "model": state, **extra}


def load_bundle(path: str | Path) -> dict[str, Any]:
    """Read a bundle with weights_only=True; errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.ckpt"
    if not p.is_file():
        raise KdadError(f"checkpoint not found: {p}")
    try:
        bundle = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise KdadError(f"cannot read checkpoint {p}: {e}") from e
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise KdadError(f"{p} is not a kdad checkpoint (format {FORMAT})")
    return bundle


def model_from_bundle(bundle: dict[str, Any]) -> tuple[nn.Module, RunConfig]:
    """Rebuild the model (teacher built without weights, then the stored state loaded) in eval mode."""
    from kdad.methods import get_method

    cfg = build_config(bundle["config"], where="checkpoint config")
    spec = get_method(cfg.method)
    mcfg = method_config(cfg)
    if hasattr(mcfg, "weights"):
        mcfg = dataclasses.replace(mcfg, weights="random")  # the state loaded below holds the teacher
    model = spec.Model(mcfg)
    model.load_state_dict(bundle["model"], strict=True)
    model.eval()
    return model, cfg
