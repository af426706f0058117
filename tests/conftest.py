"""Shared fixtures: where ../shared lives (CI clones the repo elsewhere with shared/ beside it)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def bottle_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "mvtec_ad" / "bottle"
