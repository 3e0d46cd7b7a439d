"""GDAL's own messages ("Warning 1: ...") as rs-detect log lines instead of raw lines on stderr.

Outside a ``rasterio.Env`` GDAL prints warnings straight to stderr with its default handler, from
any thread (``Warning 1: TIFFFetchNormalTag: IO error during reading of "GeoPixelScale"; tag
ignored``). :func:`route_to_logging` installs a process-wide handler in every GDAL library loaded in
this process (rasterio's and pyogrio's wheels each bring one) that hands warnings to the
``rs_detect.gdal`` logger, once per distinct message, collapsed to one line; errors are left to the
exceptions rasterio and pyogrio raise from them (rs-detect reports those with the file's name), and
debug messages are dropped. rasterio's own handler, pushed while it opens a dataset, still comes
first there. Where no GDAL library can be found this does nothing.

GDAL calls its process-wide handler holding a mutex of its own, and this handler needs the GIL: a
thread that calls GDAL while holding the GIL (rasterio does, e.g. for a dataset's mask flags) and
meets a warning while another thread is inside the handler, waiting for the GIL, would deadlock both
(seen on truncated TIFFs, whose every handle warns about its tags). So the threads that read call
:func:`route_this_thread` first (the executor's reader pool does, a thread that opens a
``RasterSource`` does, e.g. a Dask worker's, and :func:`route_to_logging` for its own thread): their own
handler, which GDAL calls without that mutex. The process-wide one is left for
threads that never did (GDAL's own worker threads hold no GIL).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading

log = logging.getLogger("rs_detect.gdal")

_CPLE_WARNING = 2
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
_installed: list[ctypes.CDLL] = []
_seen: set[str] = set()
_lock = threading.Lock()
_threads = threading.local()  # .pushed: this thread's own handler is in place
_pushed_by: list[int] = []  # the thread that called route_to_logging (its handler is popped at exit)


def _handle(level: int, code: int, message: bytes | None) -> None:
    if level != _CPLE_WARNING or not message:
        return
    text = " ".join(message.decode("utf-8", "replace").split())
    with _lock:
        if text in _seen:
            return
        _seen.add(text)
    log.warning("GDAL: %s", text[:300])


_CALLBACK = _HANDLER_TYPE(_handle)  # kept alive for the process's lifetime


def _gdal_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as fh:
            return sorted({line.split()[-1] for line in fh if "libgdal" in line and line.rstrip().endswith(tuple("0123456789o"))})
    except OSError:
        return []


def _bundled_gdal(package: str) -> list[str]:
    """The GDAL library that ``package``'s binary wheel bundles (auditwheel's ``<package>.libs/``),
    found without importing the package (pyogrio's import brings pandas and geopandas, 0.3-0.5 s)."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    libs = Path(next(iter(spec.submodule_search_locations))).parent / f"{package}.libs"
    return sorted(str(p) for p in libs.glob("libgdal*.so*"))


def route_to_logging() -> int:
    """Install the handler in every GDAL library loaded now, loading rasterio's and pyogrio's first;
    returns how many. Safe to call again (libraries already handled are skipped).

    A wheel's bundled GDAL is loaded by itself (the package, imported later, links that same copy);
    where a package has none, it is imported.
    """
    import importlib
    import sys

    for name in ("rasterio", "pyogrio"):  # load both GDAL copies before looking for them
        bundled = [] if name in sys.modules else _bundled_gdal(name)
        try:
            for path in bundled:
                ctypes.CDLL(path)
        except OSError:
            bundled = []
        if not bundled:
            importlib.import_module(name)

    done = {lib._name for lib in _installed}
    for path in _gdal_libraries():
        if path in done:
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.CPLSetErrorHandler.restype = ctypes.c_void_p
            lib.CPLSetErrorHandler.argtypes = [_HANDLER_TYPE]
            lib.CPLSetErrorHandler(_CALLBACK)
        except (OSError, AttributeError):
            continue
        _installed.append(lib)
    route_this_thread()
    if threading.get_ident() not in _pushed_by:
        _pushed_by.append(threading.get_ident())
    return len(_installed)


def route_this_thread() -> None:
    """Give the calling thread its own GDAL handler (the same routing, without GDAL's global mutex: see
    the module's note). A thread pool's ``initializer``; nothing where :func:`route_to_logging` has not
    run in this process, and nothing the second time in a thread."""
    if not _installed or getattr(_threads, "pushed", False):
        return
    for lib in _installed:
        try:
            lib.CPLPushErrorHandler.argtypes = [_HANDLER_TYPE]
            lib.CPLPushErrorHandler(_CALLBACK)
        except (OSError, AttributeError):
            pass
    _threads.pushed = True


@atexit.register
def _quiet_at_exit() -> None:
    """No Python callback once the interpreter is going away: GDAL's quiet handler instead."""
    pop = getattr(_threads, "pushed", False) and threading.get_ident() in _pushed_by
    for lib in _installed:
        try:
            if pop:  # this thread's own handler (pushed last by route_to_logging; rasterio pops its own)
                lib.CPLPopErrorHandler()
            quiet = ctypes.cast(lib.CPLQuietErrorHandler, ctypes.c_void_p)
            lib.CPLSetErrorHandler.argtypes = [ctypes.c_void_p]
            lib.CPLSetErrorHandler(quiet)
        except (OSError, AttributeError):
            pass
