"""Keep the CPU process's resident memory close to its live tensors (glibc malloc).

PyTorch's CPU allocator takes memory from glibc `malloc`. glibc serves large blocks with `mmap` and returns them at
`free`, but it raises that threshold dynamically (up to 32 MiB) each time such a block is freed, after which
activation-sized tensors come from the heap, and freed heap memory stays resident. During training this fragments
into hundreds of MiB of resident-but-free memory: for ViT-B/16 at batch 32 on CPU we measured 760 MiB resident
between BSR-lean steps whose live tensors take under 300 MiB. Fixing the threshold makes every tensor of at least
`threshold` bytes its own mapping, returned to the OS when freed. It costs page faults on fresh mappings (a few
percent of step time here). This is a process-wide setting: benchmarks apply it to every method alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
DEFAULT_THRESHOLD = 1 << 20


def release_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Make glibc `mmap` (and so return at `free`) every allocation of at least `threshold` bytes.

    Returns True if the setting took effect (Linux with glibc), False elsewhere (a no-op there: macOS, Windows, musl).
    Applies to allocations made after the call, so call it before building the model.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def trim() -> bool:
    """Return free heap memory to the OS now (`malloc_trim(0)`); True if glibc did so."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
