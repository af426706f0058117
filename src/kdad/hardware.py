"""What this machine offers: hardware bf16 on the CPU, its threads for a run, and glibc's allocator (heap lever, heap
release)."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import warnings
from collections.abc import Iterator
from typing import Any


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX-BF16); None where it cannot be told
    (no /proc/cpuinfo). Without them oneDNN emulates bf16, and a bf16 step was measured 20x slower than fp32
    (an AVX2-only EPYC: a Lite0 teacher batch took 96 s in bf16 against 4 s in fp32)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_bf16_enabled(setting: bool | str) -> bool:
    """Whether train.cpu_bf16 trains in bf16 on this CPU: true and false as given; "auto" only where the CPU has
    bf16 in hardware (cpu_has_fast_bf16), so a preset stays usable on an AVX2-only CPU, where emulated bf16 made
    a 2048x2048 matmul 267x slower than fp32 (an AMD EPYC, session 40). Unknown hardware (None) trains in fp32."""
    if setting == "auto":
        return cpu_has_fast_bf16() is True
    return bool(setting)


def warn_if_slow_cpu_bf16(what: str) -> None:
    """Warn once per call site when bf16 is asked for on a CPU that only emulates it."""
    if cpu_has_fast_bf16() is False:
        warnings.warn(f"{what}: this CPU has no AVX-512 BF16 or AMX, so bf16 is emulated and runs about 20x "
                      "slower than fp32 here; use fp32 on this machine (or train.cpu_bf16=auto)", RuntimeWarning,
                      stacklevel=3)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to `n` inside the block and restored after it; n = 0 leaves torch's
    count (every core by default). A run's rounding, and so its trained model, depends on this count
    (docs/design.md, "Engine")."""
    import torch

    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _glibc() -> Any:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def heap_allocator(enabled: bool = True) -> Iterator[bool]:
    """CPU training lever (Linux/glibc): serve large tensors from the heap instead of a fresh mmap each.

    glibc gives every block above its mmap threshold (32 MiB at most) its own mmap: its pages fault in (and
    are zeroed) on first touch and go back to the OS on free. A training step allocates and frees its big
    activations every step, so it pays those faults every step; on the heap the blocks are recycled.
    Measured at batch 16 on 2 cores (docs/benchmarks.md): RD-Lite0 41 -> 88 training img/s, CFRG 6.8 -> 15.5,
    URD 6.6 -> 11.7; peak RSS +0-8 % (BKD +40 %). Inference paths gained nothing, so only fit() uses it.
    On exit the allocator is left where glibc's own dynamic threshold settles with such blocks (mmap
    threshold 32 MiB, trim threshold 64 MiB) and the retained heap is returned to the OS. Yields whether
    it took effect (False off glibc or when disabled).
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    try:
        yield ok
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and it counts in RSS)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
