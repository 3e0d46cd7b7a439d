"""Keep the resident size of a long scene flat: hand freed heap pages back to the OS (glibc only).

Why: reader threads decode into buffers of a few hundred kilobytes to megabytes (GDAL's blocks and
its strip buffers, the stretch's sample bands; the reader's slabs have mappings of their own,
:func:`rs_detect.io.prefetch.mapped_array`). glibc serves such sizes from per-thread arenas once its dynamic mmap
threshold has risen, and pages freed in the middle of an arena stay resident: on a 32k x 32k scene
the process grew by about 200 MB over the run although nothing was held. ``malloc_trim(0)`` returns
those pages; called about four times a second it costs a fraction of a millisecond per call; the 8k and 32k runs then peak within about 10 % of each other. (A fixed, low
mmap threshold also keeps the size flat but cost 15 % of decode throughput: every block became an
mmap/munmap pair.) Elsewhere than glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()
TRIM_EVERY_S = 0.25  # the default interval (benchmarks/bench_pipeline.py --trim-interval sets it for a run)


def trim_heap() -> bool:
    """Hand freed heap pages back to the OS now; False where there is no ``malloc_trim``."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class HeapTrimmer:
    """Call it often (e.g. once per batch); it trims at most once every ``every_s`` seconds."""

    def __init__(self, every_s: float | None = None) -> None:
        self.every_s = TRIM_EVERY_S if every_s is None else every_s
        self.trims = 0
        self._last = time.monotonic()

    @property
    def available(self) -> bool:
        return _TRIM is not None

    def __call__(self) -> None:
        now = time.monotonic()
        if _TRIM is None or now - self._last < self.every_s:
            return
        self._last = now
        trim_heap()
        self.trims += 1
