"""Keep large freed blocks inside the process, so training steps stop page-faulting their buffers in.

glibc's malloc serves every block above its mmap threshold with a fresh mapping and unmaps it on
free; it raises the threshold only to just above the largest block freed so far, and a request of
that same size is mapped again. A training step allocates the same large activations every time (a
quickstart site's gate buffers are 25 MB each), so each step faults every page of them in anew and
the kernel zeroes it: about a third of one quickstart site's distillation step on the 2-core CPU
(`bench/training.py`: 83-87 ms -> 57-59 ms fused, 126-137 -> 97-102 ms on the reference loop).

Raising the mmap threshold to glibc's ceiling (32 MiB) and the trim threshold far above it keeps
those blocks on the heap for the next step. The price is that the process keeps its peak heap
instead of handing freed memory back, which is what a training process wants. The command line does
this for every command; a library user calls `keep_freed_memory()` once, or sets glibc's own
`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` before starting Python.
`REPLACER_KEEP_FREED_MEMORY=0` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems; larger values are refused."""
TRIM_THRESHOLD = 1 << 30

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> str | None:
    """Tune glibc's malloc as the module docstring says; None when done, else why it was not (once per process)."""
    if os.environ.get("REPLACER_KEEP_FREED_MEMORY", "1").strip() == "0":
        return "REPLACER_KEEP_FREED_MEMORY=0"
    if not sys.platform.startswith("linux"):
        return f"the allocator is only tuned on Linux (glibc), not on {sys.platform}"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "this C library has no mallopt (not glibc)"
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "mallopt refused the thresholds"
    return None
