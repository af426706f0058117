"""Shared fixtures: where ../shared lives (CI clones the repo elsewhere with shared/ beside it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Under pytest-xdist (the README's `-n auto`) each worker gets its share of the cores: torch's default of one
# thread per core in every worker would oversubscribe the CPU, and OpenMP threads that spin-wait then stall.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    torch.set_num_threads(max(1, _cores // _WORKERS))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def bottle_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "mvtec_ad" / "bottle"


@pytest.fixture
def tiny_batch() -> dict[str, torch.Tensor]:
    """Two seeded random 64 px images with empty masks: enough for one train_step of any method on CPU."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return {"image": images, "mask": torch.zeros(2, 1, 64, 64)}
