"""Atomic file writes: a fsynced temporary beside the target, then os.replace (no half-written files)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

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
