"""Keep the resident size of a long scene flat: hand freed heap pages back to the OS (glibc only).

Why: reader threads decode into buffers of a few hundred kilobytes to megabytes (GDAL's blocks and
its strip buffers, the stretch's sample bands; the reader's slabs have mappings of their own,
:func:`mapped_array`). glibc serves such sizes from per-thread arenas once its dynamic mmap
threshold has risen, and pages freed in the middle of an arena stay resident: on a 32k x 32k scene
the process grew by about 200 MB over the run although nothing was held. ``malloc_trim(0)`` returns
those pages; called about four times a second it costs a fraction of a millisecond per call; the 8k and 32k runs then peak within about 10 % of each other. (A fixed, low
mmap threshold also keeps the size flat but cost 15 % of decode throughput: every block became an
mmap/munmap pair.) Elsewhere than glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import time
import weakref
from collections.abc import Callable

import numpy as np


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


_ANON_FLAGS: int | None = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE") else None


def mapped_array(shape: tuple[int, ...], dtype: np.dtype, on_free: Callable[[], None] | None = None) -> np.ndarray:
    """An array in an anonymous private mapping of its own, unmapped when its last view is freed;
    ``on_free`` runs then. For buffers of megabytes that come and go (the reader's slabs, the striped
    stretch's sample bands): from the heap, glibc serves them from arenas once its mmap threshold has
    risen, and their freed pages stay resident until a trim. Windows has no private anonymous mappings
    in Python's mmap: a plain array there.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = max(count * dtype.itemsize, 1)
    buf: mmap.mmap | np.ndarray = mmap.mmap(-1, nbytes, flags=_ANON_FLAGS) if _ANON_FLAGS is not None else np.empty(count, dtype)
    if on_free is not None:
        weakref.finalize(buf, on_free)  # the buffer lives as long as any view of it
    flat = np.frombuffer(buf, dtype=dtype, count=count) if isinstance(buf, mmap.mmap) else buf
    return flat.reshape(shape)


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
